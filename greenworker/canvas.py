"""Where 0.1.0 documented the canvas: ``from greenworker.canvas import chain, group, chord``
keeps working.  The code lives in :mod:`greenworker.client.canvas`."""

from __future__ import annotations

from .client.canvas import Chain, Chord, Group, GroupResult, Signature, chain, chord, group

__all__ = ["Chain", "Chord", "Group", "GroupResult", "Signature", "chain", "chord", "group"]
