"""The one way genserve reaches a URL a user gave (webhooks now; image prompts and adapters later).

    guard = UrlGuard(AddressPolicy.of(allow_hosts=["10.1.0.0/16"]))
    target = await guard.check(url)                     # URLRefused (a ValueError) if not allowed
    r = await guard.post(url, content=body, headers=h, timeout_s=10)
    r = await guard.get(url, max_bytes=8 << 20, timeout_s=20)   # ResponseTooLarge past the cap

Each request: parse the URL as httpx will send it, resolve the host ONCE, refuse unless every
address passes the policy (policy.py), then connect to those checked addresses only
(transport.py), with the name kept for Host, SNI and certificate checks. Redirects are not
followed (a redirect could point anywhere); the whole exchange has one deadline and the body a
size cap, read fully before it is returned.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

import anyio
import httpx

from serve_app.netguard.policy import IP, AddressPolicy, parse_ip
from serve_app.netguard.transport import PinnedBackend, PinnedTransport

# (host, port) -> addresses. Injected in tests to play a rebinding DNS server.
Resolver = Callable[[str, int], Awaitable[Sequence[IP | str]]]

MAX_URL_CHARS = 2048


class URLRefused(ValueError):
    """The URL is malformed, or its host is (or resolves to) an address the policy refuses."""


class ResponseTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"the response is larger than {limit} bytes")
        self.limit = limit


async def system_resolver(host: str, port: int) -> list[IP]:
    infos = await anyio.to_thread.run_sync(
        lambda: socket.getaddrinfo(host, port, type=socket.SOCK_STREAM), abandon_on_cancel=True)
    return [parse_ip(str(i[4][0])) for i in infos]


@dataclass(frozen=True)
class Target:
    url: httpx.URL
    host: str  # ASCII (IDNA) form, as sent in Host and SNI
    port: int
    addresses: tuple[IP, ...]  # checked, in resolver order (the order they are dialled)


@dataclass(frozen=True)
class GuardedResponse:
    status_code: int
    headers: httpx.Headers
    content: bytes
    connected_to: tuple[str, ...] = field(default=())  # addresses dialled (the last one answered)


def parse_url(url: str, *, schemes: Sequence[str] = ("http", "https")) -> tuple[httpx.URL, str, int]:
    """(url, host, port) exactly as httpx will use them, or URLRefused."""
    if not isinstance(url, str) or not url or len(url) > MAX_URL_CHARS:
        raise URLRefused(f"it must be a URL of at most {MAX_URL_CHARS} characters")
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError, TypeError):
        raise URLRefused("it is not a valid URL") from None
    if parsed.scheme not in schemes:
        raise URLRefused(f"the scheme must be {' or '.join(schemes)}, not {parsed.scheme or 'missing'!r}")
    if parsed.userinfo:
        raise URLRefused("credentials in the URL are not accepted")
    host = parsed.raw_host.decode("ascii").lower()
    if not host:
        raise URLRefused("it has no host")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    if not 0 < port < 65536:
        raise URLRefused("its port is invalid")
    return parsed, host, port


def _literal(host: str) -> IP | None:
    try:
        return parse_ip(host)  # a literal address is its own answer: no DNS
    except ValueError:
        return None


def _checked(policy: AddressPolicy, parsed: httpx.URL, host: str, port: int, answer: Sequence[IP | str]) -> Target:
    try:
        addrs = list(dict.fromkeys(a if not isinstance(a, str) else parse_ip(a) for a in answer))  # dedupe, keep order
    except ValueError:
        raise URLRefused(f"the host {host!r} resolves to something that is not an IP address") from None
    if not addrs:
        raise URLRefused(f"the host {host!r} does not resolve")
    why = policy.violation(host, addrs)
    if why is not None:
        raise URLRefused(why)
    return Target(parsed, host, port, tuple(addrs))


class UrlGuard:
    def __init__(self, policy: AddressPolicy = AddressPolicy(), *, resolver: Resolver | None = None,
                 schemes: Sequence[str] = ("http", "https"), resolve_timeout_s: float = 5.0,
                 verify: ssl.SSLContext | bool = True) -> None:
        self.policy = policy
        self.resolver = resolver or system_resolver
        self.schemes = tuple(schemes)
        self.resolve_timeout_s = resolve_timeout_s
        self.verify = verify
        self._ssl_context: ssl.SSLContext | None = verify if isinstance(verify, ssl.SSLContext) else None

    @property
    def ssl_context(self) -> ssl.SSLContext:
        if self._ssl_context is None:  # built once: it loads the CA bundle
            self._ssl_context = httpx.create_ssl_context(verify=self.verify, trust_env=False)
        return self._ssl_context

    async def check(self, url: str) -> Target:
        """Parse, resolve once, apply the policy to every address. URLRefused names the reason."""
        parsed, host, port = parse_url(url, schemes=self.schemes)
        literal = _literal(host)
        if literal is not None:
            return _checked(self.policy, parsed, host, port, [literal])
        try:
            with anyio.fail_after(self.resolve_timeout_s):
                answer = await self.resolver(host, port)
        except (OSError, UnicodeError, TimeoutError):
            raise URLRefused(f"the host {host!r} does not resolve") from None
        return _checked(self.policy, parsed, host, port, answer)

    def check_blocking(self, url: str) -> Target:
        """`check` for code outside an event loop: blocking system DNS (the injected resolver is async)."""
        parsed, host, port = parse_url(url, schemes=self.schemes)
        literal = _literal(host)
        if literal is not None:
            return _checked(self.policy, parsed, host, port, [literal])
        try:
            answer = [str(i[4][0]) for i in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]
        except (OSError, UnicodeError):
            raise URLRefused(f"the host {host!r} does not resolve") from None
        return _checked(self.policy, parsed, host, port, answer)

    async def request(self, method: str, url: str, *, content: bytes | None = None,
                      headers: Mapping[str, str] | None = None, timeout_s: float = 10.0,
                      max_bytes: int = 1 << 20, truncate: bool = False) -> GuardedResponse:
        """One exchange with the checked addresses of `url`'s host; raises URLRefused, TimeoutError (past
        `timeout_s` in all), an httpx.HTTPError (network), or ResponseTooLarge past `max_bytes` (with
        `truncate`: the body is cut there instead, for callers that only need the status)."""
        ctx = self.ssl_context
        with anyio.fail_after(timeout_s):
            target = await self.check(url)
            backend = PinnedBackend(target.host, target.port, target.addresses)
            transport = PinnedTransport(backend, ssl_context=ctx)
            async with httpx.AsyncClient(transport=transport, follow_redirects=False, trust_env=False,
                                         timeout=timeout_s) as client:
                req = client.build_request(method, target.url, content=content, headers=headers)
                resp = await client.send(req, stream=True)
                try:
                    declared = resp.headers.get("content-length")
                    if not truncate and declared is not None and declared.isdigit() and int(declared) > max_bytes:
                        raise ResponseTooLarge(max_bytes)
                    body = bytearray()
                    async for chunk in resp.aiter_bytes():
                        body += chunk
                        if len(body) > max_bytes:
                            if not truncate:
                                raise ResponseTooLarge(max_bytes)
                            del body[max_bytes:]
                            break
                finally:
                    await resp.aclose()
            return GuardedResponse(resp.status_code, resp.headers, bytes(body), tuple(backend.connected_to))

    async def get(self, url: str, *, max_bytes: int, timeout_s: float,
                  headers: Mapping[str, str] | None = None) -> GuardedResponse:
        return await self.request("GET", url, headers=headers, timeout_s=timeout_s, max_bytes=max_bytes)

    async def post(self, url: str, *, content: bytes, headers: Mapping[str, str] | None = None,
                   timeout_s: float = 10.0, max_bytes: int = 64 * 1024) -> GuardedResponse:
        """The answer's body is cut at `max_bytes` (a webhook sender needs the status only)."""
        return await self.request("POST", url, content=content, headers=headers, timeout_s=timeout_s,
                                  max_bytes=max_bytes, truncate=True)
