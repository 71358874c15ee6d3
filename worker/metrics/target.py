"""Where DogStatsD metrics go: ``--statsd``, or the Agent's usual environment.

The Agent's other clients look, in order, at ``DD_DOGSTATSD_URL`` (``udp://HOST:PORT`` or
``unix:///path``), then ``DD_AGENT_HOST`` with ``DD_DOGSTATSD_PORT`` (default 8125). Set,
they turn metrics on; ``--statsd`` alone turns them on towards the local Agent, and
``--no-statsd`` turns them off whatever the environment says.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from worker.errors import UsageError
from worker.urls import bracketed

DEFAULT_PORT = 8125
#: ``--statsd`` with no address and no Agent environment: the Agent on this host.
LOCAL_AGENT = "127.0.0.1"
#: What ``--no-statsd`` stores: off, even if the Agent's environment is set.
OFF = "off"


@dataclass(frozen=True, slots=True)
class StatsdTarget:
    """A DogStatsD address: a UDP host and port, or a Unix socket path."""

    host: str | None = None
    port: int = DEFAULT_PORT
    socket_path: str | None = None

    def __str__(self) -> str:
        if self.socket_path is not None:
            return f"unix://{self.socket_path}"
        host = bracketed(self.host) if self.host else self.host
        return f"udp://{host}:{self.port}"


def statsd_target(option: str | None, env: Mapping[str, str]) -> StatsdTarget | None:
    """The target for ``--statsd`` (``option``; ``""`` when given without an address).

    ``None`` means metrics are off. A malformed address is a :class:`UsageError` naming
    where it came from.
    """
    if option == OFF:
        return None
    if option:
        return parse_address(option, "--statsd")
    if url := env.get("DD_DOGSTATSD_URL", "").strip():
        return parse_address(url, "DD_DOGSTATSD_URL")
    if host := env.get("DD_AGENT_HOST", "").strip():
        port = env.get("DD_DOGSTATSD_PORT", "").strip() or str(DEFAULT_PORT)
        return StatsdTarget(host=host, port=_port(port, "DD_DOGSTATSD_PORT"))
    if option == "":
        return StatsdTarget(host=LOCAL_AGENT)
    return None


def parse_address(text: str, where: str) -> StatsdTarget:
    """``udp://HOST:PORT``, ``unix:///path`` or a bare ``HOST[:PORT]``."""
    if text.startswith("unix://"):
        path = text.removeprefix("unix://")
        if not path.startswith("/"):
            raise UsageError(f"{where}: a unix:// address needs an absolute path, e.g. "
                             "unix:///var/run/datadog/dsd.socket")  # fmt: skip
        return StatsdTarget(socket_path=path)
    parts = urlsplit(text if "://" in text else f"udp://{text}")
    if parts.scheme != "udp" or not parts.hostname or parts.path not in ("", "/"):
        raise UsageError(f"{where}: {text!r} is not a DogStatsD address; use HOST:PORT, "
                         "udp://HOST:PORT or unix:///path/to/dsd.socket")  # fmt: skip
    try:
        port = parts.port
    except ValueError:
        raise UsageError(f"{where}: {text!r} has no valid port (1-65535)") from None
    return StatsdTarget(host=parts.hostname, port=port or DEFAULT_PORT)


def _port(text: str, where: str) -> int:
    if text.isdigit() and 0 < int(text) < 65536:
        return int(text)
    raise UsageError(f"{where} must be a port number (1-65535), got {text!r}")
