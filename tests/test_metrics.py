"""Metrics to DogStatsD: names, values and tags as they arrive on a real UDP socket."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from tests.conftest import (
    API_KEY,
    APP_KEY,
    ROOT,
    TOKEN_A,
    TOKEN_B,
    by_kind,
    csv_source,
    find_capture,
    free_port,
    read_report,
    rows_csv,
    worker_command,
    worker_env,
)
from worker.config import Config
from worker.emulator import Emulator
from worker.emulator.dashboards import Dashboard
from worker.errors import UsageError
from worker.metrics.statsd import dd_tags, tag
from worker.metrics.target import StatsdTarget, statsd_target
from worker.queue.options import StreamOptions
from worker.queue.runner import run_stream
from worker.queue.stream import enqueue_rows
from worker.run import run

PAUSED = "pausedpausedpau-0123456789abcdef0123456789abcdef"
SEEN = "seenseenseensee-0123456789abcdef0123456789abcdef"
FRESH = "metricsmetricsm-0123456789abcdef0123456789abcdef"  # no sandbox dashboard has it


@dataclass(frozen=True)
class Metric:
    """One metric line of a DogStatsD datagram."""

    name: str
    values: tuple[float, ...]
    type: str
    tags: frozenset[str]


class Agent:
    """A DogStatsD stand-in: a UDP socket on loopback that keeps every datagram."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.port: int = self.sock.getsockname()[1]
        self.datagrams: list[str] = []

    @property
    def target(self) -> StatsdTarget:
        return StatsdTarget(host="127.0.0.1", port=self.port)

    def metrics(self, wait: float = 0.0) -> list[Metric]:
        """Everything received so far (waiting up to ``wait`` s for a first datagram)."""
        deadline = time.monotonic() + wait
        while True:
            try:
                self.datagrams.append(self.sock.recv(65535).decode())
            except BlockingIOError:
                if self.datagrams or time.monotonic() >= deadline:
                    break
                time.sleep(0.02)
        return [parse(line) for d in self.datagrams for line in d.splitlines() if line]

    def total(self, name: str, *tags: str) -> float:
        """The sum of every value of ``invite_worker.<name>`` carrying all of ``tags``."""
        return sum(
            sum(m.values)
            for m in self.metrics()
            if m.name == f"invite_worker.{name}" and set(tags) <= m.tags
        )


def parse(line: str) -> Metric:
    """``name:v[:v…]|type[|@rate][|#tag,…]`` as DogStatsD reads it."""
    head, kind, *fields = line.split("|")
    name, _, values = head.partition(":")
    tags = next((f[1:].split(",") for f in fields if f.startswith("#")), [])
    return Metric(name, tuple(float(v) for v in values.split(":")), kind, frozenset(tags))


@pytest.fixture
def agent() -> Iterator[Agent]:
    """A UDP socket on 127.0.0.1 standing in for the Agent's DogStatsD port."""
    stand_in = Agent()
    yield stand_in
    stand_in.sock.close()


@pytest.fixture
def clean_agent_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No Agent environment leaks in from the machine running the tests."""
    for name in ("DD_DOGSTATSD_URL", "DD_AGENT_HOST", "DD_DOGSTATSD_PORT", "DD_TAGS", "DD_ENV",
                 "DD_SERVICE", "DD_VERSION", "DATADOG_TAGS", "DD_ENTITY_ID"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)


@pytest.mark.usefixtures("clean_agent_env")
async def test_a_file_run_reports_every_kind_of_outcome_with_the_documented_names(
    tmp_path: Path, agent: Agent, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sent, skipped, refused, failed and rejected emails, requests by kind and status
    class, a 429, a retry, a reconciliation, latencies and the budget arrive as documented,
    tagged site/mode plus DD_TAGS/DD_ENV/DD_SERVICE/DD_VERSION, never a token or address."""
    monkeypatch.setenv("DD_TAGS", "team:growth, owner:ops")
    monkeypatch.setenv("DD_ENV", "staging")
    monkeypatch.setenv("DD_SERVICE", "invites")
    monkeypatch.setenv("DD_VERSION", "1.2.3")
    emulator = Emulator(api_key=API_KEY, app_key=APP_KEY, limit=10_000, period=10.0)
    now = time.time()
    emulator.seed([Dashboard(PAUSED, status="paused"),
                   Dashboard(SEEN, invitations=[("old@example.com", now - 60)])])  # fmt: skip
    await emulator.start()
    try:
        # The first POST meets a 429, the next a 503 (retried after a listing), the third
        # creates its invitations and then answers 502 (found by the listing).
        emulator.script("429", "503", "502-after")
        pairs = [(TOKEN_A, f"a{i}@example.com") for i in range(30)]
        pairs += [(TOKEN_B, f"b{i}@example.com") for i in range(10)]
        pairs += [(TOKEN_B, "someone@outside.example"), (PAUSED, "p@example.com"),
                  ("gone1234gone1234-0123456789abcdef0123456789abcdef", "g@example.com"),
                  (SEEN, "old@example.com"), (SEEN, "new@example.com")]  # fmt: skip
        text = rows_csv(pairs) + "not a token,nobody\n"
        config = Config(api_url=emulator.url, api_key=API_KEY, app_key=APP_KEY,
                        report_path=tmp_path / "r.jsonl", batch_size=10, concurrency=1,
                        backoff_base=0.001, backoff_max=0.01, reconcile_delay=0.0,
                        ratelimit_jitter=0.0, ratelimit_default_wait=0.01, max_wait=0.2,
                        statsd=agent.target)  # fmt: skip
        result = await run(config, csv_source(text))
    finally:
        await emulator.stop()
    summary = result.summary
    agent.metrics(wait=2.0)

    assert agent.total("emails.sent") == summary.emails_sent == 41
    assert agent.total("emails.skipped", "reason:already_invited") == 1
    assert agent.total("emails.refused", "code:dashboard_paused") == 1
    assert agent.total("emails.refused", "code:token_not_found") == 1
    assert agent.total("emails.failed") == 1  # the address off the share list
    assert agent.total("rows.rejected", "reason:invalid_token") == 1
    kinds = summary.requests_by_kind
    for kind in ("invite", "list_invitations", "dashboard"):
        assert agent.total("requests", f"kind:{kind}") == kinds[kind], kind
    assert agent.total("requests", "kind:invite", "status_class:4xx") >= 2  # the 429, the 400
    assert agent.total("requests", "kind:invite", "status_class:5xx") == 2
    assert agent.total("requests.throttled", "kind:invite") == summary.rate_limited == 1
    assert agent.total("retries") == summary.retries >= 1
    assert agent.total("reconciliations", "result:created") == 1
    assert agent.total("reconciliations", "result:none") == 1
    latencies = [m for m in agent.metrics() if m.name == "invite_worker.request.latency"]
    assert sum(len(m.values) for m in latencies) == sum(kinds.values())
    assert all(m.type == "d" and 0 <= min(m.values) < 5 for m in latencies)
    budget = [m for m in agent.metrics() if m.name == "invite_worker.ratelimit.remaining"]
    assert budget
    assert budget[-1].type == "g"
    assert 0 < budget[-1].values[-1] < 10_000
    assert agent.total("runs.finished", f"exit_code:{result.exit_code}") == 1
    assert result.exit_code == 1

    everything = "\n".join(agent.datagrams)
    for token in {t for t, _ in pairs}:
        assert token not in everything
    assert "@" not in everything
    expected = {"site:local", "mode:file", "team:growth", "owner:ops", "env:staging",
                "service:invites", "version:1.2.3"}  # fmt: skip
    for metric in agent.metrics():
        assert expected <= metric.tags, metric
        assert not any(t.startswith("consumer:") for t in metric.tags)


@pytest.mark.usefixtures("clean_agent_env")
async def test_a_queue_worker_tags_its_metrics_with_mode_and_consumer(
    tmp_path: Path, agent: Agent, redis_server: str, stream_name: str,
    make_config: Callable[..., Config],
) -> None:  # fmt: skip
    """A queue worker's metrics say mode:queue and consumer:<name>, the name made safe."""
    from redis.asyncio import Redis

    redis = Redis.from_url(redis_server)
    try:
        await enqueue_rows(redis, stream_name, [(TOKEN_A, f"q{i}@example.com") for i in range(25)])
    finally:
        await redis.aclose()
    options = StreamOptions(url=redis_server, stream=stream_name, consumer="host 7|a",
                            until_empty=True)  # fmt: skip
    result = await run_stream(make_config(statsd=agent.target), options)
    assert result.exit_code == 0
    agent.metrics(wait=2.0)
    assert agent.total("emails.sent", "mode:queue", "consumer:host_7_a") == 25
    assert agent.total("requests", "kind:invite", "status_class:2xx") == 1
    assert agent.total("runs.finished", "exit_code:0", "mode:queue") == 1


async def test_a_stopped_queue_worker_is_counted_interrupted_not_failed(
    tmp_path: Path, agent: Agent, redis_server: str, stream_name: str,
    make_config: Callable[..., Config],
) -> None:  # fmt: skip
    """A queue worker stopped by a signal (a scale-down) ends exit 3 with outcome:interrupted,
    so the failed-run monitor, which leaves that outcome out, does not fire for it."""
    stop = asyncio.Event()
    options = StreamOptions(url=redis_server, stream=stream_name)
    task = asyncio.create_task(run_stream(make_config(statsd=agent.target), options, stop=stop))
    await asyncio.sleep(0.5)
    stop.set()
    result = await asyncio.wait_for(task, 30)
    assert result.exit_code == 3
    agent.metrics(wait=2.0)
    assert agent.total("runs.finished", "exit_code:3", "outcome:interrupted") == 1
    monitor = json.loads((ROOT / "deploy/datadog/monitors/run-failed.json").read_text())
    assert "!outcome:interrupted" in monitor["query"]


@pytest.mark.usefixtures("clean_agent_env")
async def test_dead_letters_and_the_end_of_a_run_are_counted(
    agent: Agent, redis_server: str, stream_name: str, make_config: Callable[..., Config],
) -> None:  # fmt: skip
    """Each message moved to the dead-letter stream counts once, tagged with its error code,
    and the run's end counts once with its exit code (what the deploy/ monitors watch)."""
    from redis.asyncio import Redis

    gone = "gone5678gone5678-0123456789abcdef0123456789abcdef"
    rows = [(TOKEN_A, f"ok{i}@example.com") for i in range(5)]
    rows += [(gone, f"g{i}@example.com") for i in range(3)]
    rows += [(TOKEN_B, f"out{i}@outside.example") for i in range(2)]
    redis = Redis.from_url(redis_server, decode_responses=True)
    try:
        await enqueue_rows(redis, stream_name, rows)
        options = StreamOptions(url=redis_server, stream=stream_name, consumer="w1",
                                until_empty=True)  # fmt: skip
        result = await run_stream(make_config(statsd=agent.target), options)
        dead: Any = await redis.xrange(f"{stream_name}:dead")
    finally:
        await redis.aclose()
    agent.metrics(wait=2.0)
    codes = Counter(fields["error_code"] for _, fields in dead)
    assert sum(codes.values()) == 5
    assert agent.total("messages.dead_lettered") == 5
    for code, count in codes.items():
        assert agent.total("messages.dead_lettered", f"code:{code}", "mode:queue") == count
    assert agent.total("runs.finished") == 1
    assert agent.total("runs.finished", f"exit_code:{result.exit_code}") == 1


@pytest.mark.usefixtures("clean_agent_env")
@pytest.mark.parametrize(
    "where", ["nobody-listens-udp", "missing-unix-socket", "agent-never-reads-unix-socket"]
)
async def test_metrics_that_cannot_be_sent_never_fail_or_slow_a_run(
    tmp_path: Path, where: str, make_config: Callable[..., Config]
) -> None:
    """No Agent on the port, no socket at the path, or an Agent that never reads (its
    socket's buffer full): the run sends everything and exits 0, with at most one
    ``metrics.unavailable`` warning and no library noise."""
    stuck = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.bind(str(tmp_path / "stuck.socket"))
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as filler:  # its buffer, full
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            for _ in range(100_000):
                filler.sendto(b"x" * 512, str(tmp_path / "stuck.socket"))
    target = {
        "nobody-listens-udp": StatsdTarget(host="127.0.0.1", port=free_port()),
        "missing-unix-socket": StatsdTarget(socket_path=str(tmp_path / "no" / "dsd.socket")),
        "agent-never-reads-unix-socket": StatsdTarget(socket_path=str(tmp_path / "stuck.socket")),
    }[where]
    pairs = [(TOKEN_A, f"x{i}@example.com") for i in range(3000)]
    started = time.monotonic()
    with stuck, capture_logs() as logs:
        result = await run(make_config(statsd=target, batch_size=10), csv_source(rows_csv(pairs)))
    assert time.monotonic() - started < 30  # a bound against a hang, not a speed target
    assert result.exit_code == 0
    assert result.summary.emails_sent == 3000
    warnings = find_capture(logs, "metrics.unavailable")
    # No socket at the path fails the first send; UDP fails once the kernel has the ICMP.
    assert len(warnings) == 1 if where.startswith("missing") else len(warnings) <= 1
    assert not find_capture(logs, "library.log")


def test_the_agent_environment_or_statsd_turn_metrics_on_and_no_statsd_turns_them_off(
    tmp_path: Path, agent: Agent
) -> None:
    """DD_AGENT_HOST with DD_DOGSTATSD_PORT sends a sandbox run's metrics there, as the
    Agent's other clients do; so does --statsd HOST:PORT without them; --no-statsd sends
    none whatever the environment says."""
    source = tmp_path / "in.csv"
    source.write_text(rows_csv([(FRESH, f"e{i}@example.com") for i in range(12)]))
    agent_env = worker_env(DD_AGENT_HOST="127.0.0.1", DD_DOGSTATSD_PORT=str(agent.port))
    cases = [(agent_env, [], True), (worker_env(), ["--statsd", f"127.0.0.1:{agent.port}"], True),
             (agent_env, ["--no-statsd"], False)]  # fmt: skip
    for env, extra, metrics_on in cases:
        done = subprocess.run(
            worker_command("run", str(source), "--sandbox", "--overwrite", "--log-format",
                           "json", "--report", str(tmp_path / "r.jsonl"), *extra),
            env=env, capture_output=True, cwd=ROOT, timeout=60, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr.decode()[-2000:]
        if metrics_on:
            agent.metrics(wait=5.0)
            assert agent.total("emails.sent", "site:local", "mode:file") == 12, extra
            agent.datagrams.clear()
        else:
            assert agent.metrics(wait=0.5) == []
            sent = by_kind(read_report(tmp_path / "r.jsonl"), "batch")
            assert sum(len(b["emails"]) for b in sent) == 12


def test_the_target_comes_from_the_option_then_the_agent_environment() -> None:
    """--statsd ADDRESS wins; then DD_DOGSTATSD_URL; then DD_AGENT_HOST[:DD_DOGSTATSD_PORT];
    a bare --statsd means the local Agent; --no-statsd (``off``) wins over everything."""
    agent_env = {"DD_AGENT_HOST": "datadog-agent", "DD_DOGSTATSD_PORT": "9125"}
    url_env = {**agent_env, "DD_DOGSTATSD_URL": "unix:///var/run/datadog/dsd.socket"}
    assert statsd_target(None, {}) is None
    assert str(statsd_target("", {})) == "udp://127.0.0.1:8125"
    assert str(statsd_target(None, agent_env)) == "udp://datadog-agent:9125"
    assert str(statsd_target(None, {"DD_AGENT_HOST": "agent"})) == "udp://agent:8125"
    assert str(statsd_target("", url_env)) == "unix:///var/run/datadog/dsd.socket"
    assert str(statsd_target("127.0.0.1:9999", url_env)) == "udp://127.0.0.1:9999"
    assert str(statsd_target("udp://[::1]:8125", {})) == "udp://[::1]:8125"
    assert statsd_target("off", url_env) is None


@pytest.mark.parametrize(
    ("option", "env", "names"),
    [
        ("tcp://agent:8125", {}, "--statsd"),
        ("agent:http", {}, "--statsd"),
        ("unix://relative/dsd.socket", {}, "--statsd"),
        (None, {"DD_DOGSTATSD_URL": "http://agent"}, "DD_DOGSTATSD_URL"),
        (None, {"DD_AGENT_HOST": "agent", "DD_DOGSTATSD_PORT": "eighty"}, "DD_DOGSTATSD_PORT"),
    ],
)
def test_a_malformed_address_is_a_usage_error_naming_its_source(
    option: str | None, env: dict[str, str], names: str
) -> None:
    """A bad address stops the run before it starts and says where it came from."""
    with pytest.raises(UsageError, match=names):
        statsd_target(option, env)


def test_tags_are_made_safe_and_dd_tags_is_read_like_the_agents_clients_read_it() -> None:
    """Reserved characters (``|``, ``,``, ``#``, spaces) never break a datagram; DD_TAGS
    may be comma- or space-separated."""
    assert tag("consumer", "web 1|#x,y") == "consumer:web_1__x_y"
    assert dd_tags({"DD_TAGS": "team:a, owner:b"}) == ["team:a", "owner:b"]
    assert dd_tags({"DD_TAGS": "team:a owner:b"}) == ["team:a", "owner:b"]
    assert dd_tags({}) == []


@pytest.mark.usefixtures("clean_agent_env")
async def test_dd_dogstatsd_url_names_a_unix_socket_the_agent_listens_on(
    tmp_path: Path, make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    """DD_DOGSTATSD_URL=unix:///…/dsd.socket, as the Agent's Kubernetes set-up mounts it:
    the run's metrics arrive on that datagram socket."""
    path = tmp_path / "dsd.socket"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.setblocking(False)
        monkeypatch.setenv("DD_DOGSTATSD_URL", f"unix://{path}")
        target = statsd_target(None, os.environ)
        assert target == StatsdTarget(socket_path=str(path))
        pairs = [(TOKEN_A, f"u{i}@example.com") for i in range(20)]
        result = await run(make_config(statsd=target), csv_source(rows_csv(pairs)))
        assert result.exit_code == 0
        lines = []
        with contextlib.suppress(BlockingIOError):
            while True:
                lines += sock.recv(65535).decode().splitlines()
    sent = [parse(line) for line in lines if line.startswith("invite_worker.emails.sent:")]
    assert sum(v for m in sent for v in m.values) == 20
