"""Which webhook URLs the server will POST to: http(s) only, and not into private networks
(SSRF) unless the operator allows it. Checked when a job is accepted and again before each
delivery, since DNS can change in between."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from urllib.parse import urlsplit

import anyio

from serve_app.errors import bad_request

IP = ipaddress.IPv4Address | ipaddress.IPv6Address


def _refused(url: str, why: str) -> Exception:
    shown = url if len(url) <= 120 else url[:117] + "..."
    return bad_request(f"webhook_url {shown!r} is not allowed: {why}.", param="webhook_url",
                       code="invalid_webhook_url")


def _internal(ip: IP) -> str | None:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    # Most specific first: is_private is also true for loopback, link-local and 0.0.0.0.
    for attr, label in (("is_unspecified", "unspecified"), ("is_loopback", "loopback"),
                        ("is_link_local", "link-local"), ("is_multicast", "multicast"), ("is_private", "private"),
                        ("is_reserved", "reserved")):
        if getattr(ip, attr):
            return label
    return None if ip.is_global else "non-public"  # e.g. 100.64.0.0/10 (carrier-grade NAT)


def _host_allowed(host: str, addrs: Sequence[IP], allow_hosts: Sequence[str]) -> bool:
    """An entry is a host name (exact, case-insensitive), an IP address, or a CIDR network."""
    for entry in allow_hosts:
        entry = entry.strip().lower()
        if entry == host:
            return True
        try:
            net = ipaddress.ip_network(entry, strict=False)
        except ValueError:
            continue
        if addrs and all(a in net for a in addrs):
            return True
    return False


def resolve(host: str, port: int) -> list[IP]:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({ipaddress.ip_address(str(i[4][0]).split("%")[0]) for i in infos}, key=str)


def validate_webhook_url(url: str, *, allow_private: bool = False, allow_hosts: Sequence[str] = ()) -> None:
    """400 (param `webhook_url`) unless `url` is http(s) to a public address, an allowed host, or
    `allow_private` is set. Resolves the host name (blocking: use `avalidate_webhook_url` in async code)."""
    if not isinstance(url, str) or len(url) > 2048:
        raise _refused(str(url)[:120], "it must be a URL of at most 2048 characters")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise _refused(url, f"the scheme must be http or https, not {parts.scheme or 'missing'!r}")
    if parts.username is not None or parts.password is not None:
        raise _refused(url, "credentials in the URL are not accepted")
    host = (parts.hostname or "").lower()
    if not host:
        raise _refused(url, "it has no host")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise _refused(url, "its port is invalid") from None
    try:
        addrs = resolve(host, port)
    except (OSError, UnicodeError):
        raise _refused(url, f"the host {host!r} does not resolve") from None
    if not addrs:
        raise _refused(url, f"the host {host!r} does not resolve")
    if allow_private or _host_allowed(host, addrs, allow_hosts):
        return
    for ip in addrs:
        kind = _internal(ip)
        if kind is not None:
            raise _refused(url, f"{host} resolves to {kind} address {ip}")


async def avalidate_webhook_url(url: str, *, allow_private: bool = False, allow_hosts: Sequence[str] = ()) -> None:
    await anyio.to_thread.run_sync(
        lambda: validate_webhook_url(url, allow_private=allow_private, allow_hosts=allow_hosts))
