"""Fetching an ``http(s)`` image URL for a request (``--allow-image-urls``; off by default), guarded against
server-side request forgery: a client must not make the server reach what only the server can reach.

The host is resolved once and every address must be public (not private, loopback, link-local, multicast,
reserved or unspecified: cloud metadata at 169.254.169.254 and the server's own ports included); the connection
then goes to that checked address (TLS still verifies the certificate against the host name), so DNS cannot
answer differently between the check and the connection. Redirects are not followed (one could point inside);
the body is bounded in bytes as it arrives, and the whole fetch in time.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Callable
from urllib.parse import urlsplit, urlunsplit

import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class ImageFetchError(ValueError):
    """An image URL that is not fetched (the message says why)."""


def is_public(address: IPAddress) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


def _resolve(host: str, port: int) -> list[IPAddress]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as err:
        raise ImageFetchError(f"cannot resolve {host!r}: {err}") from err
    addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    if not addresses:
        raise ImageFetchError(f"cannot resolve {host!r}")
    return addresses


def fetch_image_bytes(url: str, *, max_bytes: int, timeout_s: float,
                      allowed: Callable[[IPAddress], bool] = is_public) -> bytes:
    """The body of ``url`` (http or https), at most ``max_bytes``, within ``timeout_s``; ``allowed`` decides which
    addresses may be reached (public ones)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ImageFetchError("image URLs must be http:// or https:// with a host")
    if parts.username or parts.password:
        raise ImageFetchError("image URLs may not carry credentials")
    host = parts.hostname
    port = parts.port or (443 if parts.scheme == "https" else 80)
    addresses = _resolve(host, port)
    first = addresses[0]
    refused = [a for a in addresses if not allowed(a)]
    if refused:
        raise ImageFetchError(f"{host!r} resolves to {refused[0]}, which is not a public address; the server does "
                              "not fetch from private, loopback or link-local networks")
    literal = f"[{first}]" if first.version == 6 else str(first)
    pinned = urlunsplit((parts.scheme, f"{literal}:{port}", parts.path or "/", parts.query, ""))
    headers = {"Host": parts.netloc.rsplit("@", 1)[-1], "Accept": "image/*"}
    deadline = time.monotonic() + timeout_s
    try:
        with httpx.Client(timeout=timeout_s, follow_redirects=False, trust_env=False) as client:
            with client.stream("GET", pinned, headers=headers, extensions={"sni_hostname": host}) as response:
                if response.is_redirect:
                    raise ImageFetchError(f"{url[:200]} redirects; redirects are not followed")
                if response.status_code != 200:
                    raise ImageFetchError(f"{url[:200]} answered HTTP {response.status_code}")
                declared = response.headers.get("content-length")
                if declared is not None and declared.isdigit() and int(declared) > max_bytes:
                    raise ImageFetchError(f"the image is {int(declared)} bytes, larger than the server's limit of "
                                          f"{max_bytes} bytes")
                chunks, size = [], 0
                for chunk in response.iter_bytes():
                    size += len(chunk)
                    if size > max_bytes:
                        raise ImageFetchError(f"the image is larger than the server's limit of {max_bytes} bytes")
                    if time.monotonic() > deadline:
                        raise ImageFetchError(f"fetching the image took longer than {timeout_s:g} s")
                    chunks.append(chunk)
                return b"".join(chunks)
    except httpx.HTTPError as err:
        raise ImageFetchError(f"cannot fetch {url[:200]}: {type(err).__name__}: {err}") from err
