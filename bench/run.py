"""Benchmark: invite-worker against its emulator, each in its own process, on loopback.

    python bench/run.py --rows 1000000 --tokens 1000 --batch-size 100
    python bench/run.py --rows 5000 --tokens 10 --batch-size 10 --limit 25 --period 1

Generates N rows over T tokens, starts the emulator (unlimited, or with --limit/--period),
runs the worker as a separate process and prints one table: emails/s, worker CPU µs per
email (user+sys of the worker process), peak RSS, requests, 429s, duplicates, and for a
limited run the wall time against the floor ceil(N / B / L) windows.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
KEY = "bench-key-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def write_input(path: Path, rows: int, tokens: int) -> None:
    """``rows`` distinct pairs spread round-robin over ``tokens`` tokens."""
    with path.open("w") as f:
        f.write("token,email\n")
        step = 100_000
        for start in range(0, rows, step):
            f.write("".join(f"bench-token-{i % tokens:05d},user{i}@example.com\n"
                            for i in range(start, min(rows, start + step))))  # fmt: skip


def start_emulator(port: int, limit: int | None, period: float) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "worker", "emulator", "--port", str(port), "--api-key", KEY,
            "--app-key", KEY, "--log-format", "json"]  # fmt: skip
    if limit:
        args += ["--limit", str(limit), "--period", str(period)]
    proc = subprocess.Popen(args, cwd=ROOT, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        time.sleep(0.05)
    proc.kill()
    raise SystemExit("the emulator did not start")


def run_worker(source: Path, report: Path, url: str, opts: argparse.Namespace) -> dict[str, Any]:
    """Run the worker; its CPU and peak RSS come from wait4 on the child alone."""
    env = {**os.environ, "DD_API_KEY": KEY, "DD_APP_KEY": KEY}
    args = [sys.executable, "-m", "worker", "run", str(source), "--api-url", url, "--report",
            str(report), "--overwrite", "--batch-size", str(opts.batch_size), "--concurrency",
            str(opts.concurrency), "--log-format", "json"]  # fmt: skip
    started = time.monotonic()
    with open(report.with_suffix(".log"), "wb") as log:
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stderr=log)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - started
    return {
        "exit": os.waitstatus_to_exitcode(status),
        "wall": wall,
        "cpu": usage.ru_utime + usage.ru_stime,
        "user": usage.ru_utime,
        "sys": usage.ru_stime,
        "rss_mb": usage.ru_maxrss / 1024,
    }


def stats(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/_emulator/stats", timeout=30) as resp:  # noqa: S310
        result: dict[str, Any] = json.loads(resp.read())
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--tokens", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--limit", type=int, default=None, help="emulator requests per window")
    parser.add_argument("--period", type=float, default=1.0, help="emulator window, seconds")
    parser.add_argument("--keep", action="store_true", help="keep the input and report")
    opts = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="invite-bench-"))
    source, report = workdir / "input.csv", workdir / "report.jsonl"
    write_input(source, opts.rows, opts.tokens)
    port = free_port()
    emulator = start_emulator(port, opts.limit, opts.period)
    url = f"http://127.0.0.1:{port}"
    try:
        worker = run_worker(source, report, url, opts)
        service = stats(url)
    finally:
        emulator.terminate()
        emulator.wait(timeout=30)
    rows = [
        ("rows / tokens / batch", f"{opts.rows:,} / {opts.tokens:,} / {opts.batch_size}"),
        ("worker exit code", str(worker["exit"])),
        ("wall time", f"{worker['wall']:.2f} s"),
        ("emails/s", f"{opts.rows / worker['wall']:,.0f}"),
        ("worker CPU per email", f"{worker['cpu'] / opts.rows * 1e6:.2f} µs "
                                 f"(user {worker['user']:.2f} s + sys {worker['sys']:.2f} s)"),
        ("worker peak RSS", f"{worker['rss_mb']:.1f} MB"),
        ("requests (POST)", f"{service['posts']:,}"),
        ("429s", str(service["rate_limited"])),
        ("invitations / duplicates", f"{service['invitations']:,} / {service['duplicates']}"),
        ("largest list", str(service["max_list"])),
    ]  # fmt: skip
    if opts.limit:
        windows = math.ceil(opts.rows / opts.batch_size / opts.limit)
        floor = windows * opts.period
        rows.append(("floor ceil(N/B/L) windows", f"{windows} windows = {floor:.2f} s"))
        rows.append(
            (
                "wall - floor",
                f"{worker['wall'] - floor:+.2f} s "
                f"({(worker['wall'] - floor) / opts.period:+.2f} windows)",
            )
        )
    width = max(len(k) for k, _ in rows)
    print(f"{'measure':<{width}}  value")
    print(f"{'-' * width}  {'-' * 40}")
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    if opts.keep:
        print(f"\ninput and report kept in {workdir}")
    else:
        for path in workdir.iterdir():
            path.unlink()
        workdir.rmdir()


if __name__ == "__main__":
    main()
