"""The HTTP client against the emulator and a bare aiohttp server, over loopback."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web
from multidict import CIMultiDict

from tests.conftest import API_KEY, APP_KEY, TOKEN_A
from worker.emulator import Emulator
from worker.emulator.dashboards import load_dashboards
from worker.errors import (
    AuthError,
    BadRequest,
    ConnectionFailed,
    RateLimited,
    RateLimitInfo,
    ServerError,
    TokenNotFound,
    UnexpectedResponse,
)
from worker.send.answers import error_message, parse_ratelimit, read_ratelimit
from worker.send.client import InvitationClient

Handler = Callable[[web.Request], web.StreamResponse]


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Awaitable[str]]]:
    """Serve one canned response on the invitation endpoint (POST unless told); the URL."""
    runners: list[web.AppRunner] = []

    async def start(response: web.Response, method: str = "POST") -> str:
        async def handler(_: web.Request) -> web.Response:
            return response

        app = web.Application()
        app.router.add_route(method, "/api/v1/dashboard/public/{token}/invitation", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return f"http://127.0.0.1:{runner.addresses[0][1]}"

    yield start
    for runner in runners:
        await runner.cleanup()


def client(url: str) -> InvitationClient:
    return InvitationClient(url, API_KEY, APP_KEY, timeout=5)


async def test_object_form_and_non_json_success_bodies(
    serve: Callable[..., Awaitable[str]],
) -> None:
    """A 2xx is a success whether data is an object, a list, or the body is not JSON."""
    obj = b'{"data": {"type": "public_dashboard_invitation", "attributes": {"email": "a@x.io"}}}'
    url = await serve(web.Response(status=201, body=obj, content_type="application/json"))
    async with client(url) as c:
        sent = await c.invite(TOKEN_A, ["a@x.io"])
    assert sent.http_status == 201
    assert [i.email for i in sent.invitations] == ["a@x.io"]
    url = await serve(web.Response(status=200, text="OK"))
    async with client(url) as c:
        assert (await c.invite(TOKEN_A, ["a@x.io"])).invitations == []


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (400, BadRequest),
        (401, AuthError),
        (403, AuthError),
        (404, TokenNotFound),
        (408, ServerError),
        (429, RateLimited),
        (500, ServerError),
        (504, ServerError),
        (302, UnexpectedResponse),
        (418, UnexpectedResponse),
    ],
)
async def test_status_codes_map_to_error_types(
    serve: Callable[..., Awaitable[str]], status: int, error: type[Exception]
) -> None:
    """Each status becomes the right retryable or permanent error; redirects are not followed."""
    headers = {"Location": "http://127.0.0.1:9/elsewhere"} if status == 302 else {}
    url = await serve(web.Response(status=status, text="<html>nope</html>", headers=headers))
    async with client(url) as c:
        with pytest.raises(error):
            await c.invite(TOKEN_A, ["a@x.io"])


async def test_connection_refused_is_retryable() -> None:
    """Nothing listening on the port is a ConnectionFailed, not a crash."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with client(f"http://127.0.0.1:{port}") as c:
        with pytest.raises(ConnectionFailed, match="cannot connect"):
            await c.invite(TOKEN_A, ["a@x.io"])


async def test_the_emulator_checks_both_keys(emulator: Emulator) -> None:
    """Either key wrong is a 403 AuthError whose message says what to check."""
    async with InvitationClient(emulator.url, API_KEY, "wrong", timeout=5) as c:
        with pytest.raises(AuthError, match="dashboards_invite_share"):
            await c.invite(TOKEN_A, ["a@x.io"])


def test_urls_are_built_only_from_plain_tokens() -> None:
    """The client itself refuses to put anything but a plain token in the path."""
    c = client("http://127.0.0.1:9")  # never contacted: only URLs are built
    assert c.invitation_url("ab-c_9").endswith("/api/v1/dashboard/public/ab-c_9/invitation")
    for bad in ("../x", "a/b", "a?b=1", "a%2Fb", ""):
        with pytest.raises(ValueError, match="invalid token"):
            c.invitation_url(bad)


def test_ratelimit_headers_tolerate_garbage() -> None:
    """Negative or non-numeric headers never raise: the whole set becomes unknown."""
    garbage = {
        "X-RateLimit-Limit": "25",
        "X-RateLimit-Period": "1",
        "X-RateLimit-Remaining": "-3",
        "X-RateLimit-Reset": "soon",
        "X-RateLimit-Name": "x",
    }
    info = parse_ratelimit(CIMultiDict(garbage))
    assert (info.limit, info.period, info.remaining, info.reset) == (None, None, None, None)
    _, raw = read_ratelimit(CIMultiDict(garbage))
    assert raw == {"Limit": "25", "Period": "1", "Remaining": "-3", "Reset": "soon"}


@pytest.mark.parametrize(
    "headers",
    [
        {"X-RateLimit-Limit": "0", "X-RateLimit-Period": "10"},
        {"X-RateLimit-Limit": "10", "X-RateLimit-Period": "abc"},
        {"X-RateLimit-Limit": "10", "X-RateLimit-Period": "-1"},
        {"X-RateLimit-Limit": "10", "X-RateLimit-Period": "nan"},
        {"X-RateLimit-Period": "2.225073858507e-311"},  # a window's arithmetic would overflow
        {"X-RateLimit-Limit": "10", "X-RateLimit-Remaining": "-3"},
        {"X-RateLimit-Limit": "10", "X-RateLimit-Remaining": "11"},
        {"X-RateLimit-Period": "10", "X-RateLimit-Reset": "-5"},
        {"X-RateLimit-Period": "10", "X-RateLimit-Reset": "3600"},
    ],
)
def test_nonsense_ratelimit_headers_are_unknown(headers: dict[str, str]) -> None:
    """Each kind of nonsense makes the header set unknown, returned raw for the warning."""
    info, raw = read_ratelimit(CIMultiDict(headers))
    assert info == RateLimitInfo()
    assert raw == {k.removeprefix("X-RateLimit-"): v for k, v in headers.items()}


def test_sane_ratelimit_headers_are_read() -> None:
    """A consistent set is read as numbers, a reset of 0 and a missing name included."""
    info, raw = read_ratelimit(
        CIMultiDict(
            {
                "X-RateLimit-Limit": "25",
                "X-RateLimit-Period": "10",
                "X-RateLimit-Remaining": "0",
                "X-RateLimit-Reset": "0",
            }
        )
    )
    assert raw is None
    assert info == RateLimitInfo(limit=25, period=10.0, remaining=0, reset=0.0)


def test_error_messages_from_any_body() -> None:
    """JSON errors are joined; HTML is reduced to text; the result is bounded."""
    assert error_message(b'{"errors": ["a", "b"]}') == "a; b"
    assert error_message(b"<html><h1>502</h1> Bad\n gateway</html>") == "502 Bad gateway"
    assert len(error_message(b"x" * 10_000)) == 500
    assert error_message(b"\xff\xfe") != ""


async def test_a_body_arriving_in_pieces_is_read_whole() -> None:
    """A response streamed in several writes is read to its end, not cut at the first."""

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=201, headers={"Content-Type": "application/json"})
        await response.prepare(request)
        items = ",".join(
            f'{{"type": "public_dashboard_invitation", "attributes": {{"email": "u{i}@x.io"}}}}'
            for i in range(300)
        ).encode()
        body = b'{"data": [' + items + b"]}"
        for start in range(0, len(body), 4096):
            await response.write(body[start : start + 4096])
            await asyncio.sleep(0.001)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/api/v1/dashboard/public/{token}/invitation", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        async with client(f"http://127.0.0.1:{runner.addresses[0][1]}") as c:
            sent = await c.invite(TOKEN_A, ["u0@x.io"])
        assert len(sent.invitations) == 300
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(
    "body",
    [b'{"data": [], "meta": []}', b'{"data": [], "meta": {"page": 7}}', b'{"data": 5}', b"[]"],
)
async def test_an_odd_invitation_list_never_crashes(
    serve: Callable[..., Awaitable[str]], body: bytes
) -> None:
    """A 200 list whose meta or data has the wrong shape yields no invitations, no error."""
    response = web.Response(status=200, body=body, content_type="application/json")
    url = await serve(response, method="GET")
    async with client(url) as c:
        listing = await c.list_invitations(TOKEN_A, 0)
    assert listing.invitations == []
    assert listing.total_count is None


async def test_an_address_a_dashboards_file_gives_as_invited_and_in_a_session_is_invited_once(
    emulator: Emulator, tmp_path: Path
) -> None:
    """The emulator's count of invitations (and of duplicates) starts right: an address a
    dashboards file says is invited and in a session holds one invitation, not two."""
    path = tmp_path / "boards.json"
    path.write_text(json.dumps([{"token": TOKEN_A, "invited": ["a@x.io", "b@x.io"],
                                 "sessions": ["A@x.io", "c@x.io"]}]))  # fmt: skip
    emulator.seed(load_dashboards(path, time.time()))
    stats = emulator.stats()
    assert (stats["invitations"], stats["duplicates"]) == (3, 0)
