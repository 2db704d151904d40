"""gevent's default resolver, except that IP addresses are resolved on the hub.

gevent resolves every name in its thread pool, an IP address too: a task that opens a
connection to ``127.0.0.1`` waits for a pool thread (and the GIL hand-offs around it).
With ``AI_NUMERICHOST`` ``getaddrinfo`` only parses the address -- no lookup, no file,
no network -- so it cannot block the hub and answers exactly as before.  Names still
go to the thread pool.  :func:`greenworker.green.patch` installs this resolver when
greenworker patches the process itself and ``GEVENT_RESOLVER`` is not set.
"""

from __future__ import annotations

import _socket
from typing import Any

from gevent.resolver.thread import Resolver as ThreadResolver


def is_ip_address(host: object) -> bool:
    """True for an IPv4 or IPv6 address literal (no scope id)."""
    if not isinstance(host, str) or not host:
        return False
    for family in (_socket.AF_INET, _socket.AF_INET6):
        try:
            _socket.inet_pton(family, host)
            return True
        except (OSError, ValueError):
            continue
    return False


class NumericFirstResolver(ThreadResolver):  # type: ignore[misc]
    """The thread-pool resolver, answering IP address literals on the hub."""

    def getaddrinfo(
        self,
        host: Any,
        port: Any,
        family: int = 0,
        type: int = 0,
        proto: int = 0,
        flags: int = 0,
    ) -> Any:
        if is_ip_address(host):
            return _socket.getaddrinfo(
                host, port, family, type, proto, flags | _socket.AI_NUMERICHOST
            )
        return super().getaddrinfo(host, port, family, type, proto, flags)
