"""One guard for every URL a user gives genserve (webhooks; later image prompts and adapters):
resolve once, refuse non-public addresses (incl. IPv6 forms embedding one), connect only to the
checked addresses, cap size and time. See guard.py."""

from serve_app.netguard.guard import (
    GuardedResponse,
    Resolver,
    ResponseTooLarge,
    Target,
    UrlGuard,
    URLRefused,
    parse_url,
    system_resolver,
)
from serve_app.netguard.policy import IP, AddressPolicy, refusal_reason
from serve_app.netguard.transport import PinnedBackend, PinnedTransport

__all__ = [
    "IP", "AddressPolicy", "GuardedResponse", "PinnedBackend", "PinnedTransport", "Resolver", "ResponseTooLarge",
    "Target", "URLRefused", "UrlGuard", "parse_url", "refusal_reason", "system_resolver",
]
