"""The emulator's answers: JSON bodies, errors as the API (or a proxy) sends them."""

from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web


def json_response(status: int, body: Any, headers: dict[str, str]) -> web.Response:
    """A JSON answer."""
    return web.Response(
        status=status, body=msgspec.json.encode(body), content_type="application/json",
        headers=headers,
    )  # fmt: skip


def error(status: int, message: str, headers: dict[str, str], html: bool = False) -> web.Response:
    """``{"errors": [message]}``, or an HTML page as a proxy in front of the API sends."""
    if html:
        body = f"<html><body><h1>{status}</h1>{message}</body></html>"
        return web.Response(status=status, text=body, content_type="text/html", headers=headers)
    return json_response(status, {"errors": [message]}, headers)


def no_dashboard(headers: dict[str, str]) -> web.Response:
    """404 for a token without a shared dashboard."""
    return error(404, "Shared dashboard not found", headers)


def hang_up(request: web.Request) -> web.Response:
    """Close the connection without an answer (the client sees it drop)."""
    if request.transport is not None:
        request.transport.close()
    return web.Response(status=499)
