"""Finding the user's app (``-A``): a :class:`greenworker.App` or a ``celery.Celery`` app.

The search is Celery's (``celery -A``): ``module:attr``; ``module.attr``; a module's
``app`` or ``celery`` attribute; in a package, its ``celery`` submodule; else the one
app defined in the module.  A Celery app is wrapped in
:class:`~greenworker.celery.app.CeleryApp` (this imports Celery, which the user's
module already did).
"""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType
from typing import Any

from .client.app import App
from .exceptions import ImproperlyConfigured


def load_app(spec: str) -> App:
    """Import the app named by ``spec`` and return it as an :class:`App`.

    Raises :class:`ImproperlyConfigured` with one readable line.
    """
    module_name, colon, attr = spec.partition(":")
    if not module_name or (colon and not attr):
        raise ImproperlyConfigured(f"bad app spec {spec!r}: expected module or module:attr")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    if colon:
        value: Any = _import(module_name)
        for part in attr.split("."):
            if not hasattr(value, part):
                raise ImproperlyConfigured(f"module {module_name!r} has no attribute {attr!r}")
            value = getattr(value, part)
        return _adopt(value, spec)
    try:
        module = _import(module_name, missing_ok=True)
    except ModuleNotFoundError:
        parent, dot, name = module_name.rpartition(".")
        if not dot:
            raise ImproperlyConfigured(f"cannot import app module {module_name!r}") from None
        holder = _import(parent)
        if not hasattr(holder, name):
            raise ImproperlyConfigured(
                f"cannot import app module {module_name!r}, and {parent!r} has no {name!r}"
            ) from None
        return _adopt(getattr(holder, name), spec)
    found = _find_in(module)
    if found is None:
        raise ImproperlyConfigured(
            f"module {module_name!r} has no greenworker App or Celery app "
            f"(looked for app, celery, {module_name}.celery and any app instance; "
            f"found {_describe_attributes(module)})"
        )
    return _adopt(found, spec)


def _import(name: str, *, missing_ok: bool = False) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if missing_ok and exc.name == name:
            raise
        raise ImproperlyConfigured(f"cannot import app module {name!r}: {exc}") from exc
    except ImportError as exc:
        raise ImproperlyConfigured(f"cannot import app module {name!r}: {exc}") from exc
    except Exception as exc:  # a SyntaxError or a failing import-time statement
        first = (str(exc).strip().splitlines() or [""])[0]  # one line, as the CLI prints it
        raise ImproperlyConfigured(
            f"app module {name!r} failed to import: {type(exc).__name__}: {first}"
        ) from exc


def _is_app(value: object) -> bool:
    return isinstance(value, App) or _is_celery(value)


def _is_celery(value: object) -> bool:
    celery = sys.modules.get("celery")  # a Celery app exists only where Celery was imported
    return celery is not None and isinstance(value, celery.Celery)


def _find_in(module: ModuleType) -> Any:
    for name in ("app", "celery", "application"):
        value = getattr(module, name, None)
        if _is_app(value):
            return value
    if hasattr(module, "__path__"):  # a package: Celery's layout, proj/celery.py
        try:
            sub = importlib.import_module(module.__name__ + ".celery")
        except ModuleNotFoundError as exc:
            if exc.name != module.__name__ + ".celery":
                raise ImproperlyConfigured(
                    f"cannot import {module.__name__}.celery: {exc}"
                ) from exc
        else:
            found = _find_in(sub)
            if found is not None:
                return found
    apps = [v for v in vars(module).values() if _is_app(v)]
    return apps[0] if apps else None


def _adopt(value: object, spec: str) -> App:
    if isinstance(value, App):
        return value
    if _is_celery(value):
        from .celery.app import CeleryApp

        return CeleryApp(value)
    raise ImproperlyConfigured(
        f"{spec!r} is a {type(value).__module__}.{type(value).__qualname__}, "
        "not a greenworker App or a celery.Celery app"
    )


def _describe_attributes(module: ModuleType) -> str:
    names = [n for n in ("app", "celery", "application") if hasattr(module, n)]
    if not names:
        return "none of them"
    return ", ".join(
        f"{n} = {type(getattr(module, n)).__module__}.{type(getattr(module, n)).__qualname__}"
        for n in names
    )
