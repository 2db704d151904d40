"""The one place that knows which green hub runs: gevent (the default) or eventlet.

Everything else in greenworker calls the functions and classes here and is
written once for both hubs.  The hub is chosen by :func:`patch` (the CLI does it
before importing the user's module) or detected from a process that already
monkeypatched itself (embedding).
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any, Literal, Protocol, cast

from greenlet import GreenletExit

__all__ = ["GreenTimeout", "GreenletExit", "HubError", "patch", "patched_by", "sleep", "spawn"]

HubName = Literal["gevent", "eventlet"]
HUBS: tuple[HubName, ...] = ("gevent", "eventlet")


class GreenTimeout(Exception):
    """Raised inside a greenlet whose :func:`timeout` ran out."""


class HubError(RuntimeError):
    """The process is not (or differently) monkeypatched."""


class Greenlet(Protocol):
    """What greenworker needs from a spawned greenlet on either hub."""

    @property
    def dead(self) -> bool: ...

    def kill(self, exception: BaseException | None = None) -> None: ...

    def join(self, timeout: float | None = None) -> bool: ...


class Event(Protocol):
    def set(self) -> None: ...

    def clear(self) -> None: ...

    def is_set(self) -> bool: ...

    def wait(self, timeout: float | None = None) -> bool: ...


class Semaphore(Protocol):
    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool: ...

    def release(self) -> None: ...

    def __enter__(self) -> Any: ...

    def __exit__(self, *exc: object) -> Any: ...


class _Backend(Protocol):
    name: HubName

    def spawn(self, fn: Callable[..., Any], *args: Any) -> Greenlet: ...

    def sleep(self, seconds: float) -> None: ...

    def event(self) -> Event: ...

    def semaphore(self, value: int) -> Semaphore: ...

    def timeout(self, seconds: float | None, exc: BaseException) -> _TimeoutContext: ...


class _TimeoutContext(Protocol):
    def __enter__(self) -> Any: ...

    def __exit__(self, *exc: object) -> Any: ...

    def cancel(self) -> None: ...


# --------------------------------------------------------------------- gevent


class _GeventGreenlet:
    __slots__ = ("_g",)

    def __init__(self, g: Any) -> None:
        self._g = g

    @property
    def dead(self) -> bool:
        return bool(self._g.dead)

    def kill(self, exception: BaseException | None = None) -> None:
        self._g.kill(exception if exception is not None else GreenletExit(), block=False)

    def join(self, timeout: float | None = None) -> bool:
        self._g.join(timeout)
        return bool(self._g.dead)


class _GeventBackend:
    name: HubName = "gevent"

    def __init__(self) -> None:
        import gevent
        import gevent.event
        import gevent.lock

        self._gevent = gevent
        self._event = gevent.event.Event
        self._semaphore = gevent.lock.Semaphore

    def spawn(self, fn: Callable[..., Any], *args: Any) -> Greenlet:
        return _GeventGreenlet(self._gevent.spawn(fn, *args))

    def sleep(self, seconds: float) -> None:
        self._gevent.sleep(seconds)

    def event(self) -> Event:
        return cast(Event, self._event())

    def semaphore(self, value: int) -> Semaphore:
        return cast(Semaphore, self._semaphore(value))

    def timeout(self, seconds: float | None, exc: BaseException) -> _TimeoutContext:
        return cast(_TimeoutContext, self._gevent.Timeout(seconds, exc))


# ------------------------------------------------------------------- eventlet


class _EventletGreenlet:
    __slots__ = ("_done", "_g")

    def __init__(self, g: Any, done: Event) -> None:
        self._g = g
        self._done = done

    @property
    def dead(self) -> bool:
        return bool(self._g.dead)

    def kill(self, exception: BaseException | None = None) -> None:
        if self._g.dead:
            return
        exc = exception if exception is not None else GreenletExit()
        # eventlet's kill() switches into the target at once; throw from the hub
        # instead so kill() returns without running the victim, as on gevent.
        import eventlet.hubs

        hub = eventlet.hubs.get_hub()
        hub.schedule_call_global(0, self._throw, exc)

    def _throw(self, exc: BaseException) -> None:
        if not self._g.dead:
            self._g.kill(type(exc), exc)

    def join(self, timeout: float | None = None) -> bool:
        if self._g.dead:
            return True
        self._done.wait(timeout)
        return bool(self._g.dead) or self._done.is_set()


class _EventletEvent:
    """A resettable event (eventlet's own Event fires only once)."""

    __slots__ = ("_ev", "_event_cls", "_timeout_cls")

    def __init__(self) -> None:
        import eventlet
        import eventlet.event

        self._event_cls = eventlet.event.Event
        self._timeout_cls = eventlet.Timeout
        self._ev = self._event_cls()

    def set(self) -> None:
        if not self._ev.ready():
            self._ev.send(True)

    def clear(self) -> None:
        if self._ev.ready():
            self._ev = self._event_cls()

    def is_set(self) -> bool:
        return bool(self._ev.ready())

    def wait(self, timeout: float | None = None) -> bool:
        ev = self._ev
        if ev.ready():
            return True
        if timeout is not None and timeout <= 0:
            return False
        with self._timeout_cls(timeout, False):
            ev.wait()
            return True
        return False


class _EventletSemaphore:
    __slots__ = ("_sem",)

    def __init__(self, value: int) -> None:
        import eventlet.semaphore

        self._sem = eventlet.semaphore.Semaphore(value)

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        return bool(self._sem.acquire(blocking, timeout))

    def release(self) -> None:
        self._sem.release()

    def __enter__(self) -> _EventletSemaphore:
        self._sem.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self._sem.release()


class _EventletBackend:
    name: HubName = "eventlet"

    def __init__(self) -> None:
        import eventlet

        self._eventlet = eventlet

    def spawn(self, fn: Callable[..., Any], *args: Any) -> Greenlet:
        done = _EventletEvent()
        g = self._eventlet.spawn(_run_then_set, fn, args, done)
        return _EventletGreenlet(g, done)

    def sleep(self, seconds: float) -> None:
        self._eventlet.sleep(seconds)

    def event(self) -> Event:
        return _EventletEvent()

    def semaphore(self, value: int) -> Semaphore:
        return _EventletSemaphore(value)

    def timeout(self, seconds: float | None, exc: BaseException) -> _TimeoutContext:
        return _EventletTimeout(self._eventlet, seconds, exc)


def _run_then_set(fn: Callable[..., Any], args: tuple[Any, ...], done: _EventletEvent) -> Any:
    try:
        return fn(*args)
    except GreenletExit:
        return None
    finally:
        done.set()


class _EventletTimeout:
    """eventlet.Timeout starts on construction; start it on ``__enter__`` like gevent."""

    def __init__(self, eventlet: Any, seconds: float | None, exc: BaseException) -> None:
        self._eventlet = eventlet
        self._seconds = seconds
        self._exc = exc
        self._timer: Any = None

    def __enter__(self) -> _EventletTimeout:
        self._timer = self._eventlet.Timeout(self._seconds, self._exc)
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


# ------------------------------------------------------------ hub selection

_active: _Backend | None = None


def patched_by() -> HubName | None:
    """Which hub has monkeypatched this process, or None if none has."""
    if "gevent.monkey" in sys.modules or "gevent" in sys.modules:
        try:
            monkey = importlib.import_module("gevent.monkey")
            if monkey.is_module_patched("socket"):
                return "gevent"
        except ImportError:  # pragma: no cover - gevent is a hard dependency
            pass
    if "eventlet" in sys.modules:
        patcher = importlib.import_module("eventlet.patcher")
        if patcher.is_monkey_patched("socket"):
            return "eventlet"
    return None


def patch(hub: HubName = "gevent") -> HubName:
    """Monkeypatch the process with ``hub`` (idempotent) and make it the active hub.

    Raises :class:`HubError` if the process was already patched by the other hub.
    """
    if hub not in HUBS:
        raise HubError(f"unknown hub {hub!r}; choose one of {', '.join(HUBS)}")
    current = patched_by()
    if current is not None and current != hub:
        raise HubError(f"the process is already monkeypatched by {current}, cannot use {hub}")
    if current is None:
        if hub == "gevent":
            import gevent
            from gevent import monkey

            if not os.environ.get("GEVENT_RESOLVER"):  # the user's choice wins
                gevent.config.resolver = "greenworker.gevent_resolver.NumericFirstResolver"
            monkey.patch_all()
        else:
            try:
                with warnings.catch_warnings():
                    # eventlet warns on import that it is in maintenance mode; the
                    # user chose it explicitly, and the docs say so.
                    warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")
                    import eventlet
            except ImportError as exc:
                raise HubError(
                    "the eventlet hub needs eventlet: pip install 'greenworker[eventlet]'"
                ) from exc
            eventlet.monkey_patch()
    _select(hub)
    return hub


def _select(hub: HubName) -> _Backend:
    global _active
    if _active is None or _active.name != hub:
        _active = _GeventBackend() if hub == "gevent" else _EventletBackend()
    return _active


def backend() -> _Backend:
    """The active hub: the one that patched the process, else gevent."""
    if _active is not None:
        return _active
    return _select(patched_by() or "gevent")


def hub_name() -> HubName:
    return backend().name


def require_patched() -> HubName:
    """Return the hub that patched the process; raise :class:`HubError` if none did."""
    hub = patched_by()
    if hub is None:
        raise HubError(
            "greenworker runs on a monkeypatched process: call "
            "greenworker.green.patch('gevent') (or gevent.monkey.patch_all()) first"
        )
    _select(hub)
    return hub


def spawn(fn: Callable[..., Any], *args: Any) -> Greenlet:
    return backend().spawn(fn, *args)


def sleep(seconds: float = 0) -> None:
    backend().sleep(seconds)


def new_event() -> Event:
    return backend().event()


def new_semaphore(value: int = 1) -> Semaphore:
    return backend().semaphore(value)


def timeout(seconds: float | None, exc: BaseException | None = None) -> _TimeoutContext:
    """A context manager raising ``exc`` (default :class:`GreenTimeout`) after ``seconds``."""
    return backend().timeout(seconds, exc if exc is not None else GreenTimeout(seconds))


def on_signal(signum: int, handler: Callable[[], None]) -> None:
    """Run ``handler`` in a new greenlet whenever ``signum`` arrives (CLI only).

    On both hubs a Python signal handler, with a wakeup pipe the hub watches
    (:func:`_wake_hub_on_signals`): the signal is seen at once, whatever the hub
    is waiting for and whichever thread the kernel gave it to, including one that
    was blocked until now (across a restart in place, see
    :mod:`greenworker.worker.signals`)."""
    import signal

    _wake_hub_on_signals()
    signal.signal(signum, lambda _signum, _frame: spawn(handler))


_signal_wakeup_fds: tuple[int, int] | None = None


def _wake_hub_on_signals() -> None:
    """Make a signal wake the hub at once.

    Python runs a signal handler only when the main thread runs Python code: the
    hub, waiting in its poll, would resume it with its old timeout (eventlet) or
    look at signals every 0.3 s (gevent), so the greenlet the handler spawns would
    wait.  A wakeup pipe, read by a greenlet, makes the poll return instead.
    """
    global _signal_wakeup_fds
    if _signal_wakeup_fds is not None:
        return
    import signal

    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    os.set_blocking(write_fd, False)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    _signal_wakeup_fds = (read_fd, write_fd)
    wait_readable = _fd_waiter()

    def drain() -> None:
        while True:
            wait_readable(read_fd)
            try:
                os.read(read_fd, 4096)
            except BlockingIOError:
                pass

    spawn(drain)


def _fd_waiter() -> Callable[[int], None]:
    """The hub's cooperative wait until a file descriptor is readable."""
    if hub_name() == "gevent":
        from gevent.socket import wait_read

        return cast(Callable[[int], None], wait_read)
    import eventlet.hubs

    return lambda fd: eventlet.hubs.trampoline(fd, read=True)


# ------------------------------------------------------- real (unpatched) threads


def real_thread_ident() -> int:
    """The OS thread id of the caller (``threading.get_ident`` is a greenlet id once patched)."""
    return int(_original("_thread", "get_ident")())


def real_thread_ident_function() -> Callable[[], int]:
    """:func:`real_thread_ident` looked up once, for a hot path (call it once patched)."""
    function: Callable[[], int] = _original("_thread", "get_ident")
    return function


def start_real_thread(fn: Callable[[], None]) -> int:
    """Start ``fn`` in a real OS thread, outside the hub (for watchdogs only)."""
    return int(_original("_thread", "start_new_thread")(fn, ()))


def real_sleep(seconds: float) -> None:
    """Sleep the calling OS thread, whatever the patching (for real threads only)."""
    _original("time", "sleep")(seconds)


def _original(module: str, name: str) -> Any:
    hub = patched_by()
    if hub == "gevent":
        from gevent import monkey

        return monkey.get_original(module, name)
    if hub == "eventlet":
        import eventlet.patcher

        return getattr(eventlet.patcher.original(module), name)
    return getattr(importlib.import_module(module), name)


def run_in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """Run a blocking call in the hub's thread pool; the calling greenlet waits, others run."""
    hub = patched_by()
    if hub == "gevent":
        import gevent

        return gevent.get_hub().threadpool.apply(fn, args)
    if hub == "eventlet":
        import eventlet.tpool

        return eventlet.tpool.execute(fn, *args)
    return fn(*args)
