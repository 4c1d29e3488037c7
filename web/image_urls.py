"""Fetching a query image from a URL for a client (clip-retrieval's `image_url`) without becoming a proxy into the
server's network: http(s) only, every address the host name resolves to must be public (no private, loopback,
link-local, reserved or multicast address), the connection goes to an address that was checked (no second DNS
answer can swap it: DNS rebinding), no redirects, a size limit and a timeout. Raises QueryError (HTTP 400)."""
from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
from urllib.parse import urlsplit

from search.errors import QueryError

FETCH_TIMEOUT_SECONDS = 10.0
PORTS = {"http": 80, "https": 443}


def is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def public_addresses(host: str, port: int) -> list[str]:
    """Every address `host` resolves to; QueryError unless all of them are public."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise QueryError(f"image_url: cannot resolve {host}") from None
    addresses = sorted({info[4][0] for info in infos})
    private = [a for a in addresses if not is_public(a)]
    if not addresses or private:
        raise QueryError(f"image_url: {host} resolves to a non-public address; only public addresses are fetched")
    return addresses


def _connection(scheme: str, host: str, address: str, port: int) -> http.client.HTTPConnection:
    """A connection to the checked `address` that still names `host` (Host header, TLS SNI and certificate)."""
    if scheme == "http":
        connection = http.client.HTTPConnection(host, port, timeout=FETCH_TIMEOUT_SECONDS)
    else:
        connection = http.client.HTTPSConnection(host, port, timeout=FETCH_TIMEOUT_SECONDS,
                                                 context=ssl.create_default_context())

    def connect() -> None:
        connection.sock = socket.create_connection((address, port), FETCH_TIMEOUT_SECONDS)
        if scheme == "https":
            connection.sock = connection._context.wrap_socket(connection.sock, server_hostname=host)

    connection.connect = connect
    return connection


def fetch_image(url: str, max_bytes: int) -> bytes:
    """The body of `url` (at most `max_bytes`); QueryError for any refusal or failure, saying which."""
    parts = urlsplit(url)
    if parts.scheme not in PORTS or not parts.hostname:
        raise QueryError("image_url must be an http or https URL")
    try:
        port = parts.port or PORTS[parts.scheme]
    except ValueError:
        raise QueryError("image_url has an invalid port") from None
    address = public_addresses(parts.hostname, port)[0]
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    connection = _connection(parts.scheme, parts.hostname, address, port)
    try:
        connection.request("GET", path, headers={"User-Agent": "image-search", "Accept": "image/*"})
        response = connection.getresponse()
        if response.status != 200:
            raise QueryError(f"image_url answered HTTP {response.status} (redirects are not followed)")
        body = response.read(max_bytes + 1)
    except (OSError, http.client.HTTPException) as exc:
        raise QueryError(f"image_url could not be fetched: {exc.__class__.__name__}") from None
    finally:
        connection.close()
    if len(body) > max_bytes:
        raise QueryError(f"image_url is larger than the upload limit ({max_bytes} bytes)")
    return body
