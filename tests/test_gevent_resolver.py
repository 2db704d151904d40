"""The resolver greenworker installs when it patches with gevent: IP addresses on the hub."""

from __future__ import annotations

import _socket
import socket

import pytest

from greenworker import green


@pytest.fixture
def gevent_hub() -> object:
    if green.hub_name() != "gevent":
        pytest.skip("eventlet resolves IP addresses on its hub already")
    import gevent

    return gevent.get_hub()


def test_ip_addresses_are_answered_on_the_hub_names_in_the_pool(
    gevent_hub: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    from greenworker.gevent_resolver import NumericFirstResolver, is_ip_address

    resolver = gevent_hub.resolver  # type: ignore[attr-defined]
    assert isinstance(resolver, NumericFirstResolver)  # tests/run_patched.py used green.patch
    pooled: list[object] = []
    real_pool = resolver.pool

    class CountingPool:
        def apply(self, fn: object, *args: object, **kwargs: object) -> object:
            pooled.append(args)
            return real_pool.apply(fn, *args, **kwargs)

    monkeypatch.setattr(resolver, "pool", CountingPool())
    for host in ("127.0.0.1", "::1"):
        assert socket.getaddrinfo(host, 80, 0, socket.SOCK_STREAM) == _socket.getaddrinfo(
            host, 80, 0, socket.SOCK_STREAM
        )
    assert pooled == []  # no pool thread for an address
    assert socket.getaddrinfo("localhost", 80, 0, socket.SOCK_STREAM)
    assert len(pooled) == 1  # a name still goes to the pool
    with pytest.raises(socket.gaierror):
        socket.getaddrinfo("no-such-host.invalid", 80)
    assert [is_ip_address(h) for h in ("10.0.0.1", "fe80::1", "localhost", "", None, "1.2.3")] == [
        True,
        True,
        False,
        False,
        False,
        False,
    ]
