"""Benchmark: invite-worker against its emulator, each in its own process, on loopback.

    python bench/run.py --rows 1000000 --tokens 1000 --batch-size 100
    python bench/run.py --rows 5000 --tokens 10 --batch-size 10 --limit 25 --period 1
    python bench/run.py --rows 1000000 --tokens 1000 --batch-size 100 --peers
    python bench/run.py --rows 1000000 --tokens 1000 --invitees --days 2
    python bench/run.py --rows 600000 --tokens 50000 --dry-run --versus-tokens 1000

Generates N rows over T tokens, starts the emulator (unlimited, or with --limit/--period),
runs the worker as a separate process and prints one table: emails/s, worker CPU µs per
email (user+sys of the worker process), peak RSS, requests, 429s, duplicates, and for a
limited run the wall time against the floor ceil(N / B / L) windows. ``--repeat K`` runs
the worker K times (a fresh emulator each time) and shows the run with the median CPU.

``--dry-run`` times the worker's dry run instead (read, validate, batch, write the plan; no
emulator), and ``--versus-tokens T2`` times the same rows over T2 tokens right after it and
prints the ratio: what the number of tokens costs.

``--peers`` (needs the ``bench`` extra) also runs the job through Datadog's official Python
client (``bench/peers.py``), each mode against a fresh emulator: one email per call over the
first ``--peer-rows`` rows, and list-form batches over enough rows to fill lists of B for
every token. The per-email figures and their ratios to the worker's are added to the table.

``--invitees`` makes every address an invitee of its dashboard; ``--days N`` runs the same
list N times against one emulator and prints each day, later days both as the CronJob runs
them (``--resume``) and from a fresh report (see ``bench/days.py``).
"""

from __future__ import annotations

import argparse
import compileall
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from days import PLAIN, day_rows, rounds_rows, summary_of, write_dashboards

ROOT = Path(__file__).resolve().parent.parent
KEY = "bench-key-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def write_input(path: Path, rows: int, tokens: int) -> None:
    """``rows`` distinct pairs spread round-robin over ``tokens`` tokens (CSV or JSONL)."""
    line = '{"token":"bench-token-%05d","email":"user%d@example.com"}\n'
    if path.suffix == ".csv":
        line = "bench-token-%05d,user%d@example.com\n"
    with path.open("w") as f:
        if path.suffix == ".csv":
            f.write("token,email\n")
        step = 100_000
        for start in range(0, rows, step):
            f.write("".join(line % (i % tokens, i) for i in range(start, min(rows, start + step))))


def start_emulator(
    port: int, limit: int | None, period: float, latency: float = 0.0, extra: tuple[str, ...] = ()
) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "worker", "emulator", "--port", str(port), "--api-key", KEY,
            "--app-key", KEY, "--log-format", "json", *extra]  # fmt: skip
    if limit:
        args += ["--limit", str(limit), "--period", str(period)]
    if latency:  # every POST answered this late, as a distant service would
        args += ["--slow-rate", "1", "--slow-seconds", str(latency)]
    proc = subprocess.Popen(args, cwd=ROOT, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300  # a million invitees take a while to load
    while time.monotonic() < deadline and proc.poll() is None:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        time.sleep(0.05)
    proc.kill()
    raise SystemExit("the emulator did not start")


def run_worker(
    source: Path, report: Path, url: str, opts: argparse.Namespace, *, resume: bool = False
) -> dict[str, Any]:
    """Run the worker; its CPU and peak RSS come from wait4 on the child alone.

    ``resume``: continue ``report`` (``--resume``), as the CronJob does every day."""
    args = [sys.executable, "-m", "worker", "run", str(source), "--api-url", url, "--report",
            str(report), "--resume" if resume else "--overwrite", "--batch-size",
            str(opts.batch_size), "--concurrency", str(opts.concurrency),
            "--log-format", "json"]  # fmt: skip
    if opts.list_page_size:
        args += ["--list-page-size", str(opts.list_page_size)]
    with open(report.with_suffix(".log"), "wb") as log:
        result = measure(args, stdout=subprocess.DEVNULL, stderr=log)
    result["summary"] = summary_of(report) if report.exists() else {}
    return result


def plain_day(workdir: Path, opts: argparse.Namespace, pages: tuple[str, ...]) -> float:
    """Day 1 against a service whose dashboards list no allow-list: the worker's CPU."""
    with emulator(opts.limit, opts.period, opts.latency, pages) as url:
        worker = run_worker(opts.source, workdir / "plain.jsonl", url, opts)
    if worker["exit"] != 0:
        raise SystemExit(f"the day 1 with no allow-list exited {worker['exit']}: "
                         f"see {workdir / 'plain.log'} (kept)")  # fmt: skip
    cpu: float = worker["cpu"]
    return cpu


def measure(args: list[str], **popen: Any) -> dict[str, Any]:
    """Run one process to its end: exit code, wall time, and its own CPU and peak RSS."""
    env = {**os.environ, "DD_API_KEY": KEY, "DD_APP_KEY": KEY}
    started = time.monotonic()
    proc = subprocess.Popen(args, cwd=ROOT, env=env, **popen)
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


def dry_run(source: Path, workdir: Path, opts: argparse.Namespace) -> dict[str, Any]:
    """The worker's dry run of ``source``, measured like a run."""
    args = [sys.executable, "-m", "worker", "run", str(source), "--dry-run", "--report",
            str(workdir / "plan.jsonl"), "--overwrite", "--batch-size", str(opts.batch_size),
            "--log-format", "json"]  # fmt: skip
    with open(workdir / "plan.log", "wb") as log:
        result = measure(args, stdout=subprocess.DEVNULL, stderr=log)
    if result["exit"] not in (0, 1):
        raise SystemExit(f"the dry run failed (exit {result['exit']}); see {workdir / 'plan.log'}")
    return result


def dry_run_rows(workdir: Path, opts: argparse.Namespace) -> list[tuple[str, str]]:
    """``--dry-run``: the dry run over ``--tokens`` (and ``--versus-tokens``), median of K."""
    table, walls = [], []
    for tokens in (opts.tokens, *([opts.versus_tokens] if opts.versus_tokens else [])):
        source = workdir / f"input-{tokens}.{opts.format}"
        write_input(source, opts.rows, tokens)
        runs = sorted((dry_run(source, workdir, opts) for _ in range(max(1, opts.repeat))),
                      key=lambda run: run["wall"])  # fmt: skip
        run = runs[len(runs) // 2]
        walls.append(run["wall"])
        each = ", ".join(f"{r['wall']:.2f}" for r in runs)
        source.unlink()
        table += [
            (f"dry run, {opts.rows:,} rows / {tokens:,} tokens",
             f"{run['wall']:.2f} s wall (median of {len(runs)}: {each})"),
            ("  CPU per row", f"{run['cpu'] / opts.rows * 1e6:.2f} µs "
                              f"(user {run['user']:.2f} s + sys {run['sys']:.2f} s)"),
            ("  peak RSS", f"{run['rss_mb']:.1f} MB"),
        ]  # fmt: skip
    if len(walls) == 2:
        table.append((f"{opts.tokens:,} tokens / {opts.versus_tokens:,} tokens",
                      f"{walls[0] / walls[1]:.2f}x the wall time"))  # fmt: skip
    return table


def stats(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/_emulator/stats", timeout=30) as resp:  # noqa: S310
        result: dict[str, Any] = json.loads(resp.read())
        return result


@contextmanager
def emulator(
    limit: int | None, period: float, latency: float = 0.0, extra: tuple[str, ...] = ()
) -> Iterator[str]:
    """A fresh emulator process on a free loopback port; yields its URL."""
    port = free_port()
    proc = start_emulator(port, limit, period, latency, extra)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def run_peer(mode: str, source: Path, rows: int, opts: argparse.Namespace) -> dict[str, Any]:
    """``bench/peers.py`` in one mode over the first ``rows`` rows, on its own emulator."""
    with emulator(opts.limit, opts.period, opts.latency) as url:
        result = measure(
            [sys.executable, str(ROOT / "bench" / "peers.py"), "--url", url, "--input",
             str(source), "--mode", mode, "--rows", str(rows), "--batch-size",
             str(opts.batch_size)],
            stdout=subprocess.PIPE,
        )  # fmt: skip
        result["service"] = stats(url)
    return result


def peer_rows(worker: dict[str, Any], opts: argparse.Namespace) -> list[tuple[str, str]]:
    """Run both peer modes; their per-email figures and the worker's advantage."""
    ours_cpu = worker["cpu"] / opts.rows
    ours_rate = opts.rows / worker["wall"]
    single = min(opts.rows, opts.peer_rows)
    listed = min(opts.rows, max(opts.peer_rows, opts.tokens * opts.batch_size))
    table = []
    for mode, rows, label in (("single", single, "one email per call"),
                              ("list", listed, f"lists of up to {opts.batch_size}")):  # fmt: skip
        peer = run_peer(mode, opts.source, rows, opts)
        service = peer["service"]
        if peer["exit"] != 0 or service["invitations"] != rows:
            raise SystemExit(f"the peer run ({mode}) failed: exit {peer['exit']}, {service}")
        cpu, rate = peer["cpu"] / rows, rows / peer["wall"]
        table += [
            (f"official client, {label}", f"{rows:,} rows, {service['posts']:,} requests"),
            ("  CPU per email", f"{cpu * 1e6:.1f} µs = {cpu / ours_cpu:.0f}x the worker's"),
            ("  emails/s", f"{rate:,.0f} (the worker: {ours_rate / rate:.1f}x faster)"),
            ("  peak RSS", f"{peer['rss_mb']:.1f} MB"),
        ]
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--tokens", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--format", choices=("csv", "jsonl"), default="csv", help="input format")
    parser.add_argument("--limit", type=int, default=None, help="emulator requests per window")
    parser.add_argument("--period", type=float, default=1.0, help="emulator window, seconds")
    parser.add_argument(
        "--latency",
        type=float,
        default=0.0,
        help="seconds the emulator takes to answer each POST, as a distant service would "
        "(default 0: at once)",
    )
    parser.add_argument(
        "--peers",
        action="store_true",
        help="also run the job through the official datadog-api-client",
    )
    parser.add_argument(
        "--peer-rows",
        type=int,
        default=20_000,
        help="rows the one-email-per-call peer sends (default 20,000)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run the worker this many times, each against a fresh emulator, and show the "
        "run with the median CPU (a shared machine is noisy); with --days N, run the days "
        "this many rounds and show each round's ratios and their medians",
    )
    parser.add_argument(
        "--queue",
        action="store_true",
        help="also run the job through a Redis Stream (a private redis-server): enqueue, "
        "one worker, then two (see bench/queue.py)",
    )
    parser.add_argument(
        "--invitees",
        action="store_true",
        help="make every address an invitee of its token's dashboard (the dashboard check "
        "then reads the whole allow-list of each token)",
    )
    parser.add_argument(
        "--days",
        type=int,
        default=1,
        help="run the same list this many times against one emulator, as a daily job does, "
        "and print each day (day 2 finds everyone invited)",
    )
    parser.add_argument(
        "--max-page-size",
        type=int,
        default=None,
        help="the emulator serves at most this many invitations per listed page",
    )
    parser.add_argument(
        "--list-page-size",
        type=int,
        default=None,
        help="the worker's --list-page-size (default: the worker's default, 100)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="time the worker's dry run (no emulator) instead of a run",
    )
    parser.add_argument(
        "--versus-tokens",
        type=int,
        default=None,
        help="with --dry-run: also time the same rows over this many tokens, and the ratio",
    )
    parser.add_argument(
        "--versus-plain",
        action="store_true",
        help="with --invitees --days N: in each round, day 1 again against a service whose "
        "dashboards list no allow-list (after the days, or before them in every other "
        "round), and the ratio of the two day 1s",
    )
    parser.add_argument("--keep", action="store_true", help="keep the input and report")
    opts = parser.parse_args()  # fmt: skip
    if opts.versus_tokens and not opts.dry_run:
        parser.error("--versus-tokens goes with --dry-run")
    if opts.versus_plain and not (opts.invitees and opts.days > 1):
        parser.error("--versus-plain goes with --invitees and --days 2 or more")

    workdir = Path(tempfile.mkdtemp(prefix="invite-bench-"))
    opts.source, report = workdir / f"input.{opts.format}", workdir / "report.jsonl"
    if opts.dry_run:
        compileall.compile_dir(ROOT / "worker", quiet=1)
        print_table(dry_run_rows(workdir, opts))
        cleanup(workdir, opts.keep)
        return
    write_input(opts.source, opts.rows, opts.tokens)
    pages: tuple[str, ...] = ()
    if opts.max_page_size:
        pages = ("--max-page-size", str(opts.max_page_size))
    extra = pages
    if opts.invitees:
        write_dashboards(workdir / "dashboards.json", opts.rows, opts.tokens)
        extra = ("--dashboards", str(workdir / "dashboards.json"), *pages)
    # Measure the worker as installed from a wheel, with its bytecode compiled: where
    # PYTHONDONTWRITEBYTECODE is set, an editable checkout would compile it on every run.
    compileall.compile_dir(ROOT / "worker", quiet=1)
    fresh = lambda: emulator(opts.limit, opts.period, opts.latency, extra)  # noqa: E731
    if opts.days > 1:
        # A later day from a fresh report writes beside day 1's, which --resume continues.
        day = lambda url, mode: run_worker(  # noqa: E731
            opts.source,
            workdir / "fresh.jsonl" if mode == "fresh" else report,
            url,
            opts,
            resume=mode == "resume",
        )
        who = "every address an invitee" if opts.invitees else "no allow-list"
        rounds = []
        for round_number in range(max(1, opts.repeat)):
            by_run: dict[str, float] = {}
            # The day 1 against a service whose dashboards list no allow-list runs next to
            # the round's day 1: before it in every other round, so that a machine that
            # speeds up or slows down within a round does not always favour one side.
            plain = None
            if opts.versus_plain and round_number % 2:
                plain = plain_day(workdir, opts, pages)
            table = day_rows(opts.days, opts.rows, fresh, day, stats, by_run)
            if opts.versus_plain and plain is None:
                plain = plain_day(workdir, opts, pages)
            if plain is not None:
                by_run[PLAIN] = plain
                table.append((f"{PLAIN}: CPU per row",
                              f"{plain / opts.rows * 1e6:.2f} µs (day 1 = "
                              f"{by_run['day 1'] / plain:.2f}x this)"))  # fmt: skip
            rounds.append((table, by_run))
        print_table([("rows / tokens / batch", f"{opts.rows:,} / {opts.tokens:,} / "
                      f"{opts.batch_size}; {who}"),
                     *rounds_rows(rounds, opts.rows)])  # fmt: skip
        cleanup(workdir, opts.keep)
        return
    runs = []
    for _ in range(max(1, opts.repeat)):
        with fresh() as url:
            runs.append((run_worker(opts.source, report, url, opts), stats(url)))
    runs.sort(key=lambda run: run[0]["cpu"])
    worker, service = runs[len(runs) // 2]
    rows = [
        ("rows / tokens / batch", f"{opts.rows:,} / {opts.tokens:,} / {opts.batch_size}"),
        ("worker exit code", str(worker["exit"])),
        ("wall time", f"{worker['wall']:.2f} s"),
        ("emails/s", f"{opts.rows / worker['wall']:,.0f}"),
        ("worker CPU per email", f"{worker['cpu'] / opts.rows * 1e6:.2f} µs "
                                 f"(user {worker['user']:.2f} s + sys {worker['sys']:.2f} s)"),
        ("worker peak RSS", f"{worker['rss_mb']:.1f} MB"),
        ("requests (POST)", f"{service['posts']:,}"),
        ("429s", ", ".join(str(service["rate_limited"]) for _, service in runs)),
        ("invitations / duplicates", f"{service['invitations']:,} / {service['duplicates']}"),
        ("largest list", str(service["max_list"])),
    ]  # fmt: skip
    if len(runs) > 1:
        cpus = ", ".join(f"{w['cpu'] / opts.rows * 1e6:.2f}" for w, _ in runs)
        walls = ", ".join(f"{w['wall']:.2f}" for w, _ in runs)
        rows.insert(1, ("runs (median CPU shown)", f"{len(runs)}; CPU µs per email: {cpus}"))
        rows.insert(2, ("  their wall times", f"{walls} s"))
    if opts.limit:
        # The limit counts every request, the dashboard check's reads with the POSTs.
        windows = math.ceil(service["requests"] / opts.limit)
        floor = windows * opts.period
        total = service["requests"]
        rows.append(("floor ceil(requests/L) windows",
                     f"{windows} windows = {floor:.2f} s ({total:,} requests)"))  # fmt: skip
        rows.append(
            (
                "wall - floor",
                f"{worker['wall'] - floor:+.2f} s "
                f"({(worker['wall'] - floor) / opts.period:+.2f} windows)",
            )
        )
    if opts.peers:
        rows += peer_rows(worker, opts)
    if opts.queue:
        from queue_bench import queue_rows

        env = {**os.environ, "DD_API_KEY": KEY, "DD_APP_KEY": KEY}
        rows += queue_rows(opts, ROOT, env, fresh, stats, worker["cpu"] / opts.rows * 1e6)
    print_table(rows)
    cleanup(workdir, opts.keep)


def print_table(rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    print(f"{'measure':<{width}}  value")
    print(f"{'-' * width}  {'-' * 40}")
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def cleanup(workdir: Path, keep: bool) -> None:
    if keep:
        print(f"\ninput and report kept in {workdir}")
    else:
        for path in workdir.iterdir():
            path.unlink()
        workdir.rmdir()


if __name__ == "__main__":
    main()
