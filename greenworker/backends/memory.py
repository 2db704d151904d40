"""Results in this process's memory (``memory://``): for tests and embedding."""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from .base import _LocalChords, decode_meta, encode_meta

log = logging.getLogger("greenworker.results")


class MemoryBackend:
    """Results in this process's memory (tests, the ``memory://`` harness)."""

    #: One store per URL for the whole process: every App on ``memory://`` sees it.
    _shared: ClassVar[dict[str, dict[str, bytes]]] = {}
    _chords: ClassVar[dict[str, _LocalChords]] = {}

    def __init__(self, url: str = "memory://") -> None:
        self.url = url
        self._data = self._shared.setdefault(url, {})
        chords = self._chords.setdefault(url, _LocalChords())
        self.set_chord_size = chords.set_chord_size
        self.chord_part_return = chords.chord_part_return

    def store(self, task_id: str, meta: dict[str, Any]) -> None:
        self._data[task_id] = encode_meta(meta)

    def get(self, task_id: str) -> dict[str, Any] | None:
        return decode_meta(self._data.get(task_id))

    def forget(self, task_id: str) -> None:
        self._data.pop(task_id, None)

    def close(self) -> None:
        return None
