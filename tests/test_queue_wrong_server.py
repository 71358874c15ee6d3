"""What answers on a Redis URL at the start of ``run``, ``enqueue`` or ``dead-letter`` and
cannot hold the stream: another kind of server, a Sentinel, a cluster node, a Redis too
old, one in protected mode. Each is the user's to fix (exit 2), said in one line with the
fix, and nothing is sent or added. (Redis not answering at all is a fault: see
``test_queue_redis_errors``.)"""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from redis import Redis as SyncRedis
from redis.asyncio import Redis

from tests.conftest import emulator_invited, free_port, wait_for_port
from tests.test_queue_redis_errors import Workers, cli, one_message, worker_args
from tests.test_stop_inputs import catches_sigterm, wait_for
from worker.queue.connect import connect
from worker.queue.failures import RedisFailures

__all__ = ["cli"]  # the fixture, used by name

Answer = Callable[[list[bytes]], bytes]


@contextlib.contextmanager
def toy_server(answer: Answer) -> Iterator[int]:
    """A server on a loopback port reading Redis commands, answering each with
    ``answer(command)`` (raw RESP bytes); yields its port."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            buffer = b""
            while data := conn.recv(65536):
                buffer += data
                commands, buffer = parse(buffer)
                conn.sendall(b"".join(map(answer, commands)))

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = server.accept()
                threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield server.getsockname()[1]
    finally:
        server.close()


def parse(buffer: bytes) -> tuple[list[list[bytes]], bytes]:
    """The whole commands (arrays of bulk strings) at the start of ``buffer``, and the rest."""
    commands: list[list[bytes]] = []
    while buffer.startswith(b"*") and b"\r\n" in buffer:
        head, rest = buffer[1:].split(b"\r\n", 1)
        parts = []
        for _ in range(int(head)):
            if b"\r\n" not in rest:
                return commands, buffer
            size, tail = rest[1:].split(b"\r\n", 1)
            if len(tail) < int(size) + 2:
                return commands, buffer
            parts.append(tail[: int(size)])
            rest = tail[int(size) + 2 :]
        commands.append(parts)
        buffer = rest
    return commands, buffer


@contextlib.contextmanager
def server_process(argv: list[str], port: int, log: Path) -> Iterator[None]:
    """A server process (``argv``) listening on loopback ``port``, killed after; its
    output in ``log``, shown if it ends before it listens."""
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, proc, " ".join(argv[:2]), log)
        yield
    finally:
        proc.kill()
        proc.wait(timeout=10)


def commands_refused(port: int, api: str, tmp_path: Path, cli: Workers, url: str = "") -> list[str]:
    """``run``, ``enqueue`` and ``dead-letter list`` on ``port`` (or ``url``): each exits
    2 with one message (returned), and nothing was sent."""
    url = url or f"redis://127.0.0.1:{port}/0"
    source = tmp_path / "in.csv"
    source.write_text("token,email\ndash-0,someone@example.com\n")
    said = []
    for args in (worker_args(url, api, tmp_path / "1.jsonl"),
                 ["enqueue", str(source), url, "--stream", "invites"],
                 ["dead-letter", "list", url, "--stream", "invites"]):  # fmt: skip
        proc = cli(*args, quick=True)
        proc.expect(2, timeout=30)
        said.append(one_message(proc))
    assert emulator_invited(api) == {}
    return said


def test_a_url_whose_port_is_not_redis_is_a_mistake_said_plainly(
    tmp_path: Path, start_emulator: Callable[..., str], cli: Workers
) -> None:
    """A Redis URL pointing at something else (here the emulator's HTTP port): exit 2, one
    line saying it does not answer as Redis and to check the port; nothing sent."""
    api = start_emulator()
    wrong = "redis://" + api.removeprefix("http://") + "/0"
    proc = cli(*worker_args(wrong, api, tmp_path / "1.jsonl"), quick=True)
    proc.expect(2, timeout=30)
    said = one_message(proc)
    assert "does not answer as Redis does" in said, said
    assert "check the port" in said, said
    assert emulator_invited(api) == {}


def test_a_server_that_says_ok_to_everything_is_not_taken_for_redis(
    tmp_path: Path, start_emulator: Callable[..., str], cli: Workers
) -> None:
    """A server answering +OK to every command (PING included) speaks Redis's protocol
    but is no Redis: exit 2 and the port to check, not a traceback from the first reply
    of the wrong shape."""
    api = start_emulator()
    with toy_server(lambda command: b"+OK\r\n") as port:
        for said in commands_refused(port, api, tmp_path, cli):
            assert "does not answer as Redis does (PING was not answered PONG)" in said, said
            assert "check the port" in said, said


def redis_like(
    version: str,
    *,
    mode: str = "redis_mode:standalone",
    commands: bool = True,
    hello: bool = True,
    ping: bytes = b"+PONG\r\n",
    info_delay: float = 0.0,
) -> Answer:
    """Answers as a server of ``version`` would (no such server is installed here):
    INFO's ``mode`` line, whether it knows XAUTOCLAIM (``commands``) and HELLO."""

    def answer(command: list[bytes]) -> bytes:
        name = command[0].upper()
        if name == b"HELLO":
            if not hello:
                return b"-ERR unknown command `HELLO`, with args beginning with: `3`, \r\n"
            return b"%%2\r\n+server\r\n+redis\r\n+version\r\n+%s\r\n" % version.encode()
        if name == b"PING":
            return ping
        if name == b"INFO":
            time.sleep(info_delay)
            info = f"# Server\r\nredis_version:{version}\r\n{mode}\r\n".encode()
            return b"$%d\r\n%s\r\n" % (len(info), info)
        if name == b"CLIENT":
            return b"+OK\r\n"
        if name == b"COMMAND" and command[1:] == [b"INFO", b"XAUTOCLAIM"]:
            return b"*1\r\n*1\r\n+xautoclaim\r\n" if commands else b"*1\r\n_\r\n"
        return b"-ERR unknown command '%s'\r\n" % command[0]

    return answer


def test_a_redis_without_xautoclaim_is_named_with_its_version(
    tmp_path: Path, start_emulator: Callable[..., str], cli: Workers
) -> None:
    """A Redis 6.0 lacks XAUTOCLAIM: exit 2 at the start, naming its version and the one
    needed, rather than exit 3 and "run again" the first time a worker claims a message.
    A Redis 5 does not even know the client's HELLO: exit 2 too, not "cannot reach"."""
    api = start_emulator()
    with toy_server(redis_like("6.0.9", commands=False)) as port:
        for said in commands_refused(port, api, tmp_path, cli):
            assert f"Redis at redis://127.0.0.1:{port}/0" in said, said
            assert "does not know XAUTOCLAIM (it says it is version 6.0.9)" in said, said
            assert "the worker needs Redis 6.2 or newer" in said, said
    with toy_server(redis_like("5.0.14", commands=False, hello=False)) as port:
        for said in commands_refused(port, api, tmp_path, cli):
            assert "does not know HELLO, so it is older than Redis 6.0" in said, said
            assert "the worker needs Redis 6.2 or newer" in said, said


@pytest.mark.parametrize("mode", ["redis_mode:sentinel", "server_mode:sentinel",
                                  "server_mode:cluster"])  # fmt: skip
def test_a_server_that_says_what_it_is_in_valkeys_words_is_heard(
    mode: str, tmp_path: Path, start_emulator: Callable[..., str], cli: Workers
) -> None:
    """Valkey 8 says ``server_mode`` where Redis says ``redis_mode``: a Valkey Sentinel or
    cluster node is refused at the start (exit 2) as Redis's are."""
    api = start_emulator()
    with toy_server(redis_like("8.0.1", mode=mode)) as port:
        for said in commands_refused(port, api, tmp_path, cli):
            kind = "Sentinel" if mode.endswith("sentinel") else "Redis Cluster"
            assert f"is a Redis {kind}" in said or f"a node of a {kind}" in said, said


async def test_a_compatible_server_with_its_own_version_number_is_let_through() -> None:
    """Kvrocks says it is Redis 4.0.0 and has every stream command the worker uses: asked
    whether it knows XAUTOCLAIM, it says yes, and the connection is made."""
    with toy_server(redis_like("4.0.0")) as port:
        redis = await connect(f"redis://127.0.0.1:{port}/0", "the toy", _no_failures)
        await redis.aclose()


def _no_failures(redis: Redis) -> RedisFailures:
    raise AssertionError("nothing was refused")


def test_a_redis_loading_or_going_quiet_at_the_start_is_a_fault_said_as_such(
    tmp_path: Path, start_emulator: Callable[..., str], cli: Workers
) -> None:
    """A Redis still loading its data, a replica cut from its primary (MASTERDOWN), one
    at its maxclients, or one that answers PING and then nothing (INFO unanswered past
    the command timeout): exit 3, to run again, each said as it is, not "check the host
    and port"."""
    api = start_emulator()
    loading = redis_like("7.0.15", ping=b"-LOADING Redis is loading the dataset in memory\r\n")
    quiet = redis_like("7.0.15", info_delay=3.0)
    source = tmp_path / "in.csv"
    source.write_text("token,email\ndash-0,someone@example.com\n")
    stale = redis_like("7.0.15", ping=b"-MASTERDOWN Link with MASTER is down and "
                       b"replica-serve-stale-data is set to 'no'.\r\n")  # fmt: skip
    full = redis_like("7.0.15", ping=b"-ERR max number of clients reached\r\n")
    for answer, words in ((loading, "is loading its data into memory"),
                          (quiet, "answered PING, then no more"),
                          (stale, "is not ready (Link with MASTER is down"),
                          (full, "takes no more clients")):  # fmt: skip
        with toy_server(answer) as port:
            url = f"redis://127.0.0.1:{port}/0"
            proc = cli("enqueue", str(source), url, "--stream", "invites", quick=True)
            proc.expect(3, timeout=30)
            said = one_message(proc)
            assert words in said, said
            assert "run the same command again" in said, said
            assert "check the host and port" not in said, said
    assert emulator_invited(api) == {}


def test_a_sentinel_url_names_the_primary_to_use_instead(
    tmp_path: Path, start_emulator: Callable[..., str], cli: Workers
) -> None:
    """A URL pointing at a real Redis Sentinel (it answers PING, holds no data): exit 2,
    saying it is a Sentinel and which primary it watches, where each command said
    "unknown command" and exit 3 (run again) before."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("needs redis-server on PATH")
    api = start_emulator()
    port, watched = free_port(), free_port()
    config = tmp_path / "sentinel.conf"  # a Sentinel rewrites its configuration: a file
    config.write_text(f"port {port}\nbind 127.0.0.1\n"
                      f"sentinel monitor jobs 127.0.0.1 {watched} 1\n")  # fmt: skip
    with server_process([binary, str(config), "--sentinel"], port, tmp_path / "sentinel.log"):
        for said in commands_refused(port, api, tmp_path, cli):
            assert f"redis://127.0.0.1:{port}/0#invites is a Redis Sentinel" in said or \
                f"redis://127.0.0.1:{port}/0 is a Redis Sentinel" in said, said  # fmt: skip
            assert f"(it watches jobs at 127.0.0.1:{watched})" in said, said


def test_a_redis_cluster_node_is_refused_at_the_start_not_after_a_message(
    tmp_path: Path, start_emulator: Callable[..., str], cli: Workers
) -> None:
    """A real single-node Redis Cluster holding every slot: the worker's scripts take keys
    of different slots (CROSSSLOT), which halted a worker with exit 3, "run again", once
    it held messages. Now run, enqueue and dead-letter say so at the start: exit 2."""
    binary = shutil.which("redis-server")
    if binary is None or shutil.which("redis-cli") is None:
        pytest.skip("needs redis-server and redis-cli on PATH")
    version = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
    if (found := re.search(r"v=(\d+)\.", version.stdout)) is None or int(found.group(1)) < 7:
        pytest.skip("--cluster-port needs redis-server 7.0 or later")
    api = start_emulator()
    # The cluster bus port is named too: its default (port + 10000) lies among the ports
    # the kernel hands to outgoing connections, and a node that cannot bind it listens for
    # a moment, then exits.
    port, bus = free_port(), free_port()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
            "no", "--dir", str(tmp_path), "--cluster-enabled", "yes", "--cluster-port",
            str(bus), "--cluster-config-file", str(tmp_path / "nodes.conf")]  # fmt: skip
    log = tmp_path / "cluster.log"
    with server_process(argv, port, log):
        slots = subprocess.run(["redis-cli", "-p", str(port), "CLUSTER", "ADDSLOTSRANGE", "0",
                                "16383"], capture_output=True, timeout=10, text=True)  # fmt: skip
        assert slots.stdout.strip() == "OK", (slots, log.read_text(errors="replace")[-3000:])
        for said in commands_refused(port, api, tmp_path, cli):
            assert "is a node of a Redis Cluster" in said, said
            assert "use a standalone Redis" in said, said
        keys = subprocess.run(["redis-cli", "-p", str(port), "DBSIZE"], check=True,
                              capture_output=True, timeout=10, text=True)  # fmt: skip
        assert keys.stdout.strip() == "0"  # enqueue added nothing


def test_redis_in_protected_mode_is_a_setting_to_change_not_a_fault(
    tmp_path: Path, start_emulator: Callable[..., str], cli: Workers
) -> None:
    """A Redis that answers DENIED (protected mode; a real one says so only to clients not
    on loopback, so a server on loopback plays it): exit 2, its words and the fix."""
    api = start_emulator()
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def deny() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = server.accept()
                with conn:
                    while conn.recv(4096):
                        conn.sendall(b"-DENIED Redis is running in protected mode because "
                                     b"protected mode is enabled.\r\n")  # fmt: skip

    threading.Thread(target=deny, daemon=True).start()
    try:
        proc = cli(*worker_args(f"redis://127.0.0.1:{port}/0", api, tmp_path / "1.jsonl"),
                   quick=True)  # fmt: skip
        proc.expect(2, timeout=30)
        said = one_message(proc)
        assert "refused PING: DENIED Redis is running in protected mode" in said, said
        assert "change its configuration" in said, said
    finally:
        server.close()
    assert emulator_invited(api) == {}


def test_a_signal_while_redis_never_answers_ends_each_command_at_once(
    tmp_path: Path, start_emulator: Callable[..., str], cli: Workers
) -> None:
    """A Redis port that accepts and never answers: SIGTERM while run, enqueue or
    dead-letter waits for it ends each at once (exit 3, saying nothing was changed), not
    after the connection's timeouts."""
    api = start_emulator()
    source = tmp_path / "in.csv"
    source.write_text("token,email\ndash-0,someone@example.com\n")
    with toy_server(lambda command: b"") as port:
        url = f"redis://127.0.0.1:{port}/0"
        for args in (worker_args(url, api, tmp_path / "1.jsonl"),
                     ["run", url, "--stream", "invites", "--api-url", api, "--report",
                      str(tmp_path / "2.jsonl")],
                     ["enqueue", str(source), url, "--stream", "invites"],
                     ["dead-letter", "list", url, "--stream", "invites"]):  # fmt: skip
            proc = cli(*args)
            wait_for(lambda: catches_sigterm(proc.popen.pid), "the signal handler")  # noqa: B023
            time.sleep(0.5)  # connected, waiting for an answer to its first command
            assert proc.popen.poll() is None, proc.stderr()
            signalled = time.monotonic()
            proc.popen.send_signal(signal.SIGTERM)
            proc.expect(3, timeout=30)
            assert time.monotonic() - signalled < 3, proc.stderr()
            said = one_message(proc)
            assert "SIGTERM, stopping at once" in said, said
            if args[0] == "run":
                assert "run the same command again to start" in said, said
    assert emulator_invited(api) == {}


def test_a_database_redis_has_not_is_a_mistake_in_the_url(
    tmp_path: Path, start_emulator: Callable[..., str], cli: Workers, redis_server: str
) -> None:
    """A URL naming database 99 of a Redis that has 16: exit 2 with Redis's words (not
    exit 3 and "cannot reach ... check the host and port")."""
    api = start_emulator()
    url = redis_server.rsplit("/", 1)[0] + "/99"
    for said in commands_refused(0, api, tmp_path, cli, url):
        assert "refused the connection (DB index is out of range)" in said, said


def test_a_certificate_that_cannot_be_verified_is_said_with_the_fix(
    tmp_path: Path, start_emulator: Callable[..., str], cli: Workers
) -> None:
    """A real Redis on a TLS port with a self-signed certificate: exit 2, saying the
    certificate could not be verified and to point SSL_CERT_FILE at the CA (not exit 3
    and "run again"); with SSL_CERT_FILE set so, enqueue adds its rows."""
    binary, openssl = shutil.which("redis-server"), shutil.which("openssl")
    if binary is None or openssl is None:
        pytest.skip("needs redis-server and openssl on PATH")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)  # fmt: skip
    api, port = start_emulator(), free_port()
    argv = [binary, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
            "--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-auth-clients",
            "no", "--save", "", "--appendonly", "no", "--dir", str(tmp_path)]  # fmt: skip
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(server_process(argv, port, tmp_path / "tls.log"))
        except RuntimeError:
            pytest.skip("this redis-server was built without TLS")
        url = f"rediss://127.0.0.1:{port}/0"
        for said in commands_refused(port, api, tmp_path, cli, url):
            assert "showed a certificate that could not be verified (self-signed" in said, said
            assert "point SSL_CERT_FILE at that CA's certificate" in said, said
        source = tmp_path / "in.csv"
        source.write_text("token,email\ndash-0,someone@example.com\n")
        cli("enqueue", str(source), url, "--stream", "invites",
            SSL_CERT_FILE=str(cert)).expect(0, timeout=30)  # fmt: skip


def test_enqueue_into_a_key_that_is_not_a_stream_is_a_mistyped_name(
    tmp_path: Path, cli: Workers, redis_server: str, stream_name: str
) -> None:
    """enqueue --stream naming a string or a hash: exit 2 before any row is added, as run
    and dead-letter say it (not exit 3 with Redis's WRONGTYPE and "run again")."""
    source = tmp_path / "in.csv"
    source.write_text("token,email\ndash-0,someone@example.com\n")
    with SyncRedis.from_url(redis_server, decode_responses=True) as redis:
        redis.set(f"{stream_name}-string", "hello")
        redis.hset(f"{stream_name}-hash", "a", "b")
        for kind in ("string", "hash"):
            proc = cli("enqueue", str(source), redis_server, "--stream", f"{stream_name}-{kind}")
            proc.expect(2, timeout=30)
            said = one_message(proc)
            assert f"'{stream_name}-{kind}' is a Redis {kind}, not a stream" in said, said
        assert redis.get(f"{stream_name}-string") == "hello"
        assert redis.hgetall(f"{stream_name}-hash") == {"a": "b"}


def test_rediss_to_a_plain_port_says_to_try_redis(
    tmp_path: Path, cli: Workers, redis_server: str
) -> None:
    """rediss:// to a Redis that speaks plain text: the handshake goes unanswered, exit 3
    as unreachable, and the message says to use redis:// if the port speaks plain text."""
    url = "rediss://" + redis_server.removeprefix("redis://")
    proc = cli("dead-letter", "list", url, "--stream", "invites", quick=True)
    proc.expect(3, timeout=60)
    said = one_message(proc)
    assert "(if that port speaks plain text, use redis://)" in said, said
