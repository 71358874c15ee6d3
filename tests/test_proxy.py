"""An egress proxy from HTTPS_PROXY / HTTP_PROXY / NO_PROXY, through a real proxy process."""

from __future__ import annotations

import base64
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec
import pytest

from tests.conftest import (
    API_KEY,
    APP_KEY,
    ROOT,
    emulator_invited,
    free_port,
    rows_csv,
    wait_for_port,
    worker_command,
    worker_env,
)
from worker.errors import UsageError
from worker.send.proxy import env_proxy, proxy_secrets

KEYS = {"DD_API_KEY": API_KEY, "DD_APP_KEY": APP_KEY}
USER, PASSWORD = "alice", "s3cret-proxy-pw"


@dataclass
class ProxyServer:
    """A pproxy HTTP proxy on loopback; its log says which connections it made."""

    port: int
    log: Path

    def url(self, user: str = USER, password: str = PASSWORD) -> str:
        return f"http://{user}:{password}@127.0.0.1:{self.port}"

    def forwarded(self, port: int) -> int:
        """How many connections it opened to 127.0.0.1:``port``."""
        return self.log.read_text().count(f"-> 127.0.0.1:{port}")


@pytest.fixture
def proxy_server(tmp_path: Path) -> Iterator[ProxyServer]:
    """pproxy on a free loopback port, asking for USER:PASSWORD on every connection."""
    binary = shutil.which("pproxy", path=str(Path(sys.executable).parent)) or "pproxy"
    port, log = free_port(), tmp_path / "proxy.log"
    with log.open("wb") as out:
        # --auth 0: check the credentials of every connection, not once per client address.
        proc = subprocess.Popen(
            [binary, "-l", f"http://127.0.0.1:{port}#{USER}:{PASSWORD}", "--auth", "0", "-v"],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_for_port(port, proc, "pproxy", log)
        yield ProxyServer(port, log)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def run_worker(
    tmp_path: Path, url: str, env: dict[str, str], *flags: str, rows: int = 300
) -> tuple[subprocess.CompletedProcess[bytes], set[tuple[str, str]], Path]:
    """``run`` a fresh file against ``url`` with ``env`` added; stderr in JSON lines."""
    token = f"px-{uuid.uuid4().hex[:10]}"
    pairs = {(token, f"u{i}@example.com") for i in range(rows)}
    source, report = tmp_path / f"{token}.csv", tmp_path / f"{token}.jsonl"
    source.write_text(rows_csv(sorted(pairs)))
    args = ["run", str(source), "--report", str(report), "--log-format", "json", *flags]
    if url:
        args += ["--api-url", url]
    done = subprocess.run(worker_command(*args), env=worker_env(**KEYS, **env), cwd=ROOT,
                          capture_output=True, timeout=60, check=False)  # fmt: skip
    return done, pairs, report


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def events(done: subprocess.CompletedProcess[bytes]) -> list[dict[str, object]]:
    return [msgspec.json.decode(line) for line in done.stderr.splitlines()]


def written(done: subprocess.CompletedProcess[bytes], report: Path) -> str:
    """Everything the run wrote: stderr, stdout, the report and its journal."""
    files = [p.read_text() for p in report.parent.glob(f"{report.stem}*") if p.is_file()]
    return "\n".join([done.stderr.decode(), done.stdout.decode(), *files])


def assert_no_credentials(text: str) -> None:
    basic = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    assert PASSWORD not in text
    assert f"{USER}:" not in text
    assert basic not in text


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("proxy_var", "no_proxy_var"),
                         [("HTTP_PROXY", "NO_PROXY"), ("http_proxy", "no_proxy")])  # fmt: skip
def test_requests_go_through_the_proxy_and_not_for_a_host_no_proxy_names(
    tmp_path: Path,
    start_emulator: Callable[..., str],
    proxy_server: ProxyServer,
    proxy_var: str,
    no_proxy_var: str,
) -> None:
    """HTTP_PROXY: every request goes through the proxy (its log counts the connections);
    NO_PROXY naming the host: none does. Loopback is not exempt on its own."""
    url = start_emulator()
    done, pairs, report = run_worker(tmp_path, url, {proxy_var: proxy_server.url()})
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    assert proxy_server.forwarded(port_of(url)) >= 1
    assert set(emulator_invited(url)) >= pairs
    said = [e for e in events(done) if e["event"] == "client.proxy"]
    assert said == [said[0]]
    assert said[0]["proxy"] == f"http://127.0.0.1:{proxy_server.port}"
    assert said[0]["source"] == proxy_var
    assert_no_credentials(written(done, report))

    before = proxy_server.log.read_text()
    for bypass in ("127.0.0.1", f"127.0.0.1:{port_of(url)}", "localhost,.example.com,127.0.0.1"):
        env = {proxy_var: proxy_server.url(), no_proxy_var: bypass}
        done, pairs, _ = run_worker(tmp_path, url, env, rows=20)
        assert done.returncode == 0, done.stderr.decode()[-3000:]
        assert set(emulator_invited(url)) >= pairs
        assert "client.proxy" not in {e["event"] for e in events(done)}
    assert proxy_server.log.read_text() == before  # not one connection more


@pytest.mark.timeout(120)
def test_wrong_proxy_credentials_stop_the_run_at_once_and_never_show_them(
    tmp_path: Path, start_emulator: Callable[..., str], proxy_server: ProxyServer
) -> None:
    """A 407 from the proxy: exit 3 in one request, a message naming the variable, no secret."""
    url = start_emulator()
    wrong = proxy_server.url(password="wrong-password-123")
    done, pairs, report = run_worker(tmp_path, url, {"HTTP_PROXY": wrong})
    assert done.returncode == 3, done.stderr.decode()[-3000:]
    halted = [e for e in events(done) if e["event"] == "run.halted"]
    message = str(halted[0]["error"])
    assert f"the proxy http://127.0.0.1:{proxy_server.port} (from HTTP_PROXY) refused" in message
    assert "Fix the user and password in HTTP_PROXY" in message
    assert not set(emulator_invited(url)) & pairs
    text = written(done, report)
    assert "wrong-password-123" not in text
    assert f"{USER}:" not in text


@pytest.mark.timeout(120)
def test_an_unreachable_proxy_is_named_without_its_credentials(
    tmp_path: Path, start_emulator: Callable[..., str]
) -> None:
    """No proxy listening: exit 3, 'through the proxy http://127.0.0.1:PORT', no password."""
    url, port = start_emulator(), free_port()
    proxy = f"http://{USER}:{PASSWORD}@127.0.0.1:{port}"
    done, _, report = run_worker(tmp_path, url, {"HTTPS_PROXY": proxy, "HTTP_PROXY": proxy})
    assert done.returncode == 3, done.stderr.decode()[-3000:]
    halted = [e for e in events(done) if e["event"] == "run.halted"]
    message = str(halted[0]["error"])
    assert f"through the proxy http://127.0.0.1:{port} (from HTTP_PROXY)" in message
    assert "HTTPS_PROXY, HTTP_PROXY, NO_PROXY" in message
    assert_no_credentials(written(done, report))


@pytest.mark.timeout(120)
def test_a_dead_proxy_stops_a_run_but_the_sandbox_talks_to_its_own_emulator_directly(
    tmp_path: Path, start_emulator: Callable[..., str]
) -> None:
    """A proxy that is not there: a run against the emulator stops (exit 3, nothing sent);
    the same environment with --sandbox runs (exit 0): it never uses the proxy."""
    url = start_emulator()
    dead = f"http://{USER}:{PASSWORD}@127.0.0.1:{free_port()}"
    env = {"HTTP_PROXY": dead, "HTTPS_PROXY": dead, "ALL_PROXY": dead}
    done, pairs, _ = run_worker(tmp_path, url, env, rows=50)
    assert done.returncode == 3, done.stderr.decode()[-3000:]
    assert not set(emulator_invited(url)) & pairs
    done, _, _ = run_worker(tmp_path, "", env, "--sandbox", rows=50)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    assert "client.proxy" not in {e["event"] for e in events(done)}


def test_an_https_or_socks_proxy_is_refused_before_anything_is_sent(tmp_path: Path) -> None:
    """aiohttp speaks plain HTTP to a proxy: another scheme is exit 2, said without secrets."""
    for proxy in (f"https://{USER}:{PASSWORD}@proxy.internal:3128", "socks5://127.0.0.1:1080"):
        # An https URL on loopback: were the proxy ignored, nothing would leave the machine.
        api = f"https://127.0.0.1:{free_port()}"
        done, _, report = run_worker(tmp_path, api, {"HTTPS_PROXY": proxy}, rows=1)
        assert done.returncode == 2, done.stderr.decode()
        assert "only an http:// proxy is supported" in done.stderr.decode()
        assert_no_credentials(written(done, report))


def test_the_proxy_for_a_url_follows_curls_variables() -> None:
    """https URLs read HTTPS_PROXY, http ones HTTP_PROXY; lower case first; ALL_PROXY last;
    NO_PROXY by host, domain suffix, host:port or *; credentials apart, never in the URL."""
    env = {"HTTPS_PROXY": "http://u:p%40ss@secure.internal:3128",
           "HTTP_PROXY": "plain.internal:8080", "http_proxy": "http://lower.internal"}  # fmt: skip
    https = env_proxy("https://api.datadoghq.eu", env)
    assert https is not None
    assert (https.url, https.source) == ("http://secure.internal:3128", "HTTPS_PROXY")
    assert (https.login, https.password) == ("u", "p@ss")
    assert https.headers() == {"Proxy-Authorization": "Basic dTpwQHNz"}
    assert "p@ss" not in repr(https)
    assert "p@ss" not in str(https)
    plain = env_proxy("http://127.0.0.1:8126", env)
    assert plain is not None
    assert (plain.url, plain.source) == ("http://lower.internal:80", "http_proxy")
    assert env_proxy("https://api.datadoghq.com", {"ALL_PROXY": "http://all:1"}) is not None
    assert env_proxy("https://api.datadoghq.com", {}) is None
    for bypass in ("datadoghq.com", ".datadoghq.com", "api.datadoghq.com:443", "*"):
        assert env_proxy("https://api.datadoghq.com:443", {**env, "NO_PROXY": bypass}) is None
    assert env_proxy("https://api.datadoghq.com", {**env, "no_proxy": "datadoghq.eu"})
    with pytest.raises(UsageError, match="only an http:// proxy") as refused:
        env_proxy("https://api.datadoghq.com", {"HTTPS_PROXY": "socks5h://u:secret@h:1"})
    assert "secret" not in str(refused.value)
    for bad, said in (("http://u:secret@:3128", "names no host"),
                      ("http://u:secret@proxy:port", "no valid port")):  # fmt: skip
        with pytest.raises(UsageError, match=said) as refused:
            env_proxy("https://api.datadoghq.com", {"https_proxy": bad})
        assert "secret" not in str(refused.value)
        assert "https_proxy=" in str(refused.value)
    assert "p@ss" in proxy_secrets(env)
    assert "u:p%40ss" in proxy_secrets(env)


@pytest.mark.timeout(120)
def test_an_https_api_is_reached_through_connect_with_the_credentials_on_it(
    tmp_path: Path, start_emulator: Callable[..., str], proxy_server: ProxyServer
) -> None:
    """https:// through HTTPS_PROXY: the proxy opens the tunnel (CONNECT, credentials
    accepted); the emulator speaks no TLS, so the run stops as unreachable, naming the proxy.
    Wrong credentials on the CONNECT: the 407 message. No secret in any output."""
    port = port_of(start_emulator())
    url = f"https://127.0.0.1:{port}"
    done, _, report = run_worker(tmp_path, url, {"HTTPS_PROXY": proxy_server.url()}, rows=20)
    assert done.returncode == 3, done.stderr.decode()[-3000:]
    assert proxy_server.forwarded(port) >= 1  # the tunnel was opened: CONNECT authenticated
    message = str(next(e for e in events(done) if e["event"] == "run.halted")["error"])
    assert f"through the proxy http://127.0.0.1:{proxy_server.port} (from HTTPS_PROXY)" in message
    assert_no_credentials(written(done, report))

    before = proxy_server.forwarded(port)
    wrong = proxy_server.url(password="wrong-password-123")
    done, _, report = run_worker(tmp_path, url, {"HTTPS_PROXY": wrong}, rows=20)
    assert done.returncode == 3, done.stderr.decode()[-3000:]
    message = str(next(e for e in events(done) if e["event"] == "run.halted")["error"])
    assert "refused the credentials (407" in message
    assert proxy_server.forwarded(port) == before
    assert "wrong-password-123" not in written(done, report)


@pytest.fixture
def tls_front(
    tmp_path: Path, start_emulator: Callable[..., str]
) -> Iterator[tuple[str, str, Path]]:
    """The emulator behind TLS on loopback (pproxy terminating it with a fresh self-signed
    certificate): (https URL, the emulator's own URL, the certificate to trust)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the https test makes its certificate with the openssl command")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)  # fmt: skip
    url = start_emulator()
    binary = shutil.which("pproxy", path=str(Path(sys.executable).parent)) or "pproxy"
    port = free_port()
    proc = subprocess.Popen(
        [binary, "-l", f"tunnel{{127.0.0.1:{port_of(url)}}}+ssl://127.0.0.1:{port}",
         "--ssl", f"{cert},{key}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for_port(port, proc, "the TLS front")
        yield f"https://127.0.0.1:{port}", url, cert
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.timeout(120)
def test_a_real_https_run_goes_through_the_proxy_with_the_certificate_checked(
    tmp_path: Path, tls_front: tuple[str, str, Path], proxy_server: ProxyServer
) -> None:
    """An https API behind HTTPS_PROXY: everyone invited once through the authenticated
    tunnel, TLS verified end to end (the certificate must be trusted); NO_PROXY: direct."""
    https, emulator, cert = tls_front
    trust = {"SSL_CERT_FILE": str(cert)}
    env = {"HTTPS_PROXY": proxy_server.url(), **trust}
    done, pairs, report = run_worker(tmp_path, https, env)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    invited = emulator_invited(emulator)
    assert {pair: invited.get(pair) for pair in pairs} == dict.fromkeys(pairs, 1)
    assert proxy_server.forwarded(port_of(https)) >= 1
    assert_no_credentials(written(done, report))

    before = proxy_server.forwarded(port_of(https))
    done, pairs, _ = run_worker(tmp_path, https, {**env, "NO_PROXY": "127.0.0.1"}, rows=20)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    assert set(emulator_invited(emulator)) >= pairs
    assert proxy_server.forwarded(port_of(https)) == before

    # Through the proxy or not, an untrusted certificate stops the run: nothing is sent.
    done, pairs, _ = run_worker(tmp_path, https, {"HTTPS_PROXY": proxy_server.url()}, rows=20)
    assert done.returncode == 3, done.stderr.decode()[-3000:]
    assert "CERTIFICATE_VERIFY_FAILED" in done.stderr.decode()
    assert not set(emulator_invited(emulator)) & pairs
