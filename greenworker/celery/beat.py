"""Celery beat for a ``celery.Celery`` app, on the green hub.

Celery's own scheduler machinery decides what is due (``celery.beat.Scheduler``
and its ``tick``; ``schedule``, ``crontab``, ``solar``, numbers and timedeltas)
and sends it (``apply_entry`` -> ``Task.apply_async`` / ``send_task``), so
routes, options and the ``celery_beat_task`` header are as under
``celery beat``.  What greenworker adds:

* :class:`LMDBScheduler`, the default scheduler: Celery's
  ``PersistentScheduler`` with the last-run times in an LMDB environment (a
  directory of JSON values, crash-safe) instead of a shelve of pickles.
* :class:`GreenService`: Celery's ``Service`` whose loop waits on a green event
  instead of ``time.sleep``, so beat stops at once when asked, in a greenlet of
  the worker's hub (``-B``) or as the whole process (``greenworker beat``).
* :func:`run_beat` (the loop in the calling greenlet), :func:`start_embedded`
  (a greenlet, returns a :class:`BeatHandle`; :func:`open_embedded` sets it up
  without starting it), :func:`run_forever` (the standalone command: SIGTERM
  and SIGINT stop it) and :class:`EmbeddedBeat` (the worker's ``-B``).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

import celery
from celery import beat as celery_beat
from celery import signals as celery_signals
from celery.utils.imports import load_extension_class_names, symbol_by_name
from celery.utils.time import maybe_make_aware

from .. import green
from ..exceptions import BeatError
from ..worker.store import LOCK_FILE, StateStore, StoreError, StoreLocked

if TYPE_CHECKING:
    from ..worker.timer import Timer

__all__ = [
    "BeatError",
    "BeatHandle",
    "EmbeddedBeat",
    "GreenService",
    "LMDBScheduler",
    "SchedulerNotFound",
    "open_embedded",
    "resolve_scheduler",
    "run_beat",
    "run_forever",
    "start_embedded",
]

log = logging.getLogger(__name__)

#: The store's table holding beat's state: key ``meta`` and one ``entry:<name>`` per entry.
TABLE = "celerybeat"
META_KEY = "meta"
ENTRY_PREFIX = "entry:"

#: Celery's default ``beat_scheduler``: a shelve file, which greenworker replaces.
_CELERY_DEFAULT = celery_beat.PersistentScheduler
#: Where installed packages register scheduler aliases (``-S django``), as Celery reads them.
_ALIASES_NAMESPACE = "celery.beat_schedulers"
#: How long :meth:`BeatHandle.stop` waits for the loop before it kills the greenlet.
STOP_TIMEOUT = 1.0


class SchedulerNotFound(BeatError):
    """The scheduler named (``--scheduler`` / ``beat_scheduler``) cannot be loaded."""


# ----------------------------------------------------------------- the scheduler


class LMDBScheduler(celery_beat.Scheduler):  # type: ignore[misc]
    """Celery's scheduler with each entry's ``last_run_at`` and ``total_run_count``
    kept in an LMDB environment at ``schedule_filename`` (a directory).

    It behaves as ``celery.beat.PersistentScheduler``: at start the app's
    ``beat_schedule`` is merged with the stored state (an entry keeps its last
    run; one no longer in the schedule is dropped, from the store too), the
    stored state is reset when the ``timezone`` or ``enable_utc`` setting
    changed, and the state is written at the same points (every
    ``sync_every`` seconds, every ``beat_sync_every`` sent tasks, at close).
    Values are JSON (``last_run_at`` in ISO 8601 with its offset), never
    pickle, and LMDB never tears a database: after a kill -9 the next start
    opens the last committed state (runs sent since the last sync are sent
    again, as with ``celery beat``; ``beat_sync_every = 1`` commits after
    every send).

    ``store``: an open :class:`~greenworker.worker.store.StateStore` to use
    instead of opening one at the path (the worker's own, when ``-B`` and
    ``--statedb`` name the same directory); it is left open at close.
    """

    def __init__(
        self,
        app: Any,
        *args: Any,
        schedule_filename: str | None = None,
        store: StateStore | None = None,
        **kwargs: Any,
    ) -> None:
        self.schedule_filename = os.path.abspath(
            schedule_filename or app.conf.beat_schedule_filename
        )
        self._store = store
        self._own_store = store is None
        self._table: Any = None
        #: what the store holds for each entry, so a sync writes only what changed
        self._synced: dict[str, dict[str, Any]] = {}
        super().__init__(app, *args, **kwargs)

    def setup_schedule(self) -> None:
        if self._store is None:
            self._store = open_schedule_store(self.schedule_filename)
        try:
            self._merge_stored()
        except BaseException:
            # a bad beat_schedule entry: leave the store as it was, and unlocked
            self._close_store()
            raise

    def _merge_stored(self) -> None:
        assert self._store is not None
        table = self._table = self._store.table(TABLE)
        self._synced = self._stored_entries(table)
        tz, utc = self.app.conf.timezone, self.app.conf.enable_utc
        meta = table.get(META_KEY) or {}
        if "tz" in meta and meta["tz"] != tz:
            log.warning("Reset: Timezone changed from %r to %r", meta["tz"], tz)
            self._forget_stored()
        elif "utc_enabled" in meta and meta["utc_enabled"] != utc:
            choices = {True: "enabled", False: "disabled"}
            log.warning(
                "Reset: UTC changed from %s to %s",
                choices.get(meta["utc_enabled"], meta["utc_enabled"]),
                choices[bool(utc)],
            )
            self._forget_stored()
        # stored entries first, then the schedule merged in: Celery's merge keeps
        # their last runs, takes task/schedule/args/options from the settings and
        # drops what the settings no longer name
        self.data = {
            name: self.Entry(
                name=name,
                app=self.app,
                last_run_at=state["last_run_at"],
                total_run_count=state["total_run_count"],
            )
            for name, state in self._loaded(self._synced).items()
        }
        self.merge_inplace(self.app.conf.beat_schedule)
        self.install_default_entries(self.schedule)
        table.put(META_KEY, {"tz": tz, "utc_enabled": utc, "celery": celery.__version__})
        self.sync()
        log.debug(
            "beat: current schedule:\n%s",
            "\n".join(repr(entry) for entry in self.schedule.values()),
        )

    def _stored_entries(self, table: Any) -> dict[str, dict[str, Any]]:
        return {
            key[len(ENTRY_PREFIX) :]: value
            for key, value in table.items()
            if key.startswith(ENTRY_PREFIX)
        }

    def _loaded(self, stored: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
        """The stored entries as ``last_run_at`` (aware, in the app's timezone) and count;
        one that cannot be read is left out (it starts afresh) with a warning."""
        loaded: dict[str, dict[str, Any]] = {}
        for name, value in stored.items():
            try:
                last_run_at = datetime.fromisoformat(value["last_run_at"])
                count = int(value["total_run_count"])
                if last_run_at.tzinfo is None:
                    raise ValueError("no timezone")
            except (KeyError, TypeError, ValueError) as exc:
                log.warning(
                    "beat: stored state of %r unreadable (%s): starting it afresh", name, exc
                )
                continue
            loaded[name] = {
                "last_run_at": last_run_at.astimezone(self.app.timezone),
                "total_run_count": count,
            }
        return loaded

    def _forget_stored(self) -> None:
        for name in list(self._synced):
            self._table.delete(ENTRY_PREFIX + name)
        self._synced = {}

    def sync(self) -> None:
        """Write the entries whose state changed; delete the ones that left the schedule."""
        table = self._table
        if table is None:
            return
        current = {
            name: {
                "last_run_at": maybe_make_aware(entry.last_run_at, self.app.timezone).isoformat(),
                "total_run_count": int(entry.total_run_count),
            }
            for name, entry in self.schedule.items()
        }
        for name in set(self._synced) - set(current):
            table.delete(ENTRY_PREFIX + name)
        for name, state in current.items():
            if self._synced.get(name) != state:
                table.put(ENTRY_PREFIX + name, state)
        self._synced = current

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._close_store()

    def _close_store(self) -> None:
        self._table = None
        if self._own_store and self._store is not None:
            self._store.close()
        self._store = None

    @property
    def info(self) -> str:
        return f"    . db -> {self.schedule_filename} (LMDB)"


def open_schedule_store(path: str) -> StateStore:
    """Open (and lock) the LMDB schedule store at ``path``; every failure is a
    :class:`BeatError` with one line naming the path."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise BeatError(
            f"the beat schedule {path} is a file (celery beat's shelve?): greenworker keeps "
            "the schedule in an LMDB directory; move the file aside (its last-run times are "
            "not read) or name another path (-s)"
        )
    try:
        return StateStore(path).open()
    except StoreLocked:
        holder = _lock_holder(path)
        raise BeatError(
            f"the beat schedule {path} is in use by {holder}: only one beat may use a "
            "schedule; give this one another (-s)"
        ) from None
    except (StoreError, OSError) as exc:
        raise BeatError(f"cannot open the beat schedule {path}: {exc}") from exc


def _lock_holder(path: str) -> str:
    try:
        with open(os.path.join(path, LOCK_FILE)) as lock:
            return lock.read(200).strip() or "another process"
    except OSError:
        return "another process"


def resolve_scheduler(celery_app: Any, scheduler: str | type | None = None) -> type:
    """The scheduler class: ``scheduler`` as Celery's ``--scheduler`` takes it (a class,
    ``"module:Class"``, ``"module.Class"`` or an alias registered under
    ``celery.beat_schedulers``), else the ``beat_scheduler`` setting.

    The setting at Celery's default, ``PersistentScheduler`` (a shelve file),
    gives :class:`LMDBScheduler`; naming ``PersistentScheduler`` explicitly in
    ``scheduler`` keeps it.  Raises :class:`SchedulerNotFound`.
    """
    explicit = scheduler is not None
    spec = scheduler if explicit else celery_app.conf.beat_scheduler
    aliases = dict(load_extension_class_names(_ALIASES_NAMESPACE))
    try:
        found = symbol_by_name(spec, aliases=aliases)
    except Exception as exc:  # ImportError, AttributeError, ValueError, or the module's own
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SchedulerNotFound(f"cannot load the beat scheduler {spec!r}: {reason}") from exc
    if not isinstance(found, type) or not issubclass(found, celery_beat.Scheduler):
        raise SchedulerNotFound(
            f"the beat scheduler {spec!r} is {found!r}, not a celery.beat.Scheduler subclass"
        )
    if found is _CELERY_DEFAULT and not explicit:
        log.info("beat: Celery's PersistentScheduler (a shelve file) replaced by LMDBScheduler")
        return LMDBScheduler
    return found


# ------------------------------------------------------------------ the service


class GreenService(celery_beat.Service):  # type: ignore[misc]
    """Celery's beat ``Service`` on the green hub.

    The loop is Celery's (``tick``, then sleep as long as it says, syncing when
    ``should_sync``), but it sleeps on a green event, so :meth:`stop` ends it at
    once; between two sends it yields to the hub.  Celery's ``beat_init`` (and,
    embedded, ``beat_embedded_init``) signals are sent with this service as
    sender.  ``stop``: the event that ends the loop (one of its own by
    default; :meth:`stop` sets it).  ``store``: an open state store the
    :class:`LMDBScheduler` shares (see there).
    """

    scheduler_cls = LMDBScheduler

    def __init__(
        self,
        app: Any,
        *,
        stop: green.Event | None = None,
        store: StateStore | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(app, **kwargs)
        self._store = store
        self._stop = stop if stop is not None else green.new_event()

    def get_scheduler(
        self, lazy: bool = False, extension_namespace: str = _ALIASES_NAMESPACE
    ) -> Any:
        # extension_namespace: Celery's signature; the aliases are always Celery's
        cls = resolve_scheduler(self.app, self.scheduler_cls)
        extra = (
            {"store": self._store}
            if self._store is not None and issubclass(cls, LMDBScheduler)
            else {}
        )
        return cls(
            app=self.app,
            schedule_filename=self.schedule_filename,
            max_interval=self.max_interval,
            lazy=lazy,
            **extra,
        )

    def start(self, embedded_process: bool = False) -> None:
        scheduler = self.scheduler
        log.info("beat: Starting...")
        celery_signals.beat_init.send(sender=self)
        if embedded_process:
            celery_signals.beat_embedded_init.send(sender=self)
        self.effective_max_interval = scheduler.max_interval
        if self.remote_control:
            self._pidbox = celery_beat.BeatPidbox(self)
            self._pidbox.start()
        self._last_tick = time.monotonic()
        try:
            while not self._stop.is_set():
                interval = scheduler.tick()
                self._last_tick = time.monotonic()
                if interval and interval > 0.0:
                    if self._stop.wait(interval):
                        break
                    if scheduler.should_sync():
                        scheduler._do_sync()
                else:
                    green.sleep(0)  # another entry is due: let the hub run first
        finally:
            # the schedule first, the remote-control thread after (as Celery does)
            self.sync()
            if self._pidbox is not None:
                self._pidbox.stop()

    def sync(self) -> None:
        if "scheduler" in self.__dict__:  # never build one just to close it
            self.scheduler.close()
        self._is_stopped.set()

    def stop(self, wait: bool = False) -> None:
        log.info("beat: Shutting down...")
        self._stop.set()
        if wait:
            self._is_stopped.wait()


def _service(
    celery_app: Any,
    scheduler: str | type | None,
    schedule_path: str | None,
    max_interval: float | None,
    *,
    remote_control: bool = False,
    hostname: str | None = None,
    worker_store: StateStore | None = None,
    stop: green.Event | None = None,
) -> GreenService:
    """A service whose scheduler is set up (store open, schedule merged): every
    mistake shows here, before anything runs."""
    path = os.path.abspath(schedule_path or celery_app.conf.beat_schedule_filename)
    shared = worker_store if worker_store is not None and worker_store.path == path else None
    service = GreenService(
        celery_app,
        store=shared,
        stop=stop,
        max_interval=max_interval,
        schedule_filename=path,
        scheduler_cls=resolve_scheduler(celery_app, scheduler),
        remote_control=remote_control,
        hostname=hostname,
    )
    try:
        service.scheduler  # noqa: B018  (builds and sets up the scheduler)
    except BeatError:
        raise
    except Exception as exc:
        raise BeatError(
            f"beat cannot set up its scheduler ({type(exc).__name__}): {exc}".splitlines()[0]
        ) from exc
    return service


def run_beat(
    celery_app: Any,
    *,
    stop: green.Event,
    scheduler: str | type | None = None,
    schedule_path: str | None = None,
    max_interval: float | None = None,
    embedded: bool = False,
    worker_store: StateStore | None = None,
) -> None:
    """Run beat in the calling greenlet until ``stop`` is set, then sync and close.

    ``scheduler``: see :func:`resolve_scheduler`; ``schedule_path``: Celery's
    ``-s`` (default ``beat_schedule_filename``); ``max_interval``: Celery's
    ``--max-interval`` (default ``beat_max_loop_interval``, else the
    scheduler's own, 300 s).  ``embedded`` sends ``beat_embedded_init`` too
    and never answers remote control (the worker does).  ``worker_store``:
    the worker's open state store, shared when it is at ``schedule_path``.

    Setting ``stop`` ends the wait between ticks at once; a send stuck on an
    unreachable broker ends when kombu gives up (``broker_connection_max_retries``):
    :func:`start_embedded` and :func:`run_forever` do not wait for that.
    Raises :class:`BeatError` when beat cannot start.
    """
    service = _service(
        celery_app, scheduler, schedule_path, max_interval, worker_store=worker_store, stop=stop
    )
    service.start(embedded_process=embedded)


class BeatHandle:
    """Beat in a greenlet of its own, from :meth:`start` to :meth:`stop` (see
    :func:`open_embedded` and :func:`start_embedded`)."""

    def __init__(self, service: GreenService, embedded: bool) -> None:
        self.service = service
        self.embedded = embedded
        #: The exception that ended beat on its own, if one did (it is logged too).
        self.error: BaseException | None = None
        self._done = green.new_event()
        self._greenlet: green.Greenlet | None = None

    def start(self) -> None:
        """Run beat in a new greenlet of the current hub (once)."""
        if self._greenlet is None and not self._done.is_set():
            self._greenlet = green.spawn(self._run)

    def _run(self) -> None:
        try:
            self.service.start(embedded_process=self.embedded)
        except Exception as exc:
            self.error = exc
            log.exception("beat stopped: %s", exc)
        finally:
            self._done.set()

    @property
    def running(self) -> bool:
        return self._greenlet is not None and not self._done.is_set()

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop beat and wait until it synced and closed its schedule; after
        ``timeout`` seconds (a send stuck on the broker) its greenlet is killed,
        which still syncs and closes.  Beat never started just closes its schedule."""
        self.service.stop()
        if self._greenlet is None:
            if not self._done.is_set():
                self.service.sync()
                self._done.set()
            return
        if not self._done.wait(timeout):
            log.warning("beat: still busy after %gs (a send stuck?): killing it", timeout)
            self._greenlet.kill()
            self._done.wait(timeout)

    def join(self, timeout: float | None = None) -> bool:
        """Wait until beat ended; True if it did."""
        return self._done.wait(timeout)


def open_embedded(
    celery_app: Any,
    *,
    scheduler: str | type | None = None,
    schedule_path: str | None = None,
    max_interval: float | None = None,
    worker_store: StateStore | None = None,
) -> BeatHandle:
    """Beat for the worker's ``-B``, set up (its schedule open and locked) but not yet
    running: :meth:`BeatHandle.start` runs it.  The arguments are :func:`run_beat`'s.
    Raises :class:`BeatError` when beat cannot start."""
    green.require_patched()
    service = _service(
        celery_app, scheduler, schedule_path, max_interval, worker_store=worker_store
    )
    return BeatHandle(service, embedded=True)


def start_embedded(
    celery_app: Any,
    *,
    scheduler: str | type | None = None,
    schedule_path: str | None = None,
    max_interval: float | None = None,
    worker_store: StateStore | None = None,
) -> BeatHandle:
    """Start beat in a greenlet of the current hub; stop it with
    :meth:`BeatHandle.stop`.  The arguments are :func:`run_beat`'s.  Raises
    :class:`BeatError` before anything runs when beat cannot start."""
    handle = open_embedded(
        celery_app,
        scheduler=scheduler,
        schedule_path=schedule_path,
        max_interval=max_interval,
        worker_store=worker_store,
    )
    handle.start()
    return handle


def run_forever(
    celery_app: Any,
    *,
    scheduler: str | type | None = None,
    schedule_path: str | None = None,
    max_interval: float | None = None,
    remote_control: bool | None = None,
    hostname: str | None = None,
    socket_timeout: float | None = 30.0,
) -> None:
    """Run beat as the whole process (``greenworker -A proj beat``) until SIGTERM
    or SIGINT, then sync and close the schedule and return.

    Like ``celery beat`` it first imports the app's task modules
    (``loader.init_worker``, ``finalize``), sets the default socket timeout
    (``socket_timeout``, 30 s) and answers remote-control ``ping`` as
    ``celerybeat@<hostname>`` when ``remote_control`` (default
    ``beat_enable_remote_control``).  Raises :class:`BeatError` when beat
    cannot start, or when it went down on its own.
    """
    green.require_patched()
    celery_app.loader.init_worker()
    celery_app.finalize()
    if socket_timeout:
        socket.setdefaulttimeout(socket_timeout)
    service = _service(
        celery_app,
        scheduler,
        schedule_path,
        max_interval,
        remote_control=(
            celery_app.conf.beat_enable_remote_control if remote_control is None else remote_control
        ),
        hostname=hostname,
    )
    handle = BeatHandle(service, embedded=False)
    handle.start()
    for signum in (signal.SIGTERM, signal.SIGINT):
        green.on_signal(signum, handle.stop)
    handle.join()
    if handle.error is not None:
        raise BeatError(f"beat stopped: {handle.error}".splitlines()[0]) from handle.error


class EmbeddedBeat:
    """``-B`` for a Celery app: the worker's beat opener
    (:data:`~greenworker.worker.worker.BeatOpener`).  The worker opens Celery's beat
    before it starts anything (a schedule in use stops the start with
    :class:`BeatError`), runs it in a greenlet, and stops it first in a warm shutdown.
    The worker's state store is shared when the schedule is there."""

    def __init__(
        self,
        celery_app: Any,
        *,
        scheduler: str | None,
        schedule_path: str | None,
        max_interval: float | None,
    ) -> None:
        self.celery_app = celery_app
        self.scheduler = scheduler
        self.schedule_path = schedule_path
        self.max_interval = max_interval

    def __call__(
        self, timer: Timer, worker_store: StateStore | None
    ) -> tuple[BeatHandle, StateStore | None]:
        handle = open_embedded(
            self.celery_app,
            scheduler=self.scheduler,
            schedule_path=self.schedule_path,
            max_interval=self.max_interval,
            worker_store=worker_store,
        )
        return handle, None  # the scheduler closes a store of its own itself
