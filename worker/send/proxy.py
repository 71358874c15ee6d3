"""The egress proxy a run's API requests go through: ``HTTPS_PROXY``, ``HTTP_PROXY``, ``NO_PROXY``.

Read as curl and Python's ``urllib`` read them (aiohttp's ``trust_env`` uses the same
``urllib`` functions): the lower-case form wins over the upper-case one, ``ALL_PROXY`` is the
fallback, and a host named in ``NO_PROXY`` -- exactly, or as a domain suffix, with or without
its port; ``*`` for all -- is reached directly. Loopback is *not* exempt by default: list
``127.0.0.1,localhost`` in ``NO_PROXY`` for that.

The proxy is resolved once, when a run starts, rather than by aiohttp's ``trust_env`` on
every request: that looks the environment up and reads ``~/.netrc`` in a thread for each
request, and would hand a netrc login for the API host to the API. The proxy's user and
password go in a ``Proxy-Authorization`` header, never into a log line, the report or an
error message: :func:`proxy_secrets` lists every form of them for the log scrubber.
"""

from __future__ import annotations

import base64
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import SplitResult, unquote, urlsplit

from worker.errors import RUN_AGAIN, ServiceUnreachable, UsageError
from worker.urls import without_userinfo

#: The variables, in the order curl reads them for an ``https://`` URL.
_NAMES = {"https": ("https_proxy", "HTTPS_PROXY"), "http": ("http_proxy", "HTTP_PROXY")}
_ALL = ("all_proxy", "ALL_PROXY")
_NO = ("no_proxy", "NO_PROXY")
#: A proxy's answer when it wants (other) credentials.
PROXY_AUTH_REQUIRED = 407


@dataclass(frozen=True, slots=True)
class Proxy:
    """An HTTP proxy: its URL without credentials, the credentials apart, and where it came
    from (the variable's name), for messages."""

    url: str
    source: str
    login: str | None = field(default=None, repr=False)
    password: str = field(default="", repr=False)

    def headers(self) -> dict[str, str] | None:
        """``Proxy-Authorization`` for the credentials, if any (basic, as curl sends it).

        For an https API they go on the ``CONNECT`` only, never through the tunnel; for
        plain HTTP (an emulator on loopback) the proxy reads them on every request.
        """
        if self.login is None:
            return None
        return {"Proxy-Authorization": f"Basic {self.basic()}"}

    def secrets(self) -> tuple[str, ...]:
        """The forms the credentials could take in a message, for scrubbing it."""
        if self.login is None:
            return ()
        pw = self.password
        return (self.basic(), f"{self.login}:{pw}", *([pw] if len(pw) > 3 else []))

    def basic(self) -> str:
        """The credentials as basic authentication encodes them (``user:password``, base64)."""
        pair = f"{self.login or ''}:{self.password}"
        return base64.b64encode(pair.encode("latin-1", errors="replace")).decode()

    def __str__(self) -> str:
        return f"{self.url} (from {self.source})"


def _first(env: Mapping[str, str], names: tuple[str, ...]) -> tuple[str, str] | None:
    for name in names:
        if value := env.get(name, "").strip():
            return name, value
    return None


def env_proxy(api_url: str, env: Mapping[str, str]) -> Proxy | None:
    """The proxy for requests to ``api_url`` under ``env``; ``None``: connect directly.

    An ``https://`` or ``socks`` proxy is a :class:`UsageError`: aiohttp speaks to proxies
    in plain HTTP (an ``https://`` API is still TLS end to end, through ``CONNECT``).
    """
    target = urlsplit(api_url)
    names = _NAMES.get(target.scheme, ())
    found = _first(env, names) or _first(env, _ALL)
    if found is None or _bypassed(target.hostname or "", target.port, env):
        return None
    source, raw = found
    parts = _split(source, raw)
    shown = without_userinfo(raw)
    if parts.scheme == "http" and not parts.hostname:
        raise UsageError(f"{source}={shown!r} names no host; e.g. "
                         f"{source}=http://proxy.internal:3128")  # fmt: skip
    if parts.scheme != "http":
        raise UsageError(
            f"{source}={shown!r}: only an http:// proxy is supported (the API is still "
            "reached over TLS through it); e.g. "
            f"{source}=http://proxy.internal:3128, or unset it"
        )
    try:
        port = parts.port or 80
    except ValueError:
        raise UsageError(f"{source}={shown!r} has no valid port (1-65535)") from None
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    if parts.username is None:
        return Proxy(f"http://{host}:{port}", source)
    login, password = unquote(parts.username), unquote(parts.password or "")
    return Proxy(f"http://{host}:{port}", source, login, password)


def _bypassed(host: str, port: int | None, env: Mapping[str, str]) -> bool:
    """Whether ``NO_PROXY`` names ``host`` (urllib's rules, which are curl's)."""
    found = _first(env, _NO)
    if found is None:
        return False
    netloc = f"{host}:{port}" if port else host
    bypass = urllib.request.proxy_bypass_environment  # type: ignore[attr-defined]
    return bool(bypass(netloc, {"no": found[1]}))


def _split(name: str, raw: str) -> SplitResult:
    """The proxy URL in variable ``name``, split; a :class:`UsageError` if it cannot be.

    ``urlsplit`` refuses some (an unclosed ``[`` of an IPv6 address) with a ``ValueError``
    that would end the run with a traceback; the message shows the value without its
    user-info, cut out by hand since the URL does not parse.
    """
    try:
        parts = urlsplit(raw if "://" in raw else f"http://{raw}")
        parts.hostname  # noqa: B018 -- parsed lazily, and may raise too
    except ValueError:  # its text may quote the netloc, password and all
        raise UsageError(
            f"{name}={without_userinfo(raw)!r} is not a valid proxy URL; e.g. "
            f"{name}=http://USER:PASSWORD@proxy.internal:3128 (the user and password "
            "percent-encoded), or unset it"
        ) from None
    return parts


def proxy_secrets(env: Mapping[str, str]) -> list[str]:
    """Every form a proxy's credentials could take in text, for the log scrubber.

    The ``user:password`` pair as written and decoded, the password alone, and the pair
    in base64 (as a ``Proxy-Authorization`` header carries it).
    """
    secrets: list[str] = []
    for names in (*_NAMES.values(), _ALL):
        for name in names:
            raw = env.get(name, "").strip()
            parts = _split(name, raw)
            if "@" not in parts.netloc:
                continue
            userinfo = parts.netloc.rsplit("@", 1)[0]
            decoded = unquote(userinfo)
            password = unquote(parts.password or "")
            secrets += [userinfo, decoded, base64.b64encode(decoded.encode()).decode()]
            if password:
                secrets.append(password)
    return sorted(set(secrets), key=len, reverse=True)  # longest first: no partial leftovers


def refused(proxy: Proxy) -> ServiceUnreachable:
    """The proxy answered 407: its user or password is wrong; no retry will fix that."""
    return ServiceUnreachable(
        f"the proxy {proxy} refused the credentials (407 Proxy Authentication Required). "
        f"Nothing reached the service. Fix the user and password in {proxy.source} "
        f"(http://USER:PASSWORD@HOST:PORT, percent-encoded), then {RUN_AGAIN}"
    )
