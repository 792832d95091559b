"""An httpx transport that connects only to addresses checked beforehand (DNS pinning).

httpx would resolve the URL's host again when it connects, and a name with a zero TTL can then
answer differently (DNS rebinding: public when checked, 127.0.0.1 when used). Here the network
backend ignores DNS: a connection to the pinned host name goes to the checked addresses, in
order; any other host is refused. The URL keeps the name, so the Host header, TLS SNI and
certificate verification are all for the name.
"""

from __future__ import annotations

import ssl
import typing
from collections.abc import Sequence

import httpcore
import httpx

from serve_app.netguard.policy import IP


class PinnedBackend(httpcore.AsyncNetworkBackend):
    def __init__(self, host: str, port: int, addresses: Sequence[IP]) -> None:
        if not addresses:
            raise ValueError("at least one pinned address is needed")
        self.host, self.port, self.addresses = host.lower(), port, tuple(addresses)
        self._inner = httpcore.AnyIOBackend()
        self.connected_to: list[str] = []  # the addresses actually dialled, in order (for logs and tests)

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                          socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
                          ) -> httpcore.AsyncNetworkStream:
        if (host.lower(), port) != (self.host, self.port):
            raise httpcore.ConnectError(f"{host}:{port} is not the checked destination")
        last: Exception | None = None
        for ip in self.addresses:  # every one passed the policy; try the next if one is down
            self.connected_to.append(str(ip))
            try:
                return await self._inner.connect_tcp(str(ip), port, timeout=timeout, local_address=local_address,
                                                     socket_options=socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as e:
                last = e
        assert last is not None
        raise last

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
                                  ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("unix sockets are not a checked destination")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class PinnedTransport(httpx.AsyncHTTPTransport):
    """`httpx.AsyncHTTPTransport` whose connection pool dials through a `PinnedBackend`."""

    def __init__(self, backend: PinnedBackend, *, ssl_context: ssl.SSLContext) -> None:
        # A ready context: building one loads the CA bundle (tens of ms), so callers keep one.
        super().__init__(verify=ssl_context, trust_env=False, retries=0)
        ctx = ssl_context
        # The pool httpx built dials with real DNS; this one dials the pinned addresses only.
        self._pool = httpcore.AsyncConnectionPool(ssl_context=ctx, max_connections=4, http1=True, http2=False,
                                                  network_backend=backend)
        self.backend = backend
