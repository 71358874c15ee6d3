"""The client's GETs without a proxy, against a raw server on loopback that answers byte by
byte what each test scripts."""

from __future__ import annotations

import asyncio
import gzip
import socket
import ssl
import struct
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import trustme
from yarl import URL

from tests.conftest import API_KEY, APP_KEY, TOKEN_A
from worker.errors import ConnectionDropped, ConnectionFailed, RequestTimeout, ServiceUnreachable
from worker.send.client import InvitationClient
from worker.send.framing import MAX_HEAD
from worker.send.gets import request_tail

#: One scripted answer: given the connection, answer; True keeps the connection open.
Step = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[bool]]
BODY = b'{"share_type": "invite", "status": "active"}'


def send(data: bytes, *, keep: bool = True) -> Step:
    """Write ``data``; then keep the connection for the next request, or close it."""

    async def step(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(data)
        await writer.drain()
        return keep

    return step


def ok(body: bytes = BODY, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


async def reset(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """Abort the connection (RST), answering nothing."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
    return False


class Scripted:
    """A raw HTTP server on 127.0.0.1: each request it reads gets the next step."""

    def __init__(self, *steps: Step) -> None:
        self.steps = list(steps)
        self.requests: list[bytes] = []
        self.connections = 0
        self.open = 0
        self.most_open = 0
        self.closed_by_client = 0
        self.served: list[int] = []  # which connection (1, 2, ...) each request came on
        self.alpn: list[str | None] = []  # the protocol a TLS connection agreed on
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self, tls: ssl.SSLContext | None = None) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=tls)
        port = self.server.sockets[0].getsockname()[1]
        return f"{'https' if tls else 'http'}://127.0.0.1:{port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        self.connections += 1
        number = self.connections
        tls = writer.get_extra_info("ssl_object")
        self.alpn.append(tls.selected_alpn_protocol() if tls is not None else None)
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            while True:
                try:
                    self.requests.append(await reader.readuntil(b"\r\n\r\n"))
                    self.served.append(number)
                except (asyncio.IncompleteReadError, ConnectionError):
                    self.closed_by_client += 1
                    return
                if not self.steps or not await self.steps.pop(0)(reader, writer):
                    return
        finally:
            self.open -= 1
            writer.close()

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.fixture
async def scripted() -> AsyncIterator[Callable[..., Awaitable[tuple[Scripted, str]]]]:
    """Start a :class:`Scripted` server with these steps: (server, its URL)."""
    servers: list[Scripted] = []

    async def start(*steps: Step, tls: ssl.SSLContext | None = None) -> tuple[Scripted, str]:
        server = Scripted(*steps)
        servers.append(server)
        return server, await server.start(tls)

    yield start
    for server in servers:
        await server.stop()


def client(url: str, timeout: float = 5, pool_size: int = 8) -> InvitationClient:
    return InvitationClient(url, API_KEY, APP_KEY, timeout=timeout, pool_size=pool_size)


async def test_a_get_sends_the_encoded_target_host_and_keys_and_reads_headers_in_any_case(
    scripted: Callable[..., Awaitable[tuple[Scripted, str]]],
) -> None:
    """The request line carries path and query as built; the rate-limit headers are read
    whatever their case; the body is the Content-Length's."""
    listing = b'{"data": [], "meta": {"page": {"total_filtered_count": 0}}}'
    limits = b"x-ratelimit-limit: 100\r\nX-RATELIMIT-REMAINING: 99\r\n"
    server, url = await scripted(send(ok(listing, limits)), send(ok(BODY, limits)))
    async with client(url) as c:
        listed = await c.list_invitations(TOKEN_A, 3, 50)
        dashboard = await c.get_dashboard(TOKEN_A)
    assert (listed.ratelimit.limit, listed.ratelimit.remaining) == (100, 99)
    assert dashboard.body == BODY
    lines = server.requests[0].decode().split("\r\n")
    path = f"/api/v1/dashboard/public/{TOKEN_A}/invitation"
    assert lines[0] == f"GET {path}?page_size=50&page_number=3 HTTP/1.1"
    fields = dict(line.split(": ", 1) for line in lines[1:] if line)
    assert fields == {
        "Host": URL(url).raw_authority, "DD-API-KEY": API_KEY, "DD-APPLICATION-KEY": APP_KEY,
        "Accept": "application/json", "User-Agent": "invite-worker/0.1",
        "Accept-Encoding": "identity",
    }  # fmt: skip
    assert server.connections == 1


async def test_an_api_url_with_a_path_keeps_it_on_every_page(
    scripted: Callable[..., Awaitable[tuple[Scripted, str]]],
) -> None:
    """A client made on a base URL with a path (a run refuses one; the client does not),
    with a trailing slash or escapes in it, lists under that path taken as written, as
    its POSTs go."""
    listing = b'{"data": [], "meta": {"page": {"total_count": 0}}}'
    server, url = await scripted(send(ok(listing)), send(ok(listing)))
    for base in (f"{url}/dd%7Eapi%20x/", f"{url}/dd%7Eapi%20x"):
        async with client(base) as c:
            await c.list_invitations(TOKEN_A, 0, 100)
    for request in server.requests:
        line = request.decode().split("\r\n")[0]
        assert line == (f"GET /dd%7Eapi%20x/api/v1/dashboard/public/{TOKEN_A}/invitation"
                        "?page_size=100&page_number=0 HTTP/1.1")  # fmt: skip


def test_the_host_header_has_a_port_only_when_not_the_schemes_and_ipv6_in_brackets() -> None:
    """Host: the port only when not the scheme's default; an IPv6 address in brackets."""
    assert request_tail(URL("https://api.example.com"), {}).startswith(
        b" HTTP/1.1\r\nHost: api.example.com\r\n"
    )
    assert b"Host: [::1]:8080\r\n" in request_tail(URL("http://[::1]:8080/x"), {})
    assert b"Host: [::1]\r\n" in request_tail(URL("http://[::1]:80"), {})
    with pytest.raises(ValueError, match="line break"):
        request_tail(URL("http://h"), {"DD-API-KEY": "k\r\nX: y"})


async def test_chunked_with_an_extension_and_a_trailer_keeps_the_connection(
    scripted: Callable[..., Awaitable[tuple[Scripted, str]]],
) -> None:
    """Chunks are joined (extensions and trailers skipped) and the connection is reused."""
    chunked = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"5;name=value\r\nhello\r\n9\r\n and more\r\n0\r\nX-Trailer: t\r\n\r\n")  # fmt: skip
    server, url = await scripted(send(chunked), send(chunked))
    async with client(url) as c:
        assert (await c.get_dashboard(TOKEN_A)).body == b"hello and more"
        assert (await c.get_dashboard(TOKEN_A)).body == b"hello and more"
    assert server.connections == 1


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n" + BODY,
        ok(BODY, b"Connection: close\r\n"),
        b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY),
    ],
    ids=["until-eof", "connection-close", "http-1.0"],
)
async def test_an_answer_that_ends_the_connection_is_not_reused(
    scripted: Callable[..., Awaitable[tuple[Scripted, str]]], answer: bytes
) -> None:
    """A body without a length ends with the connection; Connection: close or HTTP/1.0
    without keep-alive: the next GET opens a new connection."""
    until_eof = b"Content-Length" not in answer
    server, url = await scripted(*[send(answer, keep=not until_eof)] * 2)
    async with client(url) as c:
        assert (await c.get_dashboard(TOKEN_A)).body == BODY
        assert (await c.get_dashboard(TOKEN_A)).body == BODY
    assert server.connections == 2


async def test_keep_alive_carries_many_gets_on_one_connection(
    scripted: Callable[..., Awaitable[tuple[Scripted, str]]],
) -> None:
    """Ten GETs one after another: one connection (HTTP/1.0 with keep-alive too)."""
    kept = b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok"
    server, url = await scripted(*[send(ok())] * 9, send(kept))
    async with client(url) as c:
        for _ in range(10):
            await c.get_dashboard(TOKEN_A)
    assert (server.connections, len(server.requests)) == (1, 10)


async def test_a_204_has_no_body_whatever_length_it_states(
    scripted: Callable[..., Awaitable[tuple[Scripted, str]]],
) -> None:
    """204 (and 304) end at their head, even with a Content-Length: the next answer follows."""
    empty = b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n"
    server, url = await scripted(send(empty), send(ok()))
    async with client(url) as c:
        assert (await c.validate()).http_status == 204
        assert (await c.get_dashboard(TOKEN_A)).body == BODY
    assert server.connections == 1


async def test_connections_open_at_once_stay_within_the_pool_size(
    scripted: Callable[..., Awaitable[tuple[Scripted, str]]],
) -> None:
    """Six GETs at once with a pool of two: two connections, each used three times."""

    async def slow(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(0.02)
        writer.write(ok())
        return True

    server, url = await scripted(*[slow] * 6)
    async with client(url, pool_size=2) as c:
        await asyncio.gather(*(c.get_dashboard(TOKEN_A) for _ in range(6)))
    assert (server.connections, server.most_open) == (2, 2)


async def test_the_connection_idle_the_shortest_time_is_used_first(
    scripted: Callable[..., Awaitable[tuple[Scripted, str]]],
) -> None:
    """Idle connections are taken most recent first: the others may age out at the server."""

    def after(seconds: float) -> Step:
        async def step(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
            await asyncio.sleep(seconds)
            writer.write(ok())
            return True

        return step

    server, url = await scripted(after(0.1), after(0.01), send(ok()))
    async with client(url) as c:
        await asyncio.gather(c.get_dashboard(TOKEN_A), c.get_dashboard(TOKEN_A))
        await c.get_dashboard(TOKEN_A)
    assert server.connections == 2
    assert server.served[2] == server.served[0]  # the one answered last


@pytest.mark.parametrize("how", ["eof", "reset"])
async def test_a_kept_connection_the_server_dropped_is_replaced_once(
    scripted: Callable[..., Awaitable[tuple[Scripted, str]]], how: str
) -> None:
    """A pooled connection that fails before a byte of the answer (closed or reset as the
    request went out): the GET goes again on a new connection, unseen by the caller."""
    drop = send(b"", keep=False) if how == "eof" else reset
    server, url = await scripted(send(ok()), drop, send(ok()))
    async with client(url) as c:
        await c.get_dashboard(TOKEN_A)
        assert (await c.get_dashboard(TOKEN_A)).body == BODY
    assert (server.connections, len(server.requests)) == (2, 3)


async def test_a_kept_connection_closed_while_idle_is_not_used(
    scripted: Callable[..., Awaitable[tuple[Scripted, str]]],
) -> None:
    """The server closed an idle connection: the next GET opens a new one, no error."""
    server, url = await scripted(send(ok(), keep=False), send(ok()))
    async with client(url) as c:
        await c.get_dashboard(TOKEN_A)
        for _ in range(100):  # until the client's side has seen the close
            await asyncio.sleep(0.005)
            if server.open == 0:
                break
        await asyncio.sleep(0.01)
        assert (await c.get_dashboard(TOKEN_A)).body == BODY
    assert (server.connections, len(server.requests)) == (2, 2)


async def test_a_new_connection_closed_before_the_answer_is_not_tried_again(
    scripted: Callable[..., Awaitable[tuple[Scripted, str]]],
) -> None:
    """Only a reused connection is retried: a new one that breaks is a ConnectionDropped."""
    server, url = await scripted(send(b"", keep=False), send(ok()))
    async with client(url) as c:
        with pytest.raises(ConnectionDropped, match="connection broke: IncompleteReadError"):
            await c.get_dashboard(TOKEN_A)
    assert len(server.requests) == 1


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + BODY,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nabc",
    ],
    ids=["content-length", "chunked"],
)
async def test_a_server_closing_mid_body_is_a_dropped_connection(
    scripted: Callable[..., Awaitable[tuple[Scripted, str]]], answer: bytes
) -> None:
    """The connection ends before the body does: ConnectionDropped, never a short body."""
    _, url = await scripted(send(answer, keep=False))
    async with client(url) as c:
        with pytest.raises(ConnectionDropped, match="connection broke"):
            await c.get_dashboard(TOKEN_A)


@pytest.mark.parametrize(
    ("answer", "said"),
    [
        (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", "not an HTTP/1.x status line"),
        (b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n", "not an HTTP/1.x status line"),
        (b"HTTP/1.1 200 OK\r\nBad Header: x\r\n\r\n", "malformed header"),
        (b"HTTP/1.1 200 OK\r\n folded: x\r\n\r\n", "malformed header"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "malformed Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", "Content-Length"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "chunk size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", "Transfer-Encoding"),
        (b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * MAX_HEAD + b"\r\n\r\n", "over 65536 bytes"),
        (b"HTTP/1.1 200 OK\r\nContent-Encoding: br\r\nContent-Length: 2\r\n\r\nok", "'br'"),
        (b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 2\r\n\r\nok", "gzip"),
        (ok(gzip.compress(BODY)[:-12], b"Content-Encoding: gzip\r\n"), "gzip body cut short"),
        (b"HTTP/1.1 2OO " + API_KEY.encode() + b"\r\n\r\n", "[redacted]"),
    ],
    ids=[
        "not-http",
        "status",
        "header",
        "fold",
        "length",
        "lengths",
        "chunk",
        "coding",
        "oversized-head",
        "unknown-encoding",
        "bad-gzip",
        "short-gzip",
        "key-echoed",
    ],
)
async def test_garbage_is_a_dropped_connection_closed_and_says_what(
    scripted: Callable[..., Awaitable[tuple[Scripted, str]]], answer: bytes, said: str
) -> None:
    """What is not an HTTP/1.x answer this client reads: ConnectionDropped saying what was
    wrong (never a key), and the connection is closed, not kept."""
    server, url = await scripted(send(answer), send(ok()))
    async with client(url, timeout=2) as c:
        with pytest.raises(ConnectionDropped) as caught:
            await c.get_dashboard(TOKEN_A)
        assert said in str(caught.value)
        assert API_KEY not in str(caught.value)
        assert (await c.get_dashboard(TOKEN_A)).body == BODY
    assert server.connections == 2


@pytest.mark.parametrize(
    ("coding", "pack"),
    [
        ("gzip", gzip.compress),
        ("deflate", zlib.compress),
        ("deflate", lambda b: zlib.compress(b)[2:-4]),
    ],
    ids=["gzip", "deflate", "raw-deflate"],
)
async def test_a_compressed_body_is_decoded(
    scripted: Callable[..., Awaitable[tuple[Scripted, str]]],
    coding: str,
    pack: Callable[[bytes], bytes],
) -> None:
    """gzip and deflate (zlib-wrapped or raw) bodies are decompressed, asked for or not."""
    _, url = await scripted(send(ok(pack(BODY), f"Content-Encoding: {coding}\r\n".encode())))
    async with client(url) as c:
        assert (await c.get_dashboard(TOKEN_A)).body == BODY


async def test_no_answer_in_time_is_a_timeout_within_the_bound(
    scripted: Callable[..., Awaitable[tuple[Scripted, str]]],
) -> None:
    """A server that never answers: RequestTimeout after about --timeout, the same text."""

    async def never(reader: asyncio.StreamReader, _: asyncio.StreamWriter) -> bool:
        await reader.read()
        return False

    server, url = await scripted(never)
    async with client(url, timeout=0.3) as c:
        started = time.monotonic()
        with pytest.raises(RequestTimeout, match=r"no answer within 0.3s \(raise --timeout"):
            await c.get_dashboard(TOKEN_A)
        assert 0.25 < time.monotonic() - started < 2
        await asyncio.sleep(0.05)
        assert server.open == 0  # the connection was closed, not kept


async def test_an_answer_cut_mid_body_counts_as_the_service_answering(
    scripted: Callable[..., Awaitable[tuple[Scripted, str]]],
) -> None:
    """A head read, then the body cut: the service answered, so later refused connections
    are each a ConnectionFailed, never ServiceUnreachable."""
    server, url = await scripted(send(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", keep=False))
    async with client(url) as c:
        with pytest.raises(ConnectionDropped):
            await c.get_dashboard(TOKEN_A)
        await server.stop()
        for _ in range(4):
            with pytest.raises(ConnectionFailed):
                await c.get_dashboard(TOKEN_A)


async def test_three_refused_connections_before_any_answer_are_unreachable() -> None:
    """Nothing listening: ConnectionFailed twice, then ServiceUnreachable saying what to check."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with client(f"http://127.0.0.1:{port}") as c:
        for _ in range(2):
            with pytest.raises(ConnectionFailed, match=r"cannot connect: \[Errno 111\]"):
                await c.get_dashboard(TOKEN_A)
        with pytest.raises(ServiceUnreachable, match="Check --api-url"):
            await c.get_dashboard(TOKEN_A)


async def test_a_cancelled_get_never_leaves_its_connection_for_another(
    scripted: Callable[..., Awaitable[tuple[Scripted, str]]],
) -> None:
    """A GET cancelled while waiting for its answer closes that connection: a late answer
    can never be read as the next GET's."""
    answered = asyncio.Event()

    async def late(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        answered.set()
        await asyncio.sleep(0.1)
        writer.write(ok(b'{"late": true}'))
        return True

    server, url = await scripted(send(ok()), late, send(ok()))
    async with client(url) as c:
        await c.get_dashboard(TOKEN_A)
        task = asyncio.create_task(c.get_dashboard(TOKEN_A))
        await answered.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.2)
        assert server.closed_by_client == 1  # closed at once, not left open
        assert (await c.get_dashboard(TOKEN_A)).body == BODY
    assert server.connections == 2


async def test_interim_answers_are_skipped(
    scripted: Callable[..., Awaitable[tuple[Scripted, str]]],
) -> None:
    """100 Continue and 103 Early Hints before the answer are read past, not returned."""
    interim = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
    server, url = await scripted(send(interim + ok()), send(ok()))
    async with client(url) as c:
        assert (await c.get_dashboard(TOKEN_A)).body == BODY
        assert (await c.get_dashboard(TOKEN_A)).body == BODY
    assert server.connections == 1


@pytest.fixture
def tls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ssl.SSLContext:
    """A server context whose certificate (for 127.0.0.1) a fresh CA signed; that CA is
    what the process trusts (SSL_CERT_FILE), instead of the system's."""
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    server.set_alpn_protocols(["h2", "http/1.1"])
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    return server


async def test_https_verifies_the_certificate_and_keeps_the_connection(
    scripted: Callable[..., Awaitable[tuple[Scripted, str]]], tls: ssl.SSLContext
) -> None:
    """https: a certificate from a trusted CA for the URL's host, HTTP/1.1 agreed (never
    h2), one connection for two GETs."""
    server, url = await scripted(send(ok()), send(ok()), tls=tls)
    async with client(url) as c:
        assert (await c.get_dashboard(TOKEN_A)).body == BODY
        assert (await c.get_dashboard(TOKEN_A)).body == BODY
    assert (server.connections, server.alpn) == (1, ["http/1.1"])


async def test_https_refuses_an_untrusted_certificate_as_a_failed_connect(
    scripted: Callable[..., Awaitable[tuple[Scripted, str]]],
    tls: ssl.SSLContext,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A certificate no trusted CA signed: ConnectionFailed naming the verification, no
    request sent."""
    other = trustme.CA()
    other.cert_pem.write_to_path(str(tmp_path / "other.pem"))
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "other.pem"))
    server, url = await scripted(send(ok()), tls=tls)
    async with client(url) as c:
        with pytest.raises(ConnectionFailed, match="CERTIFICATE_VERIFY_FAILED"):
            await c.get_dashboard(TOKEN_A)
    assert server.requests == []


async def test_credentials_in_the_api_url_go_with_every_get_too(
    scripted: Callable[..., Awaitable[tuple[Scripted, str]]],
) -> None:
    """user:password in --api-url reaches GETs as it reaches POSTs (Basic authorization):
    such a URL's reads stay on the session that sends it."""
    server, url = await scripted(send(ok()))
    with_user = url.replace("http://", "http://reader:s3cret@")
    async with client(with_user) as c:
        await c.get_dashboard(TOKEN_A)
    assert b"Authorization: Basic cmVhZGVyOnMzY3JldA==" in server.requests[0]


async def test_a_get_in_flight_when_the_client_closes_ends_and_leaves_nothing_open(
    scripted: Callable[..., Awaitable[tuple[Scripted, str]]],
) -> None:
    """Closing the client while a GET waits on a kept connection: that GET fails as a
    dropped connection instead of opening another, and no connection stays open."""

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(0.3)  # the client closes meanwhile
        return await send(ok())(reader, writer)

    server, url = await scripted(send(ok()), slow, send(ok()))
    c = client(url)
    await c.__aenter__()
    try:
        await c.get_dashboard(TOKEN_A)
        pending = asyncio.create_task(c.get_dashboard(TOKEN_A))
        await asyncio.sleep(0.1)
    finally:
        await c.__aexit__(None, None, None)
    with pytest.raises(ConnectionDropped):
        await asyncio.wait_for(pending, 5)
    await asyncio.wait(server.tasks, timeout=5)  # the server's step ends first
    assert (server.connections, server.open) == (1, 0)
