"""``bench/run.py --queue``: the same job through a Redis Stream, next to the file run.

Starts a private ``redis-server`` on a free loopback port (and stops it), enqueues the
generated input, drains it with one worker, then enqueues it again under another stream
and drains it with two workers at once, each against a fresh emulator. Prints CPU per row
of ``enqueue``, CPU per email of each worker, emails/s and peak RSS, next to the file-mode
figure of the same invocation.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

Measure = Callable[..., dict[str, Any]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def redis_server() -> Iterator[str]:
    """A private redis-server (no persistence) on a free loopback port; yields its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("--queue needs redis-server on PATH (apt-get install redis-server)")
    port, workdir = free_port(), tempfile.mkdtemp(prefix="invite-bench-redis-")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
         "no", "--dir", workdir, "--logfile", os.path.join(workdir, "redis.log")],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.monotonic() > deadline:
                raise SystemExit("redis-server did not start")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(workdir, ignore_errors=True)


def redis_cpu(url: str) -> float:
    """CPU seconds redis-server has used so far (INFO cpu: user + system)."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        info: Any = client.info("cpu")
    finally:
        client.close()
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def busy(workers: list[float], emulator: float, redis: float, wall: float) -> str:
    """Where the machine's CPU went during a run: is it the worker, or the machine?"""
    total = sum(workers) + emulator + redis
    cores = os.cpu_count() or 1
    return (f"workers {sum(workers):.2f} s + emulator {emulator:.2f} s + redis {redis:.2f} s "
            f"= {total:.2f} s of CPU in {wall:.2f} s on {cores} cores "
            f"({total / wall / cores:.0%} busy)")  # fmt: skip


def measure_all(commands: list[list[str]], env: dict[str, str], cwd: Path) -> list[dict[str, Any]]:
    """Run processes side by side; each one's exit, CPU and peak RSS (wait4), and the wall
    time until the last ends."""
    started = time.monotonic()
    procs = [subprocess.Popen(c, cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for c in commands]  # fmt: skip
    results = []
    for proc in procs:
        _, status, usage = os.wait4(proc.pid, 0)
        results.append({"exit": os.waitstatus_to_exitcode(status),
                        "cpu": usage.ru_utime + usage.ru_stime,
                        "rss_mb": usage.ru_maxrss / 1024})  # fmt: skip
    wall = time.monotonic() - started
    for result in results:
        result["wall"] = wall
    return results


def queue_rows(
    opts: argparse.Namespace,
    root: Path,
    env: dict[str, str],
    emulator: Callable[[], AbstractContextManager[str]],
    stats: Callable[[str], dict[str, Any]],
    file_cpu: float,
) -> list[tuple[str, str]]:
    """Enqueue, one worker, two workers; the table rows for them."""
    python, rows = sys.executable, opts.rows

    def enqueue(url: str, stream: str) -> dict[str, Any]:
        command = [python, "-m", "worker", "enqueue", str(opts.source), url, "--stream",
                   stream, "--log-format", "json"]  # fmt: skip
        return measure_all([command], env, root)[0]

    def worker(url: str, stream: str, api: str, name: str) -> list[str]:
        report = Path(tempfile.mkdtemp(prefix="invite-bench-q-")) / f"{name}.jsonl"
        return [python, "-m", "worker", "run", url, "--stream", stream, "--consumer", name,
                "--until-empty", "--linger", "0.2", "--api-url", api, "--report", str(report),
                "--batch-size", str(opts.batch_size), "--concurrency", str(opts.concurrency),
                "--log-format", "json"]  # fmt: skip

    with redis_server() as url:
        enq = enqueue(url, "bench-one")
        with emulator() as api:
            before = redis_cpu(url)
            [one] = measure_all([worker(url, "bench-one", api, "one")], env, root)
            one_redis = redis_cpu(url) - before
            one_service = stats(api)
        enqueue(url, "bench-two")
        with emulator() as api:
            before = redis_cpu(url)
            two = measure_all([worker(url, "bench-two", api, f"w{i}") for i in range(2)],
                              env, root)  # fmt: skip
            two_redis = redis_cpu(url) - before
            two_service = stats(api)
    one_cpu = one["cpu"] / rows * 1e6
    two_rate, one_rate = rows / two[0]["wall"], rows / one["wall"]
    return [
        ("queue: enqueue CPU per row", f"{enq['cpu'] / rows * 1e6:.2f} µs "
                                       f"(file-mode worker: {file_cpu:.2f} µs per email)"),
        ("queue: 1 worker CPU/email", f"{one_cpu:.2f} µs ({one_cpu / file_cpu:.2f}x file mode), "
                                      f"exit {one['exit']}, peak RSS {one['rss_mb']:.1f} MB"),
        ("queue: 1 worker emails/s", f"{one_rate:,.0f} ({one['wall']:.2f} s)"),
        ("queue: 2 workers CPU/email", f"{sum(w['cpu'] for w in two) / rows * 1e6:.2f} µs "
                                       f"together (exits {[w['exit'] for w in two]})"),
        ("queue: 2 workers emails/s", f"{two_rate:,.0f} ({two_rate / one_rate:.2f}x one)"),
        ("queue: machine, 1 worker", busy([one["cpu"]], one_service["cpu_seconds"], one_redis,
                                          one["wall"])),
        ("queue: machine, 2 workers", busy([w["cpu"] for w in two], two_service["cpu_seconds"],
                                           two_redis, two[0]["wall"])),
        ("queue: invitations / dups", f"{one_service['invitations']:,} / "
                                      f"{one_service['duplicates']}; two workers: "
                                      f"{two_service['invitations']:,} / "
                                      f"{two_service['duplicates']}"),
    ]  # fmt: skip
