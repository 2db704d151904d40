"""Where 0.1.0 documented the middleware base class: ``greenworker.hooks.Middleware``
keeps working.  The code lives in :mod:`greenworker.worker.hooks`."""

from __future__ import annotations

from .worker.hooks import Middleware

__all__ = ["Middleware"]
