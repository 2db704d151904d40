"""Open LMDB environments once per process.

LMDB forbids opening the same environment twice in one process, so every
component that needs a given directory shares the one handle kept here.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import lmdb

_MAP_SIZE = 1 << 30  # address space only: the file grows as data is written
_envs: dict[str, Any] = {}


def open_env(path: str, *, max_dbs: int = 8) -> Any:
    """Return the process-wide LMDB environment for directory ``path``.

    ``sync=False`` keeps a commit off the disk's flush path; a killed process
    still loses nothing committed (the pages are in the OS cache), only a
    power cut may lose the last commits, and LMDB never tears a database.
    """
    real = os.path.realpath(path)
    env = _envs.get(real)
    if env is None:
        os.makedirs(real, exist_ok=True)
        env = lmdb.open(real, map_size=_MAP_SIZE, max_dbs=max_dbs, sync=False, metasync=False)
        _envs[real] = env
    return env


T = TypeVar("T")


def write(env: Any, db: Any, action: Callable[[Any], T]) -> T:
    """Run ``action(txn)`` in a write transaction; double the map and retry when it is full."""
    while True:
        try:
            with env.begin(write=True, db=db) as txn:
                return action(txn)
        except lmdb.MapFullError:
            env.set_mapsize(env.info()["map_size"] * 2)
