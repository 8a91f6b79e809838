"""Where a webhook may go, and a connection that goes exactly there.

A client chooses a webhook's URL, and the fleet runs inside a network with things worth
protecting: the cloud metadata endpoint (169.254.169.254, fd00:ec2::254), Redis, the S3
server, anything on loopback or a private range. So the URL's host is resolved once, every
address it resolves to must be a public one, and the connection goes to the checked address
itself: resolving again at connect time would let a DNS answer that changes in between (DNS
rebinding) point the request inside. The Host header stays the URL's host, and over https
the certificate is verified against that name (sent as SNI). Redirects are never followed:
``http.client`` does not follow them, and nothing here does either.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

from tasks.errors import ForbiddenDestination, ValidationFailed

MAX_URL_CHARS = 2048
DEFAULT_PORTS = {"http": 80, "https": 443}

# The URLs a job may name as its webhook, as a regular expression that JSON Schema (ECMA),
# Python and pydantic's Rust engine all read alike: explicit ASCII classes, no lookarounds.
# A host name's last label starts with a letter (RFC 3696: top-level domains are not all
# numeric), so a name can never be read as an IPv4 address.
_LABEL = "[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST_NAME = f"(?:{_LABEL}\\.)*[A-Za-z](?:[A-Za-z0-9-]{{0,61}}[A-Za-z0-9])?\\.?"
_OCTET = "(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
_IPV4 = f"{_OCTET}(?:\\.{_OCTET}){{3}}"
_H16 = "[0-9A-Fa-f]{1,4}"
_LS32 = f"(?:{_H16}:{_H16}|{_IPV4})"
_IPV6 = (
    "(?:"
    + "|".join(  # RFC 3986's IPv6address
        [
            f"(?:{_H16}:){{6}}{_LS32}",
            f"::(?:{_H16}:){{5}}{_LS32}",
            f"(?:{_H16})?::(?:{_H16}:){{4}}{_LS32}",
            f"(?:(?:{_H16}:){{0,1}}{_H16})?::(?:{_H16}:){{3}}{_LS32}",
            f"(?:(?:{_H16}:){{0,2}}{_H16})?::(?:{_H16}:){{2}}{_LS32}",
            f"(?:(?:{_H16}:){{0,3}}{_H16})?::{_H16}:{_LS32}",
            f"(?:(?:{_H16}:){{0,4}}{_H16})?::{_LS32}",
            f"(?:(?:{_H16}:){{0,5}}{_H16})?::{_H16}",
            f"(?:(?:{_H16}:){{0,6}}{_H16})?::",
        ]
    )
    + ")"
)
_PORT = "(?:6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[0-9]{1,4})"
_PATH = "(?:[/?#][!-~]*)?"  # printable ASCII, no spaces


def url_pattern(allow_private: bool) -> str:
    """What ``parse_url`` and the submit-time address check accept, as one pattern: an
    http(s) URL with a host name, or, where private addresses are allowed
    (``FLEET_WEBHOOK_ALLOW_PRIVATE``), a literal IPv4 or IPv6 address. Without that setting a
    literal address is refused even when public: a regular expression cannot tell a public
    address from a forbidden one, and the request schema must say exactly what is accepted."""
    host = f"(?:{_HOST_NAME}|{_IPV4}|\\[{_IPV6}\\])" if allow_private else _HOST_NAME
    return f"^[Hh][Tt][Tt][Pp][Ss]?://{host}(?::{_PORT})?{_PATH}$"


#: NAT64's well-known prefix: a gateway translates 64:ff9b::a.b.c.d to a.b.c.d on its side.
NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


@dataclass(frozen=True)
class Destination:
    """A checked webhook URL: the name it was asked for and the address it will reach."""

    scheme: str
    host: str  # the URL's host: Host header, SNI and the name the certificate must carry
    port: int
    target: str  # path and query, as sent in the request line
    address: str  # the checked IP the connection goes to


def parse_url(url: str) -> SplitResult:
    """The URL's parts, or ``ValidationFailed`` naming what is wrong with it. Syntax only:
    nothing is resolved."""
    if len(url) > MAX_URL_CHARS:
        raise ValidationFailed(f"'webhook' is longer than {MAX_URL_CHARS} characters", field="webhook")
    if not url.isascii() or any(ch.isspace() or not ch.isprintable() for ch in url):
        raise ValidationFailed(
            "'webhook' must be ASCII without spaces (punycode an international domain name)", field="webhook"
        )
    try:
        parts = urlsplit(url)
    except ValueError:  # a bracketed host that is not an IP address: http://[x]/
        raise ValidationFailed("'webhook' has an invalid host", field="webhook") from None
    if parts.scheme not in DEFAULT_PORTS:
        raise ValidationFailed("'webhook' must be an http:// or https:// URL", field="webhook")
    if not parts.hostname:
        raise ValidationFailed("'webhook' has no host", field="webhook")
    try:
        parts.hostname.encode("idna")  # what the resolver will do with it
    except UnicodeError:
        raise ValidationFailed("'webhook' has an invalid host name", field="webhook") from None
    if parts.username is not None or parts.password is not None:
        raise ValidationFailed("'webhook' must not carry credentials", field="webhook")
    try:
        parts.port  # noqa: B018 - raises on a port out of range or not a number
    except ValueError:
        raise ValidationFailed("'webhook' has an invalid port", field="webhook") from None
    return parts


def forbidden_reason(address: str) -> str | None:
    """Why a webhook may not connect to ``address`` (``"loopback"``, ``"private"``, ...), or
    ``None`` for a public address. An IPv6 address that carries an IPv4 one (mapped, 6to4,
    NAT64) is judged by the IPv4 address it reaches."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # a scope id (fe80::1%eth0) is not part of the address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        elif ip.sixtofour is not None:
            ip = ip.sixtofour
        elif ip in NAT64:
            ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    for kind in ("loopback", "link_local", "unspecified", "multicast", "private", "reserved"):
        if getattr(ip, f"is_{kind}"):
            return kind.replace("_", "-")
    if not ip.is_global:  # e.g. 100.64.0.0/10, carrier-grade NAT
        return "not public"
    return None


def check_address(host: str, address: str, allow_private: bool) -> None:
    reason = forbidden_reason(address)
    if reason and not allow_private:
        shown = host if host == address else f"{host} ({address})"
        raise ForbiddenDestination(
            f"'webhook' reaches {shown}, a {reason} address: webhooks go to public addresses only"
        )


def resolve_destination(url: str, allow_private: bool) -> Destination:
    """Resolve the URL's host and check every address it resolves to; the first one is
    where the request goes. Raises ``ValidationFailed`` for a URL that cannot be sent
    (``ForbiddenDestination`` for a forbidden address, unless ``allow_private``) and
    ``OSError`` when the name does not resolve."""
    parts = parse_url(url)
    host, port = parts.hostname or "", parts.port or DEFAULT_PORTS[parts.scheme]  # parse_url wants a host
    addresses = [str(info[4][0]) for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]
    for address in addresses:  # all of them: a name must not smuggle a private address in second place
        check_address(host, address, allow_private)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Destination(parts.scheme, host, port, target, addresses[0])


def open_connection(destination: Destination, timeout_s: float) -> http.client.HTTPConnection:
    """A connection to the destination's checked address that never resolves its name again."""
    if destination.scheme == "https":
        return _PinnedHTTPSConnection(destination, timeout_s)
    return _PinnedHTTPConnection(destination, timeout_s)


class _PinnedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, destination: Destination, timeout_s: float):
        super().__init__(destination.host, destination.port, timeout=timeout_s)
        self.address = destination.address

    def connect(self) -> None:
        self.sock = socket.create_connection((self.address, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, destination: Destination, timeout_s: float):
        self.tls = ssl.create_default_context()  # certificate required, and it must name the host
        super().__init__(destination.host, destination.port, timeout=timeout_s, context=self.tls)
        self.address = destination.address

    def connect(self) -> None:
        sock = socket.create_connection((self.address, self.port), self.timeout)
        try:
            self.sock = self.tls.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise
