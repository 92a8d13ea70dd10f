"""Fetching URLs that strangers send without becoming a proxy into our own network (SSRF).

Used for ``init_image`` / ``init_image_2`` downloads (:func:`fetch_bytes`, async) and before
every webhook POST (:func:`check_webhook_url` + :func:`pinned`, sync).

The rules:

* only ``http`` and ``https`` (``fetch_bytes`` also takes base64 ``data:`` URIs, never via a
  redirect); no credentials in the URL; ports 1-65535;
* the host name is resolved ONCE, every resolved address must be allowed (a name that resolves
  to one public and one private address is refused), and the connection is pinned to the
  checked address: the request goes to the IP with the original ``Host`` header and, for
  https, the real name as TLS SNI / certificate name (httpcore's ``sni_hostname`` extension);
* allowed = the host is in the operator allowlist, or the address is inside an allowlisted
  CIDR, or the address is public: not loopback, private, link-local (cloud metadata
  169.254.169.254), CGNAT, multicast, reserved, unspecified, site-local, IPv4-mapped IPv6,
  NAT64 / 6to4 / Teredo wrapping of a non-public IPv4, or anything else ``ipaddress`` does
  not call global;
* numeric hosts in odd forms (``2130706433``, ``0x7f.1``, ``0177.0.0.1``, ``127.1``) are
  normalised the way ``inet_aton`` reads them and checked as the address they mean; they
  never reach the resolver;
* redirects (301/302/303/307/308) are followed by hand, at most ``max_redirects``, each hop
  checked like the first URL; connect / read timeouts and an overall deadline; the size cap is
  enforced on ``Content-Length`` and again while streaming.

All failures raise :class:`FetchError` (:class:`UrlRefused` for policy refusals); their
messages are safe to show to the client and may name the host but never a resolved address
of a name, credentials, the path or the query.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import json
import re
import socket
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

import httpx

__all__ = [
    "FetchError", "UrlRefused", "FetchPolicy", "Target", "Resolver", "AsyncResolver",
    "system_resolver", "async_resolver", "check_target", "check_target_async", "check_webhook_url",
    "pinned", "fetch_bytes", "decode_data_uri", "is_public_address", "sniff_image_format",
    "REDIRECT_STATUS", "DEFAULT_MAX_BYTES",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: ``resolver(host, port) -> ["93.184.215.14", "2606:2800::1", ...]`` (sync; may raise OSError).
Resolver = Callable[[str, int], list[str]]
AsyncResolver = Callable[[str, int], Awaitable[list[str]]]

DEFAULT_MAX_BYTES = 20 * 1024 * 1024
DEFAULT_PORTS = {"http": 80, "https": 443}
REDIRECT_STATUS = frozenset({301, 302, 303, 307, 308})
MAX_URL_CHARS = 8192
ALLOW_SETTING = "FLUXSERVE_FETCH_ALLOW"  # the setting that allows private hosts (config.Settings.fetch_allow)
_MAX_HOST_IN_MESSAGE = 100

_NAT64_WELL_KNOWN = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_LABEL = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")
_NUMBER_LIKE = re.compile(r"^(?:0[xX][0-9A-Fa-f]*|[0-9]+)$")


class FetchError(ValueError):
    """A URL that could not be fetched. The message is safe to show to the client; the HTTP
    layer answers 400 "Unable to fetch image from provided URL: <message>"."""


class UrlRefused(FetchError):
    """The URL (or a redirect) points somewhere this server may not go."""


# -- policy --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FetchPolicy:
    """What may be fetched. ``allow`` holds host names (exact, case-insensitive) and/or CIDRs
    ("10.0.0.0/8", "127.0.0.1/32", "::1/128"; a bare IP means that one address). Malformed
    entries raise ValueError at construction."""

    allow: tuple[str, ...] = ()
    max_bytes: int = DEFAULT_MAX_BYTES
    connect_timeout: float = 5.0
    read_timeout: float = 20.0
    max_redirects: int = 3
    total_timeout: float = 60.0  # the whole fetch, redirects included (slow-drip servers)
    _hosts: frozenset[str] = field(init=False, repr=False, compare=False, default=frozenset())
    _networks: tuple[IPNetwork, ...] = field(init=False, repr=False, compare=False, default=())

    def __post_init__(self) -> None:
        allow = (self.allow,) if isinstance(self.allow, str) else tuple(self.allow)
        hosts: set[str] = set()
        networks: list[IPNetwork] = []
        for entry in allow:
            parsed = _parse_allow_entry(entry)
            if isinstance(parsed, str):
                hosts.add(parsed)
            else:
                networks.append(parsed)
        object.__setattr__(self, "allow", tuple(allow))
        object.__setattr__(self, "_hosts", frozenset(hosts))
        object.__setattr__(self, "_networks", tuple(networks))
        if isinstance(self.max_bytes, bool) or not isinstance(self.max_bytes, int) or self.max_bytes <= 0:
            raise ValueError("max_bytes must be a positive integer")
        for name in ("connect_timeout", "read_timeout", "total_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a positive number of seconds")
        if isinstance(self.max_redirects, bool) or not isinstance(self.max_redirects, int) or self.max_redirects < 0:
            raise ValueError("max_redirects must be an integer >= 0")

    @classmethod
    def from_strings(cls, allow: str | Iterable[str] | None = None, **kwargs) -> FetchPolicy:
        """Build from settings: ``allow`` is a list of entries or one string of entries
        separated by commas and/or whitespace ("minio.internal, 10.1.0.0/16")."""
        if allow is None:
            entries: tuple[str, ...] = ()
        elif isinstance(allow, str):
            entries = tuple(part for part in re.split(r"[\s,]+", allow) if part)
        else:
            entries = tuple(str(part).strip() for part in allow if str(part).strip())
        return cls(allow=entries, **kwargs)

    def host_allowed(self, host: str) -> bool:
        return _normalise_name(host) in self._hosts

    def network_allowed(self, address: IPAddress) -> bool:
        return any(address.version == net.version and address in net for net in self._networks)

    @property
    def timeout(self) -> httpx.Timeout:
        return httpx.Timeout(
            connect=self.connect_timeout, read=self.read_timeout, write=self.read_timeout, pool=self.connect_timeout
        )


def _parse_allow_entry(entry: object) -> str | IPNetwork:
    """A host name (normalised) or a network."""
    if not isinstance(entry, str) or not entry.strip():
        raise ValueError(f"allow entry {entry!r}: expected a host name or a CIDR")
    text = entry.strip()
    if "/" in text or ":" in text:
        try:
            return ipaddress.ip_network(text, strict=True)
        except ValueError as exc:
            raise ValueError(f"allow entry {entry!r} is not a valid CIDR ({exc})") from None
    try:
        return ipaddress.ip_network(text)  # a bare IPv4 address: that one address
    except ValueError:
        pass
    name = _normalise_name(text)
    if not _valid_hostname(name) or _NUMBER_LIKE.match(name.rsplit(".", 1)[-1]):
        raise ValueError(f"allow entry {entry!r}: expected a host name (like minio.internal) or a CIDR")
    return name


# -- address classification ----------------------------------------------------------------------
def is_public_address(address: str | IPAddress) -> bool:
    """True when ``address`` is a globally routable unicast address: not loopback, private,
    link-local, CGNAT, multicast, reserved, unspecified, site-local, and (IPv6) not an
    IPv4-mapped address nor a NAT64 / 6to4 / Teredo wrapping of a non-public IPv4."""
    addr = ipaddress.ip_address(address) if isinstance(address, str) else address
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.scope_id:
            return False
        if addr.ipv4_mapped is not None:
            return False  # ::ffff:a.b.c.d: the OS may connect to the IPv4 address
        if addr.teredo is not None:
            return False
        if addr.sixtofour is not None and not is_public_address(addr.sixtofour):
            return False
        if addr in _NAT64_LOCAL:
            return False
        if addr in _NAT64_WELL_KNOWN:
            embedded = ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
            if not is_public_address(embedded):
                return False
        if addr.is_site_local:
            return False
    elif addr in _CGNAT:
        return False
    return bool(addr.is_global) and not (
        addr.is_multicast or addr.is_reserved or addr.is_unspecified or addr.is_link_local
        or addr.is_loopback or addr.is_private
    )


def _parse_ipv4_number_forms(host: str) -> ipaddress.IPv4Address | None:
    """The address a numeric host means to ``inet_aton`` (and to browsers): "2130706433",
    "0x7f.1", "0177.0.0.1", "127.1" -> 127.0.0.1. None when the host is not numeric (its last
    label is not a number); UrlRefused when it is numeric but not a valid address."""
    text = host[:-1] if host.endswith(".") else host
    parts = text.split(".")
    if not _NUMBER_LIKE.match(parts[-1]):
        return None
    if len(parts) > 4:
        raise UrlRefused(f"{_show(host)} is not a valid IP address")
    numbers = []
    for part in parts:
        try:
            if part[:2].lower() == "0x":
                if len(part) == 2:
                    raise ValueError(part)
                numbers.append(int(part[2:], 16))
            elif len(part) > 1 and part.startswith("0"):
                numbers.append(int(part[1:], 8))
            else:
                if not part.isdigit():
                    raise ValueError(part)
                numbers.append(int(part, 10))
        except ValueError:
            raise UrlRefused(f"{_show(host)} is not a valid IP address") from None
    *head, last = numbers
    if any(n > 255 for n in head) or last >= 256 ** (4 - len(head)):
        raise UrlRefused(f"{_show(host)} is not a valid IP address")
    value = last
    for index, n in enumerate(head):
        value |= n << (8 * (3 - index))
    return ipaddress.IPv4Address(value)


def _normalise_name(host: str) -> str:
    host = host.strip().lower()
    return host[:-1] if host.endswith(".") else host


def _valid_hostname(name: str) -> bool:
    if not name or len(name) > 253:
        return False
    return all(_LABEL.match(label) for label in name.split("."))


def _show(host: str) -> str:
    host = host if len(host) <= _MAX_HOST_IN_MESSAGE else host[: _MAX_HOST_IN_MESSAGE - 3] + "..."
    return repr(host)


# -- resolvers -----------------------------------------------------------------------------------
def system_resolver(host: str, port: int) -> list[str]:
    """The OS resolver (``getaddrinfo``, all families), addresses in its order, deduplicated."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    seen: list[str] = []
    for _family, _type, _proto, _canon, sockaddr in infos:
        address = str(sockaddr[0])
        if address not in seen:
            seen.append(address)
    return seen


def async_resolver(resolver: Resolver | None = None) -> AsyncResolver:
    """Run a sync resolver in a worker thread (``getaddrinfo`` blocks)."""
    sync = resolver or system_resolver

    async def resolve(host: str, port: int) -> list[str]:
        return await asyncio.to_thread(sync, host, port)

    return resolve


# -- checking ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """A checked destination: connect to ``address`` (the one checked IP) on ``port``, and
    speak to it as ``host`` (Host header, TLS SNI and certificate name)."""

    scheme: str
    host: str  # ascii (IDNA) host name without trailing dot, or the canonical IP for literals
    port: int
    address: str  # canonical IP string, no brackets

    @property
    def is_ip_literal(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"


@dataclass(frozen=True)
class _Parsed:
    url: httpx.URL
    scheme: str
    host: str
    port: int
    literal: IPAddress | None


def _parse(url: str | httpx.URL) -> _Parsed:
    if isinstance(url, str) and len(url) > MAX_URL_CHARS:
        raise UrlRefused("the URL is too long")
    try:
        parsed = url if isinstance(url, httpx.URL) else httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError):
        raise UrlRefused("not a valid URL") from None
    scheme = parsed.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise UrlRefused("only http and https URLs are accepted")
    if parsed.userinfo:
        raise UrlRefused("URLs with a user name or password are not accepted")
    try:
        raw_host = parsed.raw_host.decode("ascii")
    except UnicodeDecodeError:
        raise UrlRefused("not a valid URL") from None
    if not raw_host:
        raise UrlRefused("the URL has no host")
    port = parsed.port if parsed.port is not None else DEFAULT_PORTS[scheme]
    if not 0 < port < 65536:
        raise UrlRefused("the URL's port is out of range")
    if ":" in raw_host:  # an IPv6 literal (httpx strips the brackets)
        if "%" in raw_host:
            raise UrlRefused("IPv6 addresses with a zone are not accepted")
        try:
            literal: IPAddress | None = ipaddress.IPv6Address(raw_host)
        except ValueError:
            raise UrlRefused(f"{_show(raw_host)} is not a valid IP address") from None
        return _Parsed(parsed, scheme, str(literal), port, literal)
    host = _normalise_name(raw_host)
    literal = _parse_ipv4_number_forms(host)
    if literal is not None:
        return _Parsed(parsed, scheme, str(literal), port, literal)
    if not _valid_hostname(host):
        raise UrlRefused(f"{_show(raw_host)} is not a valid host name")
    return _Parsed(parsed, scheme, host, port, None)


def _choose(parsed: _Parsed, addresses: Iterable[str], policy: FetchPolicy) -> Target:
    host_allowed = policy.host_allowed(parsed.host)
    checked: list[IPAddress] = []
    for text in addresses:
        try:
            address = ipaddress.ip_address(str(text))
        except ValueError:
            raise UrlRefused(f"host {_show(parsed.host)} resolved to something that is not an IP address") from None
        if address not in checked:
            checked.append(address)
    if not checked:
        raise FetchError(f"host {_show(parsed.host)} could not be resolved")
    for address in checked:
        if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
            raise UrlRefused(f"host {_show(parsed.host)} resolves to an address with a zone; not allowed")
        if not (host_allowed or policy.network_allowed(address) or is_public_address(address)):
            if parsed.literal is not None:
                raise UrlRefused(
                    f"address {_show(parsed.host)} is not allowed (loopback, private, link-local, "
                    f"multicast or reserved addresses are refused){_allow_hint(parsed.host)}"
                )
            raise UrlRefused(
                f"host {_show(parsed.host)} resolves to an address that is not allowed (loopback, private, "
                f"link-local, multicast or reserved addresses are refused){_allow_hint(parsed.host)}"
            )
    return Target(parsed.scheme, parsed.host, parsed.port, str(checked[0]))


def _allow_hint(host: str) -> str:
    """How the server's operator allows a refused host (the one setting that does)."""
    shown = host.strip("[]") if len(host) <= _MAX_HOST_IN_MESSAGE else "your.host"
    entry = json.dumps([shown])
    return (f"; if this host is yours, the server's operator can allow it with "
            f"{ALLOW_SETTING}='{entry}' (a JSON list of host names, addresses and CIDRs such as 10.0.0.0/8)")


def _resolve_sync(parsed: _Parsed, resolver: Resolver) -> list[str]:
    try:
        return list(resolver(parsed.host, parsed.port))
    except (OSError, UnicodeError):
        raise FetchError(f"host {_show(parsed.host)} could not be resolved") from None


def check_target(url: str | httpx.URL, policy: FetchPolicy, resolver: Resolver | None = None) -> Target:
    """Check ``url`` against ``policy`` and return where to connect; raises UrlRefused (policy)
    or FetchError (the name does not resolve). Resolves the host at most once, never for IP
    literals (odd numeric IPv4 forms included)."""
    parsed = _parse(url)
    if parsed.literal is not None:
        return _choose(parsed, [str(parsed.literal)], policy)
    return _choose(parsed, _resolve_sync(parsed, resolver or system_resolver), policy)


async def check_target_async(
    url: str | httpx.URL, policy: FetchPolicy, resolver: Resolver | None = None,
) -> Target:
    """:func:`check_target` with the (blocking) resolver run in a worker thread, bounded by
    ``policy.connect_timeout``."""
    parsed = _parse(url)
    if parsed.literal is not None:
        return _choose(parsed, [str(parsed.literal)], policy)
    sync = resolver or system_resolver
    try:
        addresses = await asyncio.wait_for(
            asyncio.to_thread(_resolve_sync, parsed, sync), timeout=policy.connect_timeout
        )
    except asyncio.TimeoutError:
        raise FetchError(f"timed out resolving host {_show(parsed.host)}") from None
    return _choose(parsed, addresses, policy)


def check_webhook_url(url: str | httpx.URL, policy: FetchPolicy, resolver: Resolver | None = None) -> Target:
    """For the webhook dispatcher, before every POST (DNS may have changed since the last one).
    Then POST to ``pinned(target, url)`` so the connection uses the checked address."""
    return check_target(url, policy, resolver)


def pinned(target: Target, url: str | httpx.URL) -> tuple[httpx.URL, dict[str, str], dict[str, object]]:
    """``(url_to_request, headers, extensions)`` that send the request for ``url`` to
    ``target.address``: the URL's host replaced by the IP (bracketed for IPv6 by httpx), the
    original ``Host`` header, and for https ``{"sni_hostname": host}`` so TLS SNI and the
    certificate check use the real name (httpcore reads that request extension). ``url`` must
    be the URL ``target`` was checked from."""
    parsed = url if isinstance(url, httpx.URL) else httpx.URL(url)
    request_url = parsed.copy_with(host=target.address, port=target.port, fragment=None)
    headers = {"Host": target.host_header}
    extensions: dict[str, object] = {}
    if target.scheme == "https" and not target.is_ip_literal:
        extensions["sni_hostname"] = target.host
    return request_url, headers, extensions


# -- content -------------------------------------------------------------------------------------
def sniff_image_format(data: bytes) -> str | None:
    """"PNG" / "JPEG" / "GIF" / "WEBP" from the magic bytes, else None (headers are not trusted)."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


_SNIFF_BYTES = 12
_NOT_AN_IMAGE = "the content is not a PNG, JPEG, WebP or GIF image"


_BASE64_TEXT = re.compile(r"[A-Za-z0-9+/_\-\s]+={0,2}\s*")


def decode_data_uri(uri: str, max_bytes: int, *, expect_image: bool = False) -> bytes:
    """Bytes of a base64 ``data:`` URI, at most ``max_bytes`` (whitespace in the payload, e.g. a
    space after the comma as in ModelsLab's own examples, is ignored)."""
    header, sep, payload = uri.partition(",")
    if not header.lower().startswith("data:") or not sep:
        raise FetchError("not a valid data: URI")
    if ";base64" not in header.lower():
        raise FetchError("data: URIs must be base64 encoded")
    return _decode_base64(payload, max_bytes, "data: URI", expect_image=expect_image)


def is_raw_base64(text: str) -> bool:
    """A bare base64 string (no ``data:`` prefix), as clients send ``image_to_base64()`` output:
    only base64 characters (standard or URL-safe alphabet), long enough to hold an image header."""
    return len(text) >= 16 and _BASE64_TEXT.fullmatch(text) is not None


def decode_raw_base64(text: str, max_bytes: int, *, expect_image: bool = False) -> bytes:
    return _decode_base64(text, max_bytes, "base64 image", expect_image=expect_image)


def _decode_base64(payload: str, max_bytes: int, what: str, *, expect_image: bool = False) -> bytes:
    payload = "".join(payload.split())
    if len(payload) > (max_bytes + 2) // 3 * 4 + 4:
        raise FetchError(f"larger than {max_bytes} bytes")
    try:
        if "-" in payload or "_" in payload:  # the URL-safe alphabet
            data = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
        else:
            data = base64.b64decode(payload + "=" * (-len(payload) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise FetchError(f"{what} is not valid base64") from None
    if len(data) > max_bytes:
        raise FetchError(f"larger than {max_bytes} bytes")
    if expect_image and sniff_image_format(data) is None:
        raise FetchError(_NOT_AN_IMAGE)
    return data


# -- fetching ------------------------------------------------------------------------------------
async def fetch_bytes(
    url: str, *, policy: FetchPolicy, client: httpx.AsyncClient, resolver: Resolver | None = None,
    expect_image: bool = False, allow_data: bool = True,
) -> bytes:
    """GET ``url`` under ``policy`` and return the body (at most ``policy.max_bytes``).

    ``client`` should be dedicated to this: ``httpx.AsyncClient(trust_env=False,
    follow_redirects=False, limits=httpx.Limits(max_keepalive_connections=0))``; its base_url,
    auth and cookies are not wanted here. ``expect_image`` refuses bodies whose first bytes are
    not PNG/JPEG/WebP/GIF (stopping the download early). ``allow_data`` accepts a base64
    ``data:`` URI as the URL itself (never as a redirect target). Raises FetchError."""
    if allow_data and isinstance(url, str) and url[:5].lower() == "data:":
        return decode_data_uri(url, policy.max_bytes, expect_image=expect_image)
    try:
        return await asyncio.wait_for(
            _fetch(url, policy, client, resolver, expect_image), timeout=policy.total_timeout
        )
    except asyncio.TimeoutError:
        raise FetchError(f"timed out after {policy.total_timeout:g}s") from None


async def _fetch(
    url: str, policy: FetchPolicy, client: httpx.AsyncClient, resolver: Resolver | None, expect_image: bool,
) -> bytes:
    current: httpx.URL | str = url
    for hop in range(policy.max_redirects + 1):
        try:
            target = await check_target_async(current, policy, resolver)
        except UrlRefused as exc:
            if hop:
                raise UrlRefused(f"redirect refused: {exc}") from None
            raise
        request_url, headers, extensions = pinned(target, current)
        headers["Accept-Encoding"] = "identity"
        request = client.build_request(
            "GET", request_url, headers=headers, extensions=extensions, timeout=policy.timeout
        )
        try:
            response = await client.send(request, stream=True, follow_redirects=False)
        except httpx.TimeoutException:
            raise FetchError(f"timed out connecting to {_show(target.host)}") from None
        except httpx.ConnectError:
            raise FetchError(f"could not connect to {_show(target.host)}") from None
        except httpx.InvalidURL:  # httpx builds response.next_request even when not following
            raise UrlRefused("redirect refused: not a valid URL") from None
        except httpx.RemoteProtocolError as exc:
            if "location header" in str(exc).lower():
                raise UrlRefused("redirect refused: not a valid URL") from None
            raise FetchError(f"request to {_show(target.host)} failed (RemoteProtocolError)") from None
        except httpx.HTTPError as exc:
            raise FetchError(f"request to {_show(target.host)} failed ({type(exc).__name__})") from None
        try:
            status = response.status_code
            if status in REDIRECT_STATUS:
                location = response.headers.get("location")
                if not location:
                    raise FetchError(f"it answered HTTP {status} without a Location")
                if hop >= policy.max_redirects:
                    raise UrlRefused(f"too many redirects (more than {policy.max_redirects})")
                try:
                    current = httpx.URL(current).join(location)
                except (httpx.InvalidURL, TypeError, ValueError):
                    raise UrlRefused("redirect refused: not a valid URL") from None
                continue
            if status != 200:
                raise FetchError(f"it answered HTTP {status}")
            return await _read_body(response, policy.max_bytes, expect_image, target.host)
        finally:
            await response.aclose()
    raise UrlRefused(f"too many redirects (more than {policy.max_redirects})")  # not reached


async def _read_body(response: httpx.Response, max_bytes: int, expect_image: bool, host: str) -> bytes:
    length = response.headers.get("content-length")
    if length is not None:
        try:
            declared = int(length)
        except ValueError:
            declared = None
        if declared is not None and declared > max_bytes:
            raise FetchError(f"larger than {max_bytes} bytes")
    chunks: list[bytes] = []
    size = 0
    sniffed = not expect_image
    try:
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > max_bytes:
                raise FetchError(f"larger than {max_bytes} bytes")
            chunks.append(chunk)
            if not sniffed and size >= _SNIFF_BYTES:
                if sniff_image_format(b"".join(chunks)) is None:
                    raise FetchError(_NOT_AN_IMAGE)
                sniffed = True
    except httpx.TimeoutException:
        raise FetchError(f"timed out reading from {_show(host)}") from None
    except httpx.HTTPError as exc:
        raise FetchError(f"reading from {_show(host)} failed ({type(exc).__name__})") from None
    data = b"".join(chunks)
    if not sniffed and sniff_image_format(data) is None:
        raise FetchError(_NOT_AN_IMAGE)
    return data
