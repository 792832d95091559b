"""The URL guard (serve_app/netguard): the address table, DNS rebinding against real loopback
servers, a pinned connection that keeps Host and TLS SNI/certificate checks for the name, and the
size/time caps."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from aiohttp import web

from serve_app.netguard import AddressPolicy, ResponseTooLarge, UrlGuard, URLRefused, refusal_reason
from serve_app.webhooks import deliver, verify_signature
from tests.conftest import free_port

# ---- the address table -------------------------------------------------------------------------
REFUSED = {
    "0.0.0.0": "unspecified", "127.0.0.1": "loopback", "127.255.0.9": "loopback", "10.0.0.1": "private",
    "172.16.5.4": "private", "192.168.1.1": "private", "169.254.169.254": "link-local",
    "100.64.0.1": "carrier-grade NAT", "192.0.0.1": "IETF protocol assignment", "192.0.0.9": "IETF",
    "192.0.2.1": "documentation", "198.18.0.1": "benchmarking", "224.0.0.1": "multicast",
    "239.255.255.250": "multicast", "240.0.0.1": "reserved", "255.255.255.255": "reserved",
    "::": "unspecified", "::1": "loopback", "fe80::1": "link-local", "fec0::1": "site-local",
    "fc00::1": "unique-local", "fd12:3456::1": "unique-local", "ff02::1": "multicast",
    "::ffff:127.0.0.1": "IPv4-mapped form of loopback", "::ffff:10.0.0.1": "IPv4-mapped form of private",
    "::ffff:169.254.169.254": "IPv4-mapped form of link-local", "::127.0.0.1": "IPv4-compatible form of loopback",
    "::ffff:0:127.0.0.1": "IPv4-translated form of loopback",
    "64:ff9b::7f00:1": "NAT64 form of loopback", "64:ff9b::a9fe:a9fe": "NAT64 form of link-local",
    "64:ff9b:1::1": "local-use NAT64", "2002:7f00:1::": "6to4 form of loopback",
    "2002:a9fe:a9fe::": "6to4 form of link-local", "2002:c0a8:101::1": "6to4 form of private",
    "2001:0:4136:e378:8000:63bf:3fff:fdd2": "Teredo", "2001:db8::1": "documentation", "100::1": "discard-only",
}
ALLOWED = ["93.184.216.34", "8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808",
           "2002:808:808::1"]


@pytest.mark.parametrize("addr, why", sorted(REFUSED.items()))
def test_refused_addresses(addr: str, why: str) -> None:
    reason = refusal_reason(ipaddress.ip_address(addr))
    assert reason is not None and why in reason, (addr, reason)


@pytest.mark.parametrize("addr", ALLOWED)
def test_public_addresses(addr: str) -> None:
    assert refusal_reason(ipaddress.ip_address(addr)) is None


@pytest.mark.parametrize("url", [
    "http://[2002:7f00:1::]/hook", "http://[2002:a9fe:a9fe::]/", "http://[fec0::1]/", "http://192.0.0.1/",
    "http://[::ffff:7f00:1]/", "http://2130706433/", "http://0x7f.1/", "http://127.1/", "http://[fe80::1%25eth0]/",
])
async def test_refused_url_forms(url: str) -> None:
    with pytest.raises(URLRefused):
        await UrlGuard().check(url)


def test_allow_list_covers_only_its_addresses() -> None:
    policy = AddressPolicy.of(allow_hosts=["10.0.0.0/8", "Internal.Example"])
    a = [ipaddress.ip_address("10.1.2.3")]
    assert policy.violation("x.example", a) is None
    assert policy.violation("internal.example", [ipaddress.ip_address("127.0.0.1")]) is None  # the name is trusted
    mixed = [ipaddress.ip_address("10.1.2.3"), ipaddress.ip_address("127.0.0.1")]
    assert "loopback" in (policy.violation("x.example", mixed) or "")  # every address must pass


# ---- real servers ---------------------------------------------------------------------------------
@dataclass
class Server:
    host: str
    port: int
    seen: list[dict] = field(default_factory=list)
    body: bytes = b"ok"


async def _serve(host: str, port: int, *, ssl_context: ssl.SSLContext | None = None) -> tuple[Server, web.AppRunner]:
    srv = Server(host, port)

    async def handle(request: web.Request) -> web.Response:
        srv.seen.append({"method": request.method, "host": request.headers.get("Host"),
                         "body": await request.read(), "headers": dict(request.headers)})
        return web.Response(body=srv.body)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, host, port, ssl_context=ssl_context).start()
    return srv, runner


@pytest.fixture
async def two_servers() -> AsyncIterator[tuple[Server, Server]]:
    """The same port on 127.0.0.2 (the address the guard checks and allows) and on 127.0.0.1 (the
    victim a rebinding name points at on its second answer)."""
    port = free_port()
    checked, r1 = await _serve("127.0.0.2", port)
    victim, r2 = await _serve("127.0.0.1", port)
    yield checked, victim
    await r1.cleanup()
    await r2.cleanup()


class RebindingDNS:
    """A resolver (the guard's resolution boundary) that answers `first`, then `later` for ever after."""

    def __init__(self, first: list[str], later: list[str]) -> None:
        self.first, self.later, self.calls = first, later, 0

    async def __call__(self, host: str, port: int) -> list[str]:
        self.calls += 1
        return self.first if self.calls == 1 else self.later


ALLOW_CHECKED = AddressPolicy.of(allow_hosts=["127.0.0.2/32"])  # 127.0.0.2 stands in for a public address


async def test_rebinding_name_connects_to_the_checked_address(two_servers: tuple[Server, Server]) -> None:
    checked, victim = two_servers
    dns = RebindingDNS(["127.0.0.2"], ["127.0.0.1"])
    guard = UrlGuard(ALLOW_CHECKED, resolver=dns)
    # The name resolves nowhere on this machine: any second lookup by httpx itself would fail.
    r = await guard.post(f"http://rebind.test:{checked.port}/hook", content=b"{}", timeout_s=10)
    assert r.status_code == 200 and r.connected_to == ("127.0.0.2",)
    assert dns.calls == 1 and victim.seen == []
    assert checked.seen[0]["host"] == f"rebind.test:{checked.port}"  # Host keeps the name
    # Each request resolves once, afresh: the rebound answer is now checked, and refused.
    with pytest.raises(URLRefused, match="loopback address 127.0.0.1"):
        await guard.post(f"http://rebind.test:{checked.port}/hook", content=b"{}", timeout_s=10)
    assert victim.seen == []


async def test_an_answer_with_any_private_address_is_refused(two_servers: tuple[Server, Server]) -> None:
    checked, victim = two_servers
    guard = UrlGuard(ALLOW_CHECKED, resolver=RebindingDNS(["127.0.0.2", "127.0.0.1"], []))
    with pytest.raises(URLRefused, match="loopback"):
        await guard.get(f"http://mixed.test:{checked.port}/", max_bytes=100, timeout_s=5)
    assert checked.seen == victim.seen == []


async def test_signed_webhook_is_delivered_to_the_checked_address_only(two_servers: tuple[Server, Server]) -> None:
    checked, victim = two_servers
    guard = UrlGuard(ALLOW_CHECKED, resolver=RebindingDNS(["127.0.0.2"], ["127.0.0.1"]))
    seen = []
    ok = await deliver(f"http://rebind.test:{checked.port}/hook", {"id": "job_1"}, secret=b"k", attempts=1,
                       guard=guard, record=seen.append)
    assert ok and victim.seen == [] and len(checked.seen) == 1
    assert verify_signature(checked.seen[0]["body"], checked.seen[0]["headers"]["X-Genserve-Signature"], b"k")
    # The next event resolves again, gets 127.0.0.1, and is refused for good (no retry, nothing sent).
    ok = await deliver(f"http://rebind.test:{checked.port}/hook", {"id": "job_2"}, secret=b"k", attempts=3,
                       backoff_s=0.01, guard=guard, record=seen.append)
    assert not ok and victim.seen == [] and len(seen) == 2 and "loopback" in (seen[1].error or "")


async def test_get_size_cap_and_deadline(two_servers: tuple[Server, Server]) -> None:
    checked, _ = two_servers
    guard = UrlGuard(ALLOW_CHECKED)
    checked.body = b"x" * 5000
    r = await guard.get(f"http://127.0.0.2:{checked.port}/img", max_bytes=5000, timeout_s=5)
    assert r.content == checked.body
    with pytest.raises(ResponseTooLarge):
        await guard.get(f"http://127.0.0.2:{checked.port}/img", max_bytes=4999, timeout_s=5)

    async def slow_dns(host: str, port: int) -> list[str]:
        await asyncio.sleep(5)
        return ["127.0.0.2"]

    with pytest.raises((TimeoutError, URLRefused)):
        await UrlGuard(ALLOW_CHECKED, resolver=slow_dns, resolve_timeout_s=0.2).get(
            f"http://slow.test:{checked.port}/", max_bytes=10, timeout_s=5)


def _tls_pair(tmp: Path, name: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A CA and a server certificate for `name`: (server context, client context trusting the CA)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(1).not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(hours=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(ca_key, hashes.SHA256()))
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(2)
            .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    (tmp / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                    serialization.NoEncryption()))
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(tmp / "cert.pem", tmp / "key.pem")
    client = ssl.create_default_context(cadata=ca.public_bytes(serialization.Encoding.PEM).decode())
    return server, client


async def test_tls_keeps_sni_and_verifies_the_name(tmp_path: Path) -> None:
    server_ctx, client_ctx = _tls_pair(tmp_path, "hooks.test")
    snis: list[str | None] = []
    server_ctx.sni_callback = lambda sock, name, ctx: snis.append(name)
    port = free_port()
    srv, runner = await _serve("127.0.0.2", port, ssl_context=server_ctx)
    try:
        dns = RebindingDNS(["127.0.0.2"], ["127.0.0.1"])
        guard = UrlGuard(ALLOW_CHECKED, resolver=dns, verify=client_ctx)
        r = await guard.get(f"https://hooks.test:{port}/x", max_bytes=100, timeout_s=10)
        assert r.status_code == 200 and snis == ["hooks.test"] and srv.seen[0]["host"] == f"hooks.test:{port}"
        # A name the certificate does not cover fails verification although the address is the same.
        other = UrlGuard(ALLOW_CHECKED, resolver=RebindingDNS(["127.0.0.2"], []), verify=client_ctx)
        with pytest.raises(httpx.ConnectError, match="(?i)certificate|hostname"):
            await other.get(f"https://other.test:{port}/x", max_bytes=100, timeout_s=10)
    finally:
        await runner.cleanup()
