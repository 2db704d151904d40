"""The worker's state on disk: an LMDB environment under ``--statedb PATH``.

It keeps what must survive a restart (Celery keeps it in a shelve of pickles,
which a kill -9 can corrupt): revoked task ids with their expiry, the logical
clock, the task counters, the tasks that blocked the hub past their hard time
limit (so their redelivered messages are refused), and named tables other
components use (the beat schedule's last-run times).  Values are JSON, never
pickle.

* LMDB never tears a database: a killed worker leaves the last committed
  state.  Commits skip the fsync (``sync=False``); a process crash loses
  nothing committed, a power cut may lose the last commits.
* Counters and the clock are written in batches on a green timer and at
  shutdown, not once per task.  A revoke is committed before ``revoke()``
  returns.  The rare long operations (``sync``, ``compact``) run in a real
  thread so the hub keeps serving other greenlets.
* One worker at a time: an exclusive lock on ``PATH/greenworker.lock``; a
  second one gets an error naming the file and the holder.
* The layout carries a version; an unknown one is refused with a clear error.
* A full map grows instead of failing.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import lmdb

from .. import green
from ..exceptions import GreenworkerError
from ..lmdbenv import write

if TYPE_CHECKING:
    from .state import WorkerState

#: the start line about the loaded state is the worker's
worker_log = logging.getLogger("greenworker.worker")

LAYOUT_VERSION = 1
LOCK_FILE = "greenworker.lock"
_MAP_SIZE = 64 << 20


class StoreError(GreenworkerError):
    """The state store cannot be opened or used; the text says why and which file."""


class StoreLocked(StoreError):
    """Another process holds the state store."""


class Table:
    """A named JSON key/value table inside the store (e.g. beat's last-run times)."""

    def __init__(self, store: StateStore, db: Any) -> None:
        self._store = store
        self._db = db

    def get(self, key: str, default: Any = None) -> Any:
        with self._store.env.begin(db=self._db) as txn:
            raw = txn.get(key.encode())
        return default if raw is None else json.loads(bytes(raw))

    def put(self, key: str, value: Any) -> None:
        data = json.dumps(value).encode()
        write(self._store.env, self._db, lambda txn: txn.put(key.encode(), data))

    def delete(self, key: str) -> None:
        write(self._store.env, self._db, lambda txn: txn.delete(key.encode()))

    def items(self) -> Iterator[tuple[str, Any]]:
        with self._store.env.begin(db=self._db) as txn:
            rows = [(bytes(k).decode(), json.loads(bytes(v))) for k, v in txn.cursor()]
        return iter(rows)


class StateStore:
    """The LMDB state store at ``path`` (a directory).  Open with :meth:`open`."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self.env: Any = None
        self._lock_fd: int | None = None
        self._dbs: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"<StateStore {self.path}>"

    # ------------------------------------------------------------ open / close

    def open(self, *, lock: bool = True) -> StateStore:
        os.makedirs(self.path, exist_ok=True)
        if lock:
            self._take_lock()
        try:
            self.env = lmdb.open(
                self.path,
                map_size=_MAP_SIZE,
                max_dbs=8,
                sync=False,
                metasync=False,
                lock=True,
            )
        except lmdb.Error as exc:
            self._release_lock()
            raise StoreError(f"cannot open the state store {self.path}: {exc}") from exc
        for name in ("meta", "revoked", "counters", "tables", "blockers"):
            self._dbs[name] = self.env.open_db(name.encode())
        self._check_layout()
        return self

    def close(self) -> None:
        if self.env is not None:
            self.env.sync(True)
            self.env.close()
            self.env = None
        self._release_lock()

    def _take_lock(self) -> None:
        lock_path = os.path.join(self.path, LOCK_FILE)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise StoreLocked(
                f"the state store {self.path} is in use by {holder} (lock {lock_path}); "
                "give each worker its own --statedb"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def _check_layout(self) -> None:
        meta = self._dbs["meta"]
        with self.env.begin(db=meta) as txn:
            raw = txn.get(b"layout")
        if raw is None:
            write(self.env, meta, lambda txn: txn.put(b"layout", str(LAYOUT_VERSION).encode()))
            return
        try:
            version = int(bytes(raw))
        except ValueError:
            version = -1
        if version != LAYOUT_VERSION:
            self.close()
            raise StoreError(
                f"the state store {self.path} has layout version {bytes(raw).decode()!r}; "
                f"this greenworker reads version {LAYOUT_VERSION}. Move it aside or run "
                f"'greenworker statedb {self.path} clear' to start afresh"
            )

    # ------------------------------------------------------------ revoked ids

    def add_revoked(self, items: dict[str, float]) -> None:
        """Commit revoked ids (id -> time revoked) now: durable when this returns."""
        db = self._dbs["revoked"]

        def put(txn: Any) -> None:
            for task_id, when in items.items():
                txn.put(task_id.encode(), json.dumps(when).encode())

        write(self.env, db, put)

    def revoked(self, expires: float) -> dict[str, float]:
        """The revoked ids still valid (expired ones are deleted on the way)."""
        db = self._dbs["revoked"]
        cutoff = time.time() - expires
        keep: dict[str, float] = {}
        stale: list[bytes] = []
        with self.env.begin(db=db) as txn:
            for key, raw in txn.cursor():
                when = float(json.loads(bytes(raw)))
                if when < cutoff:
                    stale.append(bytes(key))
                else:
                    keep[bytes(key).decode()] = when
        if stale:
            write(self.env, db, lambda txn: [txn.delete(k) for k in stale])
        return keep

    def trim_revoked(self, keep: set[str]) -> int:
        """Delete revoked ids not in ``keep`` (the in-memory set dropped them)."""
        db = self._dbs["revoked"]
        with self.env.begin(db=db) as txn:
            drop = [
                bytes(k)
                for k in txn.cursor().iternext(values=False)
                if bytes(k).decode() not in keep
            ]
        if drop:
            write(self.env, db, lambda txn: [txn.delete(k) for k in drop])
        return len(drop)

    # ------------------------------------------------------------ hub blockers

    def add_blocker(self, task_id: str, record: dict[str, Any]) -> None:
        """Commit a task that blocked the hub past its hard limit (``record`` has at
        least ``when``, epoch seconds): durable when this returns.  Safe from the
        watchdog's thread while the hub is blocked (no transaction is open there)."""
        data = json.dumps(record).encode()
        write(self.env, self._dbs["blockers"], lambda txn: txn.put(task_id.encode(), data))

    def blockers(self, expires: float) -> dict[str, dict[str, Any]]:
        """The recorded hub blockers younger than ``expires`` seconds (older ones are
        deleted on the way)."""
        db = self._dbs["blockers"]
        cutoff = time.time() - expires
        keep: dict[str, dict[str, Any]] = {}
        stale: list[bytes] = []
        with self.env.begin(db=db) as txn:
            for key, raw in txn.cursor():
                record = json.loads(bytes(raw))
                if float(record.get("when", 0)) < cutoff:
                    stale.append(bytes(key))
                else:
                    keep[bytes(key).decode()] = record
        if stale:
            write(self.env, db, lambda txn: [txn.delete(k) for k in stale])
        return keep

    # ------------------------------------------------------------ counters, clock

    def save_counters(self, counters: dict[str, int], clock: int) -> None:
        """One transaction for the whole batch."""
        cdb, mdb = self._dbs["counters"], self._dbs["meta"]

        def put(txn: Any) -> None:
            for name, value in counters.items():
                txn.put(name.encode(), str(value).encode(), db=cdb)
            txn.put(b"clock", str(clock).encode(), db=mdb)

        write(self.env, None, put)

    def counters(self) -> dict[str, int]:
        with self.env.begin(db=self._dbs["counters"]) as txn:
            return {bytes(k).decode(): int(bytes(v)) for k, v in txn.cursor()}

    def clock(self) -> int:
        with self.env.begin(db=self._dbs["meta"]) as txn:
            raw = txn.get(b"clock")
        return int(bytes(raw)) if raw is not None else 0

    # ------------------------------------------------------------ tables, maintenance

    def table(self, name: str) -> Table:
        db = self.env.open_db(f"table:{name}".encode())
        return Table(self, db)

    def sync(self) -> None:
        """Flush to disk (fsync) in a real thread, so the hub keeps running."""
        green.run_in_thread(self.env.sync, True)

    def summary(self) -> dict[str, Any]:
        info = self.env.info()
        stat = self.env.stat()
        with self.env.begin() as txn:
            revoked = txn.stat(self._dbs["revoked"])["entries"]
        with self.env.begin(db=self._dbs["blockers"]) as txn:
            blockers = {bytes(k).decode(): json.loads(bytes(v)) for k, v in txn.cursor()}
        return {
            "path": self.path,
            "layout": LAYOUT_VERSION,
            "revoked": revoked,
            "hub_blockers": blockers,
            "counters": self.counters(),
            "clock": self.clock(),
            "map_size": info["map_size"],
            "pages_used": info["last_pgno"] + 1,
            "page_size": stat["psize"],
        }

    def compact(self) -> tuple[int, int]:
        """Rewrite the data file without free pages; return (bytes before, after)."""
        data = os.path.join(self.path, "data.mdb")
        before = os.path.getsize(data)
        tmp = self.path + ".compact"
        os.makedirs(tmp, exist_ok=True)
        green.run_in_thread(self.env.copy, tmp, True)
        self.env.close()
        os.replace(os.path.join(tmp, "data.mdb"), data)
        os.rmdir(tmp)
        self.env = None
        self.open(lock=False)
        return before, os.path.getsize(data)

    def clear(self) -> None:
        """Delete everything but the layout version (and the named tables)."""

        def drop(txn: Any) -> None:
            for name in ("revoked", "counters", "blockers"):
                txn.drop(self._dbs[name], delete=False)
            txn.delete(b"clock", db=self._dbs["meta"])

        write(self.env, None, drop)


class StateSaver:
    """Keeps a worker's :class:`~greenworker.worker.state.WorkerState` in its store:
    revoked ids, counters and clock loaded at start, counters and clock saved on a
    timer (batched: only when they changed) and at stop."""

    def __init__(self, store: StateStore, state: WorkerState) -> None:
        self.store = store
        self.state = state
        self._flushed_processed = -1

    def load(self) -> None:
        store, state = self.store, self.state
        revoked = store.revoked(state.revoked.expires)
        state.revoked.update(revoked)
        store.trim_revoked(set(state.revoked.as_dict()))  # over the maximum: oldest go
        state.total.update(store.counters())
        state.clock.adjust(store.clock())
        worker_log.info(
            "state store %s: %d revoked ids, %d tasks counted, clock %d",
            store.path,
            len(revoked),
            state.processed,
            state.clock.value,
        )

    def flush(self) -> None:
        """Write counters and clock to the state store if they changed since the last time."""
        if self.store.env is None:
            return
        processed = self.state.processed
        if processed == self._flushed_processed:
            return
        self.store.save_counters(dict(self.state.total), self.state.clock.value)
        self._flushed_processed = processed
