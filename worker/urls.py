"""The API's URL: Datadog's sites, and a base URL checked before any key travels to it."""

from __future__ import annotations

import ipaddress
from urllib.parse import SplitResult, urlsplit

from worker.errors import UsageError

#: ``DD_SITE`` value -> API base URL, as Datadog documents them.
SITES: dict[str, str] = {
    "datadoghq.com": "https://api.datadoghq.com",
    "us3.datadoghq.com": "https://api.us3.datadoghq.com",
    "us5.datadoghq.com": "https://api.us5.datadoghq.com",
    "datadoghq.eu": "https://api.datadoghq.eu",
    "ap1.datadoghq.com": "https://api.ap1.datadoghq.com",
    "ap2.datadoghq.com": "https://api.ap2.datadoghq.com",
    "uk1.datadoghq.com": "https://api.uk1.datadoghq.com",
    "ddog-gov.com": "https://api.ddog-gov.com",
    "us2.ddog-gov.com": "https://api.us2.ddog-gov.com",
}
DEFAULT_SITE = "datadoghq.com"


def api_url_for_site(site: str) -> str:
    """The API base URL of a Datadog site; an unknown site is a :class:`UsageError`."""
    try:
        return SITES[site.strip().lower()]
    except KeyError:
        known = ", ".join(SITES)
        raise UsageError(f"unknown Datadog site {site!r}; use one of: {known}") from None


def site_of(api_url: str) -> str:
    """The Datadog site an API URL belongs to; ``local`` for an emulator on loopback."""
    for site, url in SITES.items():
        if api_url.rstrip("/") == url:
            return site
    host = urlsplit(api_url).hostname or ""
    return "local" if is_loopback_host(host) else host


def bracketed(host: str) -> str:
    """A host as a URL writes it: an IPv6 address in brackets (``urlsplit`` and yarl
    give it without them)."""
    return f"[{host}]" if ":" in host else host


def is_loopback_host(host: str) -> bool:
    """True for ``localhost`` and any loopback address (127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def without_userinfo(url: str) -> str:
    """``url`` for a message: any ``user:password@`` replaced by ``***@``.

    Cut by hand (everything up to the last ``@``), not by ``urlsplit``: the URLs shown are
    the ones that failed to parse, and a password may hold ``/``, ``?`` or ``#``.
    """
    head, sep, rest = url.partition("://")
    if not sep:
        head, rest = "", url
    if "@" not in rest:
        return url
    return f"{head}{sep}***@{rest.rsplit('@', 1)[1]}"


def port_ok(parts: SplitResult) -> bool:
    """Whether a URL's port, if it has one, is a number from 1 to 65535. Port 0, or a
    colon with nothing after it, would quietly mean the scheme's default port instead."""
    try:
        return parts.port != 0 and not parts.netloc.rsplit("@", 1)[-1].endswith(":")
    except ValueError:  # not a number, or out of range
        return False


def check_api_url(url: str, name: str = "--api-url") -> str:
    """Validate a base URL: http(s), a host, no path or query; plain HTTP only to loopback.

    Keys travel in headers, so plain HTTP to any other host would publish them. No message
    shows the URL's user-info: it may hold a password. ``name``: where the URL was given
    (``--api-url``, or ``DD_API_URL`` when it came from the environment), as messages say.
    """
    use = f"{name} " if name.startswith("-") else f"{name}="  # how to give it the fix
    if not url.strip():
        # Never the site's default instead: a rehearsal's --api-url "$EMULATOR" with the
        # variable unset would otherwise send real invitations with whatever keys are set.
        raise UsageError(f"{name} is empty: give the base URL, e.g. {use}"
                         "http://127.0.0.1:8126, or drop it to use --site (DD_SITE)")  # fmt: skip
    shown = without_userinfo(url)
    if url != url.strip():
        raise UsageError(f"{name} has spaces around it: {shown!r}; give it without them")
    try:
        parts = urlsplit(url)
        hostname = parts.hostname
    except ValueError:  # an unclosed "[" of an IPv6 address
        raise UsageError(f"{name} is not a valid URL: {shown!r}") from None
    if parts.scheme not in ("http", "https") or not hostname:
        raise UsageError(f"{name} must be an http(s) URL with a host, got {shown!r}")
    if not port_ok(parts):
        raise UsageError(f"{name} has a port that is not a number from 1 to 65535: {shown!r}")
    port = f":{parts.port}" if parts.port else ""
    base = f"{parts.scheme}://{bracketed(hostname)}{port}"  # never user-info: may hold secrets
    # "?" or "#" with nothing after it too: urlsplit drops an empty query or fragment.
    if parts.path.strip("/") or "?" in url or "#" in url:
        what = "a path" if parts.path.strip("/") else "a query or fragment"
        raise UsageError(
            f"{name} takes the base URL only, without {what} (the worker adds "
            f"/api/v1/dashboard/...); use {use}{base}"
        )
    if parts.scheme == "http" and not is_loopback_host(hostname):
        raise UsageError(
            f"{name} {shown!r} is plain HTTP to a non-loopback host; the keys would travel "
            "unencrypted. Use https:// (plain http is allowed only to loopback: localhost, "
            "127.0.0.0/8 written as four plain numbers, [::1])."
        )
    return url.rstrip("/")
