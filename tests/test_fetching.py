"""SSRF-safe fetching (fluxserve.fetching).

No test here sends traffic anywhere but loopback: names are resolved by a fake resolver, the
OS resolver is only ever given numeric loopback hosts, and an autouse guard wraps
``socket.socket.connect`` so that any attempt to connect to a non-loopback address is refused
locally and fails the test (a bug shows up as a failed assertion, never as traffic). The guard
also records every address a connection was attempted to, so refusals are shown to happen
before any connection.
"""

from __future__ import annotations

import asyncio
import base64
import io
import ipaddress
import shutil
import socket
import ssl
import subprocess
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from PIL import Image

from fluxserve.fetching import (
    FetchError,
    FetchPolicy,
    Target,
    UrlRefused,
    _parse_ipv4_number_forms,
    check_target,
    check_target_async,
    check_webhook_url,
    decode_data_uri,
    fetch_bytes,
    is_public_address,
    pinned,
    sniff_image_format,
    system_resolver,
)

# -- guards: no traffic beyond loopback ---------------------------------------------------------
_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex
_real_getaddrinfo = socket.getaddrinfo


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


@dataclass
class NetGuard:
    connects: list[tuple[str, int]] = field(default_factory=list)  # every TCP connect attempted
    violations: list[str] = field(default_factory=list)


@pytest.fixture(autouse=True)
def net_guard(monkeypatch):
    guard = NetGuard()

    def check(address) -> None:
        if isinstance(address, tuple):
            host, port = str(address[0]), int(address[1])
            guard.connects.append((host, port))
            if not _is_loopback(host):
                guard.violations.append(f"connect to {host}:{port}")
                raise ConnectionRefusedError(f"test guard: no traffic to {host}")

    def connect(self, address):
        check(address)
        return _real_connect(self, address)

    def connect_ex(self, address):
        check(address)
        return _real_connect_ex(self, address)

    def getaddrinfo(host, *args, **kwargs):
        text = host.decode() if isinstance(host, bytes) else str(host)
        if host is not None and not _is_loopback(text):
            guard.violations.append(f"OS resolver asked for {text!r}")
            raise socket.gaierror(socket.EAI_NONAME, "test guard: only numeric loopback hosts")
        return _real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield guard
    assert guard.violations == [], guard.violations


# -- a fake DNS ----------------------------------------------------------------------------------
PUBLIC_V4 = "93.184.215.14"  # never connected to: the guard would refuse (and fail the test)
PUBLIC_V6 = "2606:4700:4700::1111"

DNS = {
    "metadata.google.internal": ["169.254.169.254"],
    "localtest.me": ["127.0.0.1"],
    "localhost": ["127.0.0.1", "::1"],
    "internal.example": ["10.0.0.5"],
    "v6-loopback.example": ["::1"],
    "mapped.example": ["::ffff:127.0.0.1"],
    "rebind.example": [PUBLIC_V4, "10.0.0.5"],  # public + private: refused
    "rebind-v6.example": [PUBLIC_V6, "fd00::1"],
    "cgnat.example": ["100.64.0.1"],
    "nat64.example": ["64:ff9b::a9fe:a9fe"],
    "linklocal6.example": ["fe80::1"],
    "public.example": [PUBLIC_V4, PUBLIC_V6],
    "images.example": ["127.0.0.1"],
    "storage.internal": ["127.0.0.1"],
    "other.example": ["127.0.0.1"],
}


class FakeResolver:
    def __init__(self, table: dict[str, list[str]] | None = None):
        self.table = dict(DNS if table is None else table)
        self.calls: list[str] = []

    def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append(host)
        try:
            return list(self.table[host])
        except KeyError:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known") from None


def run(coro):
    return asyncio.run(coro)


def guarded_client(**kwargs) -> httpx.AsyncClient:
    kwargs.setdefault("trust_env", False)
    return httpx.AsyncClient(limits=httpx.Limits(max_keepalive_connections=0), **kwargs)


async def fetch(url: str, policy: FetchPolicy, resolver, **kwargs) -> bytes:
    async with guarded_client() as client:
        return await fetch_bytes(url, policy=policy, client=client, resolver=resolver, **kwargs)


def png_bytes(size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (200, 30, 60)).save(buffer, format="PNG")
    return buffer.getvalue()


PNG = png_bytes()

# -- a loopback test server ----------------------------------------------------------------------


@dataclass
class Seen:
    path: str
    host: str | None
    sni: str | None = None


class TestServer:
    __test__ = False

    def __init__(self, tls: ssl.SSLContext | None = None):
        self.seen: list[Seen] = []
        self.stop = threading.Event()
        self.sni: list[str | None] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def send(self, status: int, body: bytes = b"", headers: dict | None = None):
                self.send_response(status)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):  # noqa: N802
                outer.seen.append(Seen(self.path, self.headers.get("Host"), outer.sni[-1] if outer.sni else None))
                try:
                    self.route()
                except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                    pass

            do_POST = do_GET  # noqa: N815

            def route(self):
                parts = urlsplit(self.path)
                query = parse_qs(parts.query)
                path = parts.path
                if path == "/img.png":
                    self.send(200, PNG, {"Content-Type": "image/png"})
                elif path == "/img-as-text":  # content type lies; the bytes are a PNG
                    self.send(200, PNG, {"Content-Type": "text/plain"})
                elif path == "/text-as-png":  # content type lies; the bytes are text
                    self.send(200, b"<html>definitely not a picture</html>", {"Content-Type": "image/png"})
                elif path.startswith("/redirect/"):
                    self.send(int(path.rsplit("/", 1)[1]), b"", {"Location": query["to"][0]})
                elif path.startswith("/chain/"):
                    left = int(path.rsplit("/", 1)[1])
                    if left:
                        self.send(302, b"", {"Location": f"/chain/{left - 1}"})  # relative
                    else:
                        self.send(200, PNG, {"Content-Type": "image/png"})
                elif path == "/big-chunked":  # no Content-Length: only the streaming cap can stop it
                    total = int(query["n"][0])
                    self.send_response(200)
                    self.send_header("Transfer-Encoding", "chunked")
                    self.send_header("Connection", "close")
                    self.end_headers()
                    chunk = PNG + b"\0" * (16384 - len(PNG))
                    sent = 0
                    while sent < total and not outer.stop.is_set():
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                        sent += len(chunk)
                    self.wfile.write(b"0\r\n\r\n")
                elif path == "/big-content-length":  # claims a huge body, sends a little
                    self.send_response(200)
                    self.send_header("Content-Length", str(50 * 1024 * 1024))
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(PNG)
                    outer.stop.wait(2)
                elif path == "/stall":  # never answers within the read timeout
                    outer.stop.wait(5)
                elif path == "/drip":  # a byte at a time: every read is quick, the whole is not
                    self.send_response(200)
                    self.send_header("Transfer-Encoding", "chunked")
                    self.send_header("Connection", "close")
                    self.end_headers()
                    for byte in (PNG * 10):
                        if outer.stop.wait(0.05):
                            break
                        self.wfile.write(b"1\r\n%s\r\n" % bytes([byte]))
                        self.wfile.flush()
                elif path.startswith("/status/"):
                    self.send(int(path.rsplit("/", 1)[1]), b"nope", {"Content-Type": "text/plain"})
                else:
                    self.send(404, b"not found")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.block_on_close = False
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def url(self, path: str, host: str = "127.0.0.1", scheme: str = "http") -> str:
        return f"{scheme}://{host}:{self.port}{path}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def module_server():
    with TestServer() as srv:
        yield srv


@pytest.fixture
def server(module_server):
    module_server.seen.clear()
    return module_server


LOOPBACK = FetchPolicy(allow=("127.0.0.1/32",), max_bytes=100_000, connect_timeout=2, read_timeout=2)
STRICT = FetchPolicy(max_bytes=100_000, connect_timeout=2, read_timeout=2)
STRICT_WITH_NAME = FetchPolicy(allow=("images.example",), max_bytes=100_000, connect_timeout=2, read_timeout=2)


def assert_only_connected_to(guard: NetGuard, port: int | None) -> None:
    """Every connection attempted went to the loopback test server (or none, for port None)."""
    expected = [] if port is None else [("127.0.0.1", port)] * len(guard.connects)
    assert guard.connects == expected


# -- the table: SSRF vectors, all refused --------------------------------------------------------
def vector(url: str, id: str, resolves: str | None = None):
    """``resolves``: the one name the resolver may be asked for (None: not asked at all)."""
    return pytest.param(url, resolves, id=id)


SSRF_VECTORS = [
    # IPv4 loopback in every spelling inet_aton accepts
    vector("http://127.0.0.1/", "v4-loopback"),
    vector("http://127.0.0.1:8080/admin", "v4-loopback-port"),
    vector("http://2130706433/", "v4-loopback-decimal"),
    vector("http://0177.0.0.1/", "v4-loopback-octal"),
    vector("http://0177.1/", "v4-loopback-octal-short"),
    vector("http://0x7f.1/", "v4-loopback-hex-short"),
    vector("http://0x7f000001/", "v4-loopback-hex"),
    vector("http://0x7f.0x0.0x0.0x1/", "v4-loopback-hex-dotted"),
    vector("http://127.1/", "v4-loopback-short"),
    vector("http://127.0.0.1./", "v4-loopback-trailing-dot"),
    vector("http://127.255.255.254/", "v4-loopback-range"),
    # unspecified
    vector("http://0.0.0.0/", "v4-unspecified"),
    vector("http://0/", "v4-unspecified-short"),
    # private ranges
    vector("http://10.0.0.1/", "v4-private-10"),
    vector("http://012.0.0.1/", "v4-private-10-octal"),
    vector("http://167772161/", "v4-private-10-decimal"),
    vector("http://172.16.0.1/", "v4-private-172-16"),
    vector("http://172.31.255.255/", "v4-private-172-31"),
    vector("http://192.168.1.1/", "v4-private-192-168"),
    vector("http://0xc0.0xa8.1.1/", "v4-private-192-168-hex"),
    # cloud metadata / link-local
    vector("http://169.254.169.254/latest/meta-data/", "v4-metadata"),
    vector("http://2852039166/latest/meta-data/", "v4-metadata-decimal"),
    vector("http://0xa9fea9fe/", "v4-metadata-hex"),
    vector("http://0251.0376.0251.0376/", "v4-metadata-octal"),
    vector("http://169.254.1.1/", "v4-link-local"),
    # CGNAT, multicast, reserved, broadcast, benchmarking
    vector("http://100.64.0.1/", "v4-cgnat"),
    vector("http://224.0.0.1/", "v4-multicast"),
    vector("http://240.0.0.1/", "v4-reserved"),
    vector("http://255.255.255.255/", "v4-broadcast"),
    vector("http://198.18.0.1/", "v4-benchmarking"),
    # IPv6 forms
    vector("http://[::1]/", "v6-loopback"),
    vector("http://[0:0:0:0:0:0:0:1]:8080/", "v6-loopback-long"),
    vector("http://[::]/", "v6-unspecified"),
    vector("http://[::ffff:127.0.0.1]/", "v6-mapped-loopback"),
    vector("http://[::ffff:7f00:1]/", "v6-mapped-loopback-hex"),
    vector("http://[0:0:0:0:0:ffff:a9fe:a9fe]/", "v6-mapped-metadata"),
    vector("http://[::ffff:8.8.8.8]/", "v6-mapped-even-public"),
    vector("http://[::127.0.0.1]/", "v6-compatible-loopback"),
    vector("http://[fe80::1]/", "v6-link-local"),
    vector("http://[fe80::1%25eth0]/", "v6-link-local-zone"),
    vector("http://[fc00::1]/", "v6-unique-local"),
    vector("http://[fd00:ec2::254]/", "v6-aws-metadata"),
    vector("http://[fec0::1]/", "v6-site-local"),
    vector("http://[ff02::1]/", "v6-multicast"),
    vector("http://[64:ff9b::7f00:1]/", "v6-nat64-loopback"),
    vector("http://[64:ff9b::a9fe:a9fe]/", "v6-nat64-metadata"),
    vector("http://[64:ff9b:1::a00:1]/", "v6-nat64-local-use"),
    vector("http://[2002:7f00:1::]/", "v6-6to4-loopback"),
    vector("http://[2002:a9fe:a9fe::]/", "v6-6to4-metadata"),
    vector("http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/", "v6-teredo"),
    vector("http://[2001:db8::1]/", "v6-documentation"),
    # names that resolve (fake resolver) to forbidden addresses
    vector("http://metadata.google.internal/computeMetadata/v1/", "dns-metadata", "metadata.google.internal"),
    vector("http://localtest.me/", "dns-loopback", "localtest.me"),
    vector("http://LOCALHOST./", "dns-localhost-upper-dot", "localhost"),
    vector("http://internal.example/", "dns-private-10", "internal.example"),
    vector("http://v6-loopback.example/", "dns-v6-loopback", "v6-loopback.example"),
    vector("http://mapped.example/", "dns-v6-mapped", "mapped.example"),
    vector("http://rebind.example/", "dns-public-plus-private", "rebind.example"),
    vector("http://rebind-v6.example/", "dns-v6-public-plus-ula", "rebind-v6.example"),
    vector("http://cgnat.example/", "dns-cgnat", "cgnat.example"),
    vector("http://nat64.example/", "dns-nat64-metadata", "nat64.example"),
    vector("http://linklocal6.example/", "dns-v6-link-local", "linklocal6.example"),
    # userinfo tricks and malformed hosts
    vector("http://example.com@127.0.0.1/", "userinfo-at-loopback"),
    vector("http://user:pass@public.example/", "userinfo-credentials"),
    vector("http://public.example:80@10.0.0.1/", "userinfo-port-trick"),
    vector("http://%31%32%37.0.0.1/", "percent-encoded-host"),
    vector("http://127.0.0.1%00.public.example/", "nul-in-host"),
    vector("http:///etc/passwd", "no-host"),
    vector("http://public.example:0/", "port-zero"),
    vector("http://public.example:70000/", "port-out-of-range"),
    vector("http://1.2.3.4.5/", "five-part-ipv4"),
    vector("http://256.0.0.1/", "ipv4-octet-too-big"),
    # other schemes
    vector("file:///etc/passwd", "scheme-file"),
    vector("gopher://127.0.0.1:25/_HELO", "scheme-gopher"),
    vector("ftp://public.example/x.png", "scheme-ftp"),
    vector("dict://127.0.0.1:11211/stat", "scheme-dict"),
    vector("ldap://127.0.0.1/", "scheme-ldap"),
    vector("ws://public.example/", "scheme-ws"),
    vector("javascript:alert(1)", "scheme-javascript"),
    vector("//127.0.0.1/", "scheme-relative"),
]


def test_table_is_big_enough():
    assert len(SSRF_VECTORS) >= 25


@pytest.mark.parametrize(("url", "resolves"), SSRF_VECTORS)
def test_ssrf_vector_refused(url, resolves, net_guard):
    resolver = FakeResolver()
    with pytest.raises(UrlRefused) as sync_refusal:
        check_target(url, STRICT, resolver)
    assert resolver.calls == ([resolves] if resolves else [])  # literals never reach a resolver

    resolver = FakeResolver()
    with pytest.raises(UrlRefused):
        check_webhook_url(url, STRICT, resolver)

    resolver = FakeResolver()
    with pytest.raises(UrlRefused) as async_refusal:
        run(fetch(url, STRICT, resolver))
    assert resolver.calls == ([resolves] if resolves else [])  # resolved once at most
    assert str(async_refusal.value) == str(sync_refusal.value)
    assert_only_connected_to(net_guard, None)  # refused before any connection

    message = str(sync_refusal.value)
    if resolves:  # the host may be named; what it resolved to is not disclosed
        for address in DNS[resolves]:
            assert address not in message
    assert "user:pass" not in message


@pytest.mark.parametrize(
    "url",
    [
        "http://[::ffff:127.0.0.1]/", "http://[::1]/", "http://0.0.0.0/", "http://127.0.0.2/",
        "http://v6-loopback.example/", "http://mapped.example/", "http://localhost/",
        "http://169.254.169.254/", "http://10.0.0.1/",
    ],
)
def test_loopback_allowlist_opens_exactly_127_0_0_1(url, net_guard):
    with pytest.raises(UrlRefused):
        check_target(url, LOOPBACK, FakeResolver())
    with pytest.raises(UrlRefused):
        run(fetch(url, LOOPBACK, FakeResolver()))
    assert_only_connected_to(net_guard, None)


# -- redirects to forbidden places: refused before connecting -----------------------------------
def _redirect_targets(port: int):
    return [
        pytest.param(302, "http://169.254.169.254/latest/meta-data/", id="302-metadata"),
        pytest.param(302, "http://10.0.0.1/", id="302-private-10"),
        pytest.param(302, "http://[::1]:{port}/img.png", id="302-v6-loopback-same-port"),
        pytest.param(302, "file:///etc/passwd", id="302-file"),
        pytest.param(302, "data:image/png;base64," + base64.b64encode(PNG).decode(), id="302-data-uri"),
        pytest.param(301, "http://2852039166/", id="301-metadata-decimal"),
        pytest.param(303, "http://0x7f.1:{port}/img.png", id="303-loopback-hex-other-spelling"),
        pytest.param(307, "http://metadata.google.internal/", id="307-dns-metadata"),
        pytest.param(308, "//192.168.0.1/", id="308-scheme-relative-private"),
        pytest.param(302, "http://rebind.example/", id="302-dns-public-plus-private"),
        pytest.param(302, "gopher://127.0.0.1:{port}/", id="302-gopher"),
        pytest.param(302, "http://user:pw@127.0.0.1:{port}/img.png", id="302-userinfo"),
    ]


@pytest.mark.parametrize(("status", "location"), _redirect_targets(0))
def test_redirect_to_forbidden_target_refused(server, net_guard, status, location):
    location = location.format(port=server.port)
    policy = FetchPolicy(allow=("127.0.0.1/32",), max_bytes=100_000, connect_timeout=2, read_timeout=2)
    if location.startswith("http://0x7f.1"):
        policy = STRICT_WITH_NAME  # the server is allowed by name only: 127.0.0.1 in any spelling is not
        start = server.url(f"/redirect/{status}", host="images.example")
    else:
        start = server.url(f"/redirect/{status}")
    resolver = FakeResolver()
    with pytest.raises(UrlRefused, match="redirect refused"):
        run(fetch(start + "?" + str(httpx.QueryParams({"to": location})), policy, resolver))
    assert len(server.seen) == 1  # the first hop only
    assert_only_connected_to(net_guard, server.port)
    assert all(name in ("images.example", "metadata.google.internal", "rebind.example") for name in resolver.calls)



def test_redirect_chain_longer_than_max_redirects_refused(server, net_guard):
    policy = FetchPolicy(allow=("127.0.0.1/32",), max_bytes=100_000, max_redirects=3)
    with pytest.raises(UrlRefused, match="too many redirects"):
        run(fetch(server.url("/chain/4"), policy, FakeResolver()))
    assert [seen.path for seen in server.seen] == ["/chain/4", "/chain/3", "/chain/2", "/chain/1"]
    assert_only_connected_to(net_guard, server.port)


def test_zero_redirects_allowed_means_none_followed(server):
    policy = FetchPolicy(allow=("127.0.0.1/32",), max_bytes=100_000, max_redirects=0)
    with pytest.raises(UrlRefused, match="too many redirects"):
        run(fetch(server.url("/chain/1"), policy, FakeResolver()))
    assert len(server.seen) == 1


def test_redirect_within_allowlist_is_followed(server, net_guard):
    resolver = FakeResolver()
    data = run(fetch(server.url("/chain/3", host="images.example"), LOOPBACK, resolver))
    assert data == PNG
    assert [seen.path for seen in server.seen] == ["/chain/3", "/chain/2", "/chain/1", "/chain/0"]
    assert {seen.host for seen in server.seen} == {f"images.example:{server.port}"}  # relative: same host
    assert resolver.calls == ["images.example"] * 4  # each hop checked, once
    assert_only_connected_to(net_guard, server.port)


def test_absolute_redirect_to_other_allowed_host_is_checked_and_followed(server, net_guard):
    resolver = FakeResolver()
    to = server.url("/img.png", host="storage.internal")
    data = run(fetch(server.url("/redirect/307") + "?" + str(httpx.QueryParams({"to": to})), LOOPBACK, resolver))
    assert data == PNG
    assert [seen.host for seen in server.seen] == [f"127.0.0.1:{server.port}", f"storage.internal:{server.port}"]
    assert resolver.calls == ["storage.internal"]
    assert_only_connected_to(net_guard, server.port)


# -- positive cases ------------------------------------------------------------------------------
def test_allowlisted_loopback_server_serves_image(server, net_guard):
    assert run(fetch(server.url("/img.png"), LOOPBACK, FakeResolver())) == PNG
    assert_only_connected_to(net_guard, server.port)


def test_public_looking_name_is_pinned_to_checked_address_with_host_header(server, net_guard):
    resolver = FakeResolver()
    data = run(fetch(server.url("/img.png", host="images.example"), LOOPBACK, resolver))
    assert data == PNG
    assert resolver.calls == ["images.example"]  # resolved once, by our resolver only
    assert [(s.path, s.host) for s in server.seen] == [("/img.png", f"images.example:{server.port}")]
    assert net_guard.connects == [("127.0.0.1", server.port)]  # the request really went to 127.0.0.1


def test_allowlist_by_hostname(server, net_guard):
    policy = FetchPolicy(allow=("Storage.Internal",), max_bytes=100_000)
    assert run(fetch(server.url("/img.png", host="storage.internal"), policy, FakeResolver())) == PNG
    assert run(fetch(server.url("/img.png", host="STORAGE.internal."), policy, FakeResolver())) == PNG
    # only that name: the same address under another name, or as a literal, stays refused
    for url in (server.url("/img.png", host="images.example"), server.url("/img.png")):
        with pytest.raises(UrlRefused):
            run(fetch(url, policy, FakeResolver()))
    # and no suffix matching
    with pytest.raises(UrlRefused):
        check_target("http://evil.storage.internal/", policy, FakeResolver({"evil.storage.internal": ["127.0.0.1"]}))
    assert_only_connected_to(net_guard, server.port)
    assert len(server.seen) == 2


def test_content_type_is_not_trusted_bytes_are_sniffed(server):
    assert run(fetch(server.url("/img-as-text"), LOOPBACK, FakeResolver(), expect_image=True)) == PNG
    with pytest.raises(FetchError, match="not a PNG, JPEG, WebP or GIF"):
        run(fetch(server.url("/text-as-png"), LOOPBACK, FakeResolver(), expect_image=True))
    # without expect_image the bytes come back as they are
    assert run(fetch(server.url("/text-as-png"), LOOPBACK, FakeResolver())).startswith(b"<html>")


def test_size_cap_enforced_while_streaming_without_content_length(server):
    policy = FetchPolicy(allow=("127.0.0.1/32",), max_bytes=100_000, read_timeout=2)
    started = time.monotonic()
    with pytest.raises(FetchError, match="larger than 100000 bytes"):
        run(fetch(server.url("/big-chunked?n=20000000"), policy, FakeResolver()))
    assert time.monotonic() - started < 5  # stopped early, not after 20 MB


def test_size_cap_enforced_on_content_length_before_reading(server):
    policy = FetchPolicy(allow=("127.0.0.1/32",), max_bytes=100_000, read_timeout=1)
    started = time.monotonic()
    with pytest.raises(FetchError, match="larger than 100000 bytes"):
        run(fetch(server.url("/big-content-length"), policy, FakeResolver()))
    assert time.monotonic() - started < 1  # refused on the header, not after waiting for the body


def test_body_of_exactly_max_bytes_is_accepted(server):
    policy = FetchPolicy(allow=("127.0.0.1/32",), max_bytes=len(PNG))
    assert run(fetch(server.url("/img.png"), policy, FakeResolver())) == PNG
    with pytest.raises(FetchError, match="larger than"):
        run(fetch(server.url("/img.png"), FetchPolicy(allow=("127.0.0.1/32",), max_bytes=len(PNG) - 1),
                  FakeResolver()))


def test_read_timeout_gives_clear_error_quickly(server):
    policy = FetchPolicy(allow=("127.0.0.1/32",), max_bytes=100_000, connect_timeout=1, read_timeout=0.3)
    started = time.monotonic()
    with pytest.raises(FetchError, match="timed out"):
        run(fetch(server.url("/stall"), policy, FakeResolver()))
    assert time.monotonic() - started < 2


def test_total_timeout_stops_a_slow_drip(server):
    policy = FetchPolicy(allow=("127.0.0.1/32",), max_bytes=100_000, read_timeout=1, total_timeout=0.5)
    started = time.monotonic()
    with pytest.raises(FetchError, match="timed out"):
        run(fetch(server.url("/drip"), policy, FakeResolver()))
    assert time.monotonic() - started < 2


def test_non_200_is_an_error(server):
    with pytest.raises(FetchError, match="it answered HTTP 404"):
        run(fetch(server.url("/status/404"), LOOPBACK, FakeResolver()))
    with pytest.raises(FetchError, match="it answered HTTP 204"):
        run(fetch(server.url("/status/204"), LOOPBACK, FakeResolver()))


def test_connection_refused_is_a_clear_error(net_guard):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(FetchError, match="could not connect"):
        run(fetch(f"http://127.0.0.1:{port}/x.png", LOOPBACK, FakeResolver()))
    assert net_guard.connects == [("127.0.0.1", port)]


def test_unresolvable_name_is_a_fetch_error():
    resolver = FakeResolver()
    with pytest.raises(FetchError, match="could not be resolved") as refusal:
        run(fetch("http://no-such-host.example/", STRICT, resolver))
    assert not isinstance(refusal.value, UrlRefused)
    assert resolver.calls == ["no-such-host.example"]


def test_slow_resolver_times_out():
    def slow(host, port):
        time.sleep(0.4)
        return ["127.0.0.1"]

    policy = FetchPolicy(allow=("127.0.0.1/32",), connect_timeout=0.1)
    with pytest.raises(FetchError, match="timed out resolving"):
        run(check_target_async("http://images.example/", policy, slow))


def test_data_uri_accepted_at_top_level_only():
    uri = "data:image/png;base64," + base64.b64encode(PNG).decode()
    assert run(fetch(uri, STRICT, FakeResolver(), expect_image=True)) == PNG
    with pytest.raises(FetchError, match="base64"):
        run(fetch("data:image/png,rawbytes", STRICT, FakeResolver()))
    with pytest.raises(FetchError, match="larger than"):
        decode_data_uri(uri, len(PNG) - 1)
    with pytest.raises(UrlRefused, match="only http and https"):
        run(fetch(uri, STRICT, FakeResolver(), allow_data=False))
    with pytest.raises(UrlRefused, match="only http and https"):
        check_target(uri, STRICT, FakeResolver())


# -- TLS: pinned to the IP, SNI and certificate checks use the real name --------------------------
@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=images.example",
         "-addext", "subjectAltName=DNS:images.example"],
        check=True, capture_output=True, timeout=30,
    )
    return cert, key


@contextmanager
def tls_server(cert, key):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    srv = TestServer(tls=context)
    context.sni_callback = lambda sock, name, ctx: srv.sni.append(name)
    with srv:
        yield srv


def test_https_is_pinned_and_verifies_the_real_name(tls_files, net_guard):
    cert, key = tls_files
    verify = ssl.create_default_context(cafile=str(cert))
    resolver = FakeResolver()

    async def go(url):
        async with guarded_client(verify=verify) as client:
            return await fetch_bytes(url, policy=LOOPBACK, client=client, resolver=resolver)

    with tls_server(cert, key) as srv:
        assert run(go(srv.url("/img.png", host="images.example", scheme="https"))) == PNG
        assert srv.sni == ["images.example"]  # SNI carried the name, not the IP
        assert [(s.host, s.sni) for s in srv.seen] == [(f"images.example:{srv.port}", "images.example")]
        # a name the certificate does not cover fails verification although the IP is the same
        with pytest.raises(FetchError, match="could not connect"):
            run(go(srv.url("/img.png", host="other.example", scheme="https")))
        assert len(srv.seen) == 1
        assert {c for c in net_guard.connects} == {("127.0.0.1", srv.port)}


# -- webhooks ------------------------------------------------------------------------------------
def test_check_webhook_url_refuses_private_and_accepts_allowlisted(server, net_guard):
    for url in ("http://10.0.0.1/hook", "http://localtest.me/hook", "http://169.254.169.254/",
                "https://[::1]/hook", "http://internal.example:8080/hook", "ftp://public.example/"):
        with pytest.raises(UrlRefused):
            check_webhook_url(url, STRICT, FakeResolver())
    target = check_webhook_url("https://public.example/hook?token=s3cret", STRICT, FakeResolver())
    assert target == Target("https", "public.example", 443, PUBLIC_V4)

    url = server.url("/status/204?token=s3cret", host="images.example")
    target = check_webhook_url(url, LOOPBACK, FakeResolver())
    assert target == Target("http", "images.example", server.port, "127.0.0.1")
    request_url, headers, extensions = pinned(target, url)
    with httpx.Client(trust_env=False, follow_redirects=False) as client:  # the dispatcher's recipe
        with client.stream("POST", request_url, content=b"{}", headers={"X-Test": "1", **headers},
                           extensions=extensions) as response:
            assert response.status_code == 204
    assert [(s.path, s.host) for s in server.seen] == [("/status/204?token=s3cret", f"images.example:{server.port}")]
    assert_only_connected_to(net_guard, server.port)


def test_webhook_error_messages_name_the_host_not_the_path():
    with pytest.raises(UrlRefused) as refusal:
        check_webhook_url("http://internal.example/hook?token=s3cret", STRICT, FakeResolver())
    assert "internal.example" in str(refusal.value)
    assert "s3cret" not in str(refusal.value) and "10.0.0.5" not in str(refusal.value)


# -- pinning -------------------------------------------------------------------------------------
def test_pinned_http_ipv4():
    target = Target("http", "images.example", 8080, "127.0.0.1")
    url, headers, extensions = pinned(target, "http://images.example:8080/a/b.png?x=1#frag")
    assert str(url) == "http://127.0.0.1:8080/a/b.png?x=1"
    assert headers == {"Host": "images.example:8080"}
    assert extensions == {}


def test_pinned_https_ipv6_default_port():
    target = Target("https", "images.example", 443, "2606:4700:4700::1111")
    url, headers, extensions = pinned(target, "https://images.example/x.png")
    assert url.host == "2606:4700:4700::1111" and str(url).startswith("https://[2606:4700:4700::1111]")
    assert headers == {"Host": "images.example"}
    assert extensions == {"sni_hostname": "images.example"}


def test_pinned_ip_literal_https_has_no_sni_override():
    target = check_target("https://[2606:4700:4700::1111]:8443/x", STRICT, FakeResolver())
    url, headers, extensions = pinned(target, "https://[2606:4700:4700::1111]:8443/x")
    assert headers == {"Host": "[2606:4700:4700::1111]:8443"}
    assert extensions == {}


def test_check_target_returns_first_address_and_resolves_once():
    resolver = FakeResolver()
    target = check_target("https://public.example/x.png", STRICT, resolver)
    assert target == Target("https", "public.example", 443, PUBLIC_V4)
    assert resolver.calls == ["public.example"]
    target = run(check_target_async("http://public.example:8080/", STRICT, resolver))
    assert target == Target("http", "public.example", 8080, PUBLIC_V4)


def test_idn_host_is_resolved_as_ascii():
    resolver = FakeResolver({"xn--mnchen-3ya.de": [PUBLIC_V4]})
    target = check_target("http://münchen.de/x.png", STRICT, resolver)
    assert target.host == "xn--mnchen-3ya.de" and resolver.calls == ["xn--mnchen-3ya.de"]


# -- policy --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "entry",
    ["10.0.0.1/8", "10.0.0.0/33", "::1/200", "not a host!", "", "   ", "http://storage.internal",
     "storage.internal:9000", "*.example.com", "999.1.1.1", "10.0.0", "a..b", 42, None],
)
def test_policy_rejects_malformed_allow_entries(entry):
    with pytest.raises(ValueError):
        FetchPolicy(allow=(entry,))


@pytest.mark.parametrize(
    "kwargs",
    [{"max_bytes": 0}, {"max_bytes": -1}, {"connect_timeout": 0}, {"read_timeout": -1},
     {"max_redirects": -1}, {"total_timeout": 0}],
)
def test_policy_rejects_bad_numbers(kwargs):
    with pytest.raises(ValueError):
        FetchPolicy(**kwargs)


def test_policy_from_strings():
    policy = FetchPolicy.from_strings("Minio.Internal, 10.0.0.0/8  ::1/128,192.168.1.7", max_bytes=1000)
    assert policy.allow == ("Minio.Internal", "10.0.0.0/8", "::1/128", "192.168.1.7")
    assert policy.max_bytes == 1000
    assert policy.host_allowed("minio.internal.")
    assert policy.network_allowed(ipaddress.ip_address("10.200.0.1"))
    assert policy.network_allowed(ipaddress.ip_address("::1"))
    assert policy.network_allowed(ipaddress.ip_address("192.168.1.7"))
    assert not policy.network_allowed(ipaddress.ip_address("192.168.1.8"))
    assert FetchPolicy.from_strings("").allow == ()
    assert FetchPolicy.from_strings(None).allow == ()
    assert FetchPolicy.from_strings(["a.example", " 10.0.0.0/8 "]).allow == ("a.example", "10.0.0.0/8")
    with pytest.raises(ValueError):
        FetchPolicy.from_strings("ok.example, 10.0.0.1/8")


def test_allowlisted_cidr_opens_only_that_range():
    policy = FetchPolicy(allow=("10.1.0.0/16",))
    assert check_target("http://10.1.2.3/", policy, FakeResolver()).address == "10.1.2.3"
    assert check_target("http://storage.example/", policy, FakeResolver({"storage.example": ["10.1.0.9"]})).address \
        == "10.1.0.9"
    for url in ("http://10.2.0.1/", "http://169.254.169.254/", "http://127.0.0.1/"):
        with pytest.raises(UrlRefused):
            check_target(url, policy, FakeResolver())
    with pytest.raises(UrlRefused):  # one allowed and one not: refused
        check_target("http://mixed.example/", policy, FakeResolver({"mixed.example": ["10.1.0.9", "10.2.0.9"]}))


# -- helpers -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [("2130706433", "127.0.0.1"), ("0177.0.0.1", "127.0.0.1"), ("0x7f.1", "127.0.0.1"), ("127.1", "127.0.0.1"),
     ("0", "0.0.0.0"), ("2852039166", "169.254.169.254"), ("0xA9.0376.43518", "169.254.169.254"),
     ("10.0.0.1.", "10.0.0.1"), ("1.2.3.4", "1.2.3.4")],
)
def test_ipv4_number_forms(text, expected):
    assert str(_parse_ipv4_number_forms(text)) == expected


@pytest.mark.parametrize("text", ["example.com", "1e1", "a.b.c.1x", "localhost"])
def test_names_are_not_number_forms(text):
    assert _parse_ipv4_number_forms(text) is None


@pytest.mark.parametrize("text", ["0x", "1.2.3.4.5", "256.0.0.1", "1.16777216", "4294967296", "08.1.1.1", "1..1"])
def test_invalid_number_forms_refused(text):
    with pytest.raises(UrlRefused):
        _parse_ipv4_number_forms(text)


@pytest.mark.parametrize("address", ["8.8.8.8", PUBLIC_V4, PUBLIC_V6, "2a00:1450:4001:80b::200e"])
def test_public_addresses(address):
    assert is_public_address(address)


def test_sniff_image_format():
    assert sniff_image_format(PNG) == "PNG"
    assert sniff_image_format(b"\xff\xd8\xff\xe0rest") == "JPEG"
    assert sniff_image_format(b"GIF89a....") == "GIF"
    assert sniff_image_format(b"RIFF\0\0\0\0WEBPVP8 ") == "WEBP"
    assert sniff_image_format(b"<svg xmlns=...") is None


def test_system_resolver_numeric_loopback():
    assert system_resolver("127.0.0.1", 80) == ["127.0.0.1"]


# -- what a refusal tells the client --------------------------------------------------------------
@pytest.mark.parametrize(("url", "entry"), [
    ("http://10.0.0.1/a.png", "10.0.0.1"), ("http://[::1]/a.png", "::1"), ("http://localhost/a.png", "localhost"),
])
def test_a_refusal_names_the_setting_and_the_entry_that_allows_it(url, entry):
    with pytest.raises(UrlRefused) as refused:
        check_target(url, FetchPolicy(), FakeResolver())
    message = str(refused.value)
    assert f"""FLUXSERVE_FETCH_ALLOW='["{entry}"]'""" in message, message
    assert check_target(url, FetchPolicy(allow=(entry,)), FakeResolver()).host == entry  # the advice works


def test_the_named_setting_is_the_one_settings_reads():
    from fluxserve.config import env_name
    from fluxserve.fetching import ALLOW_SETTING

    assert ALLOW_SETTING == env_name("fetch_allow")
