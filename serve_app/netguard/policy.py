"""Which IP addresses a user-given URL may reach: public unicast only, unless allow-listed.

Explicit tables, not only `ipaddress`'s `is_private`/`is_global` (whose lists change between
Python versions and which say nothing about addresses that *embed* an IPv4 address): an IPv6 form
that carries an IPv4 address (mapped, compatible, NAT64, 6to4, SIIT) is judged by the IPv4 inside,
so `[::ffff:127.0.0.1]` or `[2002:7f00:1::]` can't reach loopback.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

IP = ipaddress.IPv4Address | ipaddress.IPv6Address

_V4 = [(ipaddress.IPv4Network(n), label) for n, label in (
    ("0.0.0.0/8", "unspecified"), ("10.0.0.0/8", "private"), ("100.64.0.0/10", "carrier-grade NAT"),
    ("127.0.0.0/8", "loopback"), ("169.254.0.0/16", "link-local"), ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "IETF protocol assignment"), ("192.0.2.0/24", "documentation"),
    ("192.88.99.0/24", "6to4 relay"), ("192.168.0.0/16", "private"), ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation"), ("203.0.113.0/24", "documentation"), ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),  # includes the broadcast address 255.255.255.255
)]

_V6 = [(ipaddress.IPv6Network(n), label) for n, label in (
    ("::/128", "unspecified"), ("::1/128", "loopback"), ("64:ff9b:1::/48", "local-use NAT64"),
    ("100::/64", "discard-only"), ("2001::/32", "Teredo"), ("2001:db8::/32", "documentation"),
    ("2001:10::/28", "ORCHID"), ("3fff::/20", "documentation"), ("5f00::/16", "SRv6 SID"),
    ("fc00::/7", "unique-local"), ("fe80::/10", "link-local"), ("fec0::/10", "site-local"),
    ("ff00::/8", "multicast"),
)]

# IPv6 forms whose packets end up at an embedded IPv4 address: (network, name, the IPv4 inside).
_EMBEDDED = [
    (ipaddress.IPv6Network("::ffff:0:0/96"), "IPv4-mapped", lambda ip: ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)),
    (ipaddress.IPv6Network("::ffff:0:0:0/96"), "IPv4-translated", lambda ip: ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)),
    (ipaddress.IPv6Network("64:ff9b::/96"), "NAT64", lambda ip: ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)),
    (ipaddress.IPv6Network("::/96"), "IPv4-compatible", lambda ip: ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)),
    (ipaddress.IPv6Network("2002::/16"), "6to4", lambda ip: ipaddress.IPv4Address((int(ip) >> 80) & 0xFFFFFFFF)),
]


def refusal_reason(ip: IP) -> str | None:
    """None for a public unicast address; else what it is, e.g. `loopback` or `6to4 form of loopback 127.0.0.1`."""
    if isinstance(ip, ipaddress.IPv4Address):
        for net, label in _V4:
            if ip in net:
                return label
        return None if ip.is_global else "non-public"
    if ip.scope_id:
        return "scoped (zone) address"
    for net, label in _V6:  # before the embedded forms: `::` and `::1` sit inside ::/96
        if ip in net:
            return label
    for net, name, inner in _EMBEDDED:
        if ip in net:
            v4 = inner(ip)
            why = refusal_reason(v4)
            return f"{name} form of {why} address {v4}" if why else None
    return None if ip.is_global else "non-public"


def parse_ip(text: str) -> IP:
    """An address as getaddrinfo or a URL gives it (an IPv6 zone `%eth0` is kept, and refused)."""
    return ipaddress.ip_address(text)


@dataclass(frozen=True)
class AddressPolicy:
    """`allow_private` turns the check off (internal deployments, dev); `allow_hosts` lists host
    names (exact, case-insensitive), IPs or CIDRs that may be reached although not public."""

    allow_private: bool = False
    allow_hosts: tuple[str, ...] = ()

    @classmethod
    def of(cls, *, allow_private: bool = False, allow_hosts: Iterable[str] = ()) -> AddressPolicy:
        return cls(allow_private, tuple(h.strip().lower() for h in allow_hosts if h.strip()))

    def _networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        nets = []
        for entry in self.allow_hosts:
            try:
                nets.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                continue  # a host name
        return nets

    def violation(self, host: str, addrs: Sequence[IP]) -> str | None:
        """None if every address of `host` may be reached; else why not (the first bad address)."""
        if self.allow_private or host.lower() in self.allow_hosts:
            return None
        nets = self._networks()
        for ip in addrs:
            why = refusal_reason(ip)
            if why is not None and not any(ip.version == n.version and ip in n for n in nets):
                return f"{host} resolves to {why} address {ip}" if host != str(ip) else f"{ip} is a {why} address"
        return None
