"""Results in an LMDB file on local disk (``lmdb://``, the embedded default's backend)."""

from __future__ import annotations

import logging
import time
from datetime import datetime
from typing import TYPE_CHECKING, Any

from ..lmdbenv import open_env, write
from .base import ChordPart, decode_meta, dumps, encode_meta, loads

if TYPE_CHECKING:
    pass

log = logging.getLogger("greenworker.results")


class LMDBBackend:
    """Results in an LMDB environment on local disk (the embedded default).

    Many processes may open it at once (a worker and its clients).  Entries
    older than ``result_expires`` are purged when the worker opens it.
    """

    def __init__(self, path: str, expires: float | None) -> None:
        self.url = "lmdb://" + path
        self.path = path
        self._expires = expires
        self._env = open_env(path)
        self._db = self._env.open_db(b"results")
        self._chord_db = self._env.open_db(b"chords")

    def store(self, task_id: str, meta: dict[str, Any]) -> None:
        value = encode_meta(meta)
        write(self._env, self._db, lambda txn: txn.put(task_id.encode(), value))

    def get(self, task_id: str) -> dict[str, Any] | None:
        with self._env.begin(db=self._db) as txn:
            raw = txn.get(task_id.encode())
            return decode_meta(bytes(raw)) if raw is not None else None

    def forget(self, task_id: str) -> None:
        write(self._env, self._db, lambda txn: txn.delete(task_id.encode()))

    def set_chord_size(self, group_id: str, size: int) -> None:
        value = dumps({"size": size, "parts": {}}).encode()
        write(self._env, self._chord_db, lambda txn: txn.put(group_id.encode(), value))

    def chord_part_return(
        self, group_id: str, task_id: str, index: int | None, state: str, result: Any
    ) -> list[ChordPart] | None:
        key = group_id.encode()

        def count(txn: Any) -> list[ChordPart] | None:
            raw = txn.get(key)
            if raw is None:
                return None
            chord = loads(bytes(raw))
            order = float("inf") if index is None else index
            chord["parts"][task_id] = [order, task_id, state, result]
            if len(chord["parts"]) < chord["size"]:
                txn.put(key, dumps(chord).encode())
                return None
            txn.delete(key)
            ordered = sorted(chord["parts"].values(), key=lambda p: p[0])
            return [(p[1], p[2], p[3]) for p in ordered]

        # One write transaction: LMDB serialises writers, even across processes.
        return write(self._env, self._chord_db, count)

    def purge_expired(self) -> int:
        """Delete results older than ``result_expires``; return how many."""
        if not self._expires:
            return 0
        cutoff = time.time() - self._expires
        stale: list[bytes] = []
        with self._env.begin(db=self._db) as txn:
            for key, raw in txn.cursor():
                meta = decode_meta(bytes(raw)) or {}
                try:
                    done = datetime.fromisoformat(str(meta.get("date_done"))).timestamp()
                except ValueError:
                    continue
                if done < cutoff:
                    stale.append(bytes(key))
        if stale:
            write(self._env, self._db, lambda txn: [txn.delete(key) for key in stale])
        return len(stale)

    def close(self) -> None:
        # The environment is shared within the process (see lmdbenv); it closes at exit.
        return None
