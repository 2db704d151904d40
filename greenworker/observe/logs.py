"""The worker's log: Celery's per-task lines, JSON lines, and how the command sets it up.

The task lines say what Celery's worker says, word for word, so the greps and
alerts written for Celery keep working::

    Task proj.add[<id>] received
    Task proj.add[<id>] succeeded in 0.00123s: 5
    Task proj.add[<id>] retry: Retry in 2s: ConnectionError('...')
    Task proj.fail[<id>] raised unexpected: ValueError('boom')      (ERROR, with exc_info)

They go to the ``greenworker.trace`` logger (:data:`TRACE`), not to Celery's
``celery.app.trace``: sentry-sdk's Celery integration, enabled by itself when
Celery is installed, ignores ``celery.app.trace``, and a greenworker App's
failures would then never reach Sentry.  (A Celery app's tasks end in Celery's
own tracer, which logs its lines on ``celery.app.trace`` as under Celery.)
Every task line carries ``task_name`` and ``task_id`` as record attributes,
for formatters and handlers.

Each line costs little: nothing is built when INFO is off, the record is made
without the caller lookup of :meth:`logging.Logger._log` (the caller is known:
this module), and a result's repr is made only when a handler formats the line.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from logging.handlers import WatchedFileHandler
from typing import Any

from .. import green

#: The per-task lines (received, succeeded, retry, raised, hard time limit).
TRACE = logging.getLogger("greenworker.trace")
#: greenworker's text format (Celery's, with the logger's name for the process's).
LOG_FORMAT = "[%(asctime)s: %(levelname)s/%(name)s] %(message)s"
#: At most this much of a result's repr goes into its line (Celery's ``resultrepr_maxsize``).
RESULT_REPR_MAX = 1024

# Celery's formats (celery.app.trace and celery.worker.request), positional here.
LOG_RECEIVED = "Task %s[%s] received"
LOG_SUCCESS = "Task %s[%s] succeeded in %ss: %s"
LOG_FAILURE = "Task %s[%s] raised unexpected: %r"
LOG_RETRY = "Task %s[%s] retry: %s"
LOG_HARD_LIMIT = "Hard time limit (%ss) exceeded for %s[%s]"

INFO, ERROR = logging.INFO, logging.ERROR
#: Seconds an INFO or DEBUG line may wait in the buffer for the lines after it (WARNING
#: and worse are written at once).
FLUSH_DELAY = 0.02

ExcInfo = tuple[type[BaseException], BaseException, Any]


def _emit(
    level: int, msg: str, args: tuple[Any, ...], name: str, task_id: str, exc: ExcInfo | None
) -> None:
    # What Logger._log does, less the stack walk of findCaller: the caller is this module.
    if logging.getLogRecordFactory() is logging.LogRecord:
        record = _record(level, msg, args, exc)
    else:  # a factory of the program's own (OpenTelemetry's adds trace ids): through it
        record = TRACE.makeRecord(TRACE.name, level, __file__, _LINE, msg, args, exc, "_emit")
    record.task_name = name
    record.task_id = task_id
    TRACE.handle(record)


_LINE = _emit.__code__.co_firstlineno
#: A record made once, in the main greenlet: what every task line's record shares.
_TEMPLATE = logging.LogRecord(TRACE.name, INFO, __file__, _LINE, "", (), None, "_emit").__dict__
_START = (_TEMPLATE["created"], _TEMPLATE["relativeCreated"])
_LEVEL_NAMES = {INFO: logging.getLevelName(INFO), ERROR: logging.getLevelName(ERROR)}
_new_record = logging.LogRecord.__new__
_now = time.time


def _record(level: int, msg: str, args: tuple[Any, ...], exc: ExcInfo | None) -> logging.LogRecord:
    """A :class:`logging.LogRecord` as ``LogRecord(...)`` makes it, less what costs per line
    under a green hub: ``threading.current_thread()`` in a task's greenlet, new for each
    task, makes a dummy thread each time.  The thread fields are those of the thread that
    runs the hub (MainThread), the process fields those of this process."""
    record = _new_record(logging.LogRecord)
    fields = _TEMPLATE.copy()
    now = _now()
    fields["created"] = now
    fields["msecs"] = int((now - int(now)) * 1000) + 0.0
    fields["relativeCreated"] = _START[1] + (now - _START[0]) * 1000
    fields["msg"] = msg
    fields["args"] = args
    fields["levelno"] = level
    fields["levelname"] = _LEVEL_NAMES[level]
    fields["exc_info"] = exc
    fields["process"] = _PID[0]
    record.__dict__ = fields
    return record


#: This process's id, renewed in a forked child (a program may fork after importing this).
_PID = [os.getpid()]
os.register_at_fork(after_in_child=lambda: _PID.__setitem__(0, os.getpid()))


def task_received(name: str, task_id: str) -> None:
    """``Task <name>[<id>] received`` (INFO): a task message became a request."""
    if TRACE.isEnabledFor(INFO):
        _emit(INFO, LOG_RECEIVED, (name, task_id), name, task_id, None)


def task_succeeded(name: str, task_id: str, runtime: float, result: Any) -> None:
    """``Task <name>[<id>] succeeded in <runtime>s: <repr of the result>`` (INFO)."""
    if TRACE.isEnabledFor(INFO):
        _emit(INFO, LOG_SUCCESS, (name, task_id, runtime, _Repr(result)), name, task_id, None)


def task_failed(name: str, task_id: str, exc: BaseException) -> None:
    """``Task <name>[<id>] raised unexpected: <repr of exc>`` (ERROR), ``exc`` as the
    record's ``exc_info``: the traceback follows the line, and handlers (Sentry's) get
    the exception itself."""
    if TRACE.isEnabledFor(ERROR):
        info = (type(exc), exc, exc.__traceback__)
        _emit(ERROR, LOG_FAILURE, (name, task_id, exc), name, task_id, info)


def task_retried(name: str, task_id: str, reason: object) -> None:
    """``Task <name>[<id>] retry: Retry in <n>s: <repr of exc>`` (INFO)."""
    if TRACE.isEnabledFor(INFO):
        _emit(INFO, LOG_RETRY, (name, task_id, reason), name, task_id, None)


def task_timed_out(name: str, task_id: str, hard: float) -> None:
    """``Hard time limit (<n>s) exceeded for <name>[<id>]`` (ERROR): the task was killed."""
    if TRACE.isEnabledFor(ERROR):
        _emit(ERROR, LOG_HARD_LIMIT, (hard, name, task_id), name, task_id, None)


class _Repr:
    """A result's repr, made when the line is first formatted (never if no handler takes
    it), once however many handlers format it."""

    __slots__ = ("text", "value")

    def __init__(self, value: Any) -> None:
        self.value = value
        self.text: str | None = None

    def __str__(self) -> str:
        if self.text is None:
            self.text = short_repr(self.value)
            self.value = None  # the line keeps its text, not the result
        return self.text


def short_repr(value: Any, maxsize: int = RESULT_REPR_MAX) -> str:
    """``repr(value)`` cut to ``maxsize`` characters; never raises."""
    if isinstance(value, str | bytes) and len(value) > maxsize:
        value = value[:maxsize]  # the repr of a long string: no need to build it whole
    try:
        text = repr(value)
    except Exception as exc:
        return f"<unrepresentable {type(value).__name__}: {exc!r}>"
    return text if len(text) <= maxsize else text[:maxsize] + "..."


# ------------------------------------------------------------ JSON lines


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (ISO 8601, UTC), ``level``, ``logger``,
    ``message``; ``task_name`` and ``task_id`` when the record has them (greenworker's
    task lines, Celery's tracer lines); ``worker`` (the node name); ``exc_info`` (the
    formatted traceback) and ``stack_info`` when present."""

    def __init__(self, worker: str) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        name, task_id = _task_of(record)
        if name is not None:
            doc["task_name"] = name
        if task_id is not None:
            doc["task_id"] = task_id
        doc["worker"] = self.worker
        if record.exc_info:
            doc["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            doc["exc_info"] = record.exc_text
        if record.stack_info:
            doc["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(doc, ensure_ascii=False, default=str)


def _task_of(record: logging.LogRecord) -> tuple[Any, Any]:
    name = getattr(record, "task_name", None)
    task_id = getattr(record, "task_id", None)
    if name is None and task_id is None:
        data = getattr(record, "data", None)  # Celery's tracer passes its context as data
        if isinstance(data, dict):
            return data.get("name"), data.get("id")
    return name, task_id


# ------------------------------------------------------------ the worker command's setup


class TextFormatter(logging.Formatter):
    """:class:`logging.Formatter` that formats each second's time once: ``time.strftime``
    has nothing finer than a second, and the task lines come thousands a second."""

    def __init__(self, fmt: str | None = None, datefmt: str | None = None) -> None:
        super().__init__(fmt, datefmt)
        self._second: int | None = None
        self._stamp = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        if second != self._second:
            ct = self.converter(record.created)
            self._stamp = time.strftime(datefmt or self.default_time_format, ct)
            self._second = second
        if datefmt or not self.default_msec_format:
            return self._stamp
        return self.default_msec_format % (self._stamp, record.msecs)


class _FlushPerTurn(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes each line when it comes and flushes within :data:`FLUSH_DELAY`: the INFO
    and DEBUG lines of those 20 ms (the tasks', the messages'...) reach the file in one
    ``write``.  A WARNING or worse line, a line from another thread (the watchdog's) and
    a line outside a green hub are flushed at once, with all before them; the worker
    flushes before it restarts in place or exits for a blocked hub, and logging at exit."""

    _pending = False
    _hub_thread: int | None = None
    _thread: Callable[[], int] | None = None

    def watch_hub(self) -> None:
        """Flush per turn from now on: the caller runs the hub's thread, patched."""
        self._thread = green.real_thread_ident_function()
        self._hub_thread = self._thread()

    def emit(self, record: logging.LogRecord) -> None:
        thread = self._thread
        if record.levelno >= logging.WARNING or thread is None or thread() != self._hub_thread:
            super().emit(record)
            return
        try:
            self._write(self.format(record) + self.terminator)
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)
            return
        if not self._pending:
            self._pending = True
            green.spawn(self._flush_turn)

    def _write(self, text: str) -> None:
        self.stream.write(text)

    def _flush_turn(self) -> None:
        # a moment rather than one hub turn: a turn under load holds a line or two, and a
        # write per line costs more than the line
        green.sleep(FLUSH_DELAY)
        self._pending = False
        self.flush()


class Stderr(_FlushPerTurn):
    """The worker command's handler without ``-f``."""


class LogFile(_FlushPerTurn, WatchedFileHandler):
    """Celery's handler for ``-f``: the file is reopened when logrotate moves it, here
    noticed within a second (one ``stat`` a second rather than one a line)."""

    _next_check = 0.0

    def reopenIfNeeded(self) -> None:
        now = time.monotonic()
        if now >= self._next_check:
            self._next_check = now + 1.0
            super().reopenIfNeeded()

    def _write(self, text: str) -> None:
        self.reopenIfNeeded()
        if self.stream is None:  # closed, or not opened yet
            self.stream = self._open()
        self.stream.write(text)


def early_handler() -> logging.Handler:
    """Where greenworker's own lines go while the app loads: stderr, in the text format,
    on the ``greenworker`` logger only, so that the root logger is still untouched when
    the app's module configures logging (``basicConfig``, ``dictConfig``) on import.
    :func:`configure` removes it."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.getLogger("greenworker").addHandler(handler)
    return handler


def configure(
    *,
    level: str,
    logfile: str | None,
    json_lines: bool,
    worker: str,
    hijack: bool,
    text_format: str | None = None,
    datefmt: str | None = None,
    early: logging.Handler | None = None,
    warn: Callable[[str], None] | None = None,
) -> None:
    """The worker command's logging: the root logger at ``level``, one handler writing
    to ``logfile`` (reopened when logrotate moves it, as Celery's) or stderr, text or
    JSON lines.

    With ``hijack`` (``worker_hijack_root_logger``, True by default as in Celery) the
    root logger's handlers are replaced.  Without it, handlers the app configured stay
    as they are and none is added (``warn`` is told when ``logfile`` or ``json_lines``
    then has no effect); a root logger without handlers gets the worker's.
    """
    if early is not None:
        logging.getLogger("greenworker").removeHandler(early)
    # One process: its name is always MainProcess, no need to ask multiprocessing per line.
    logging.logMultiprocessing = False
    root = logging.getLogger()
    root.setLevel(level.upper())
    own = [h for h in root.handlers if not isinstance(h, logging.NullHandler)]
    if not hijack and own:
        if warn is not None and (logfile or json_lines):
            given = " and ".join(
                what
                for what, on in (("-f/--logfile", logfile), ("--log-format json", json_lines))
                if on
            )
            warn(
                f"{given}: not applied; worker_hijack_root_logger is False and the root "
                "logger has handlers of the app's own, which are kept"
            )
        return
    formatter = _formatter(json_lines, worker, text_format, datefmt, warn)
    handler = LogFile(logfile, encoding="utf-8") if logfile else Stderr(sys.stderr)
    handler.setFormatter(formatter)
    if green.patched_by() is not None:
        handler.watch_hub()
    if hijack:
        for previous in list(root.handlers):
            root.removeHandler(previous)
    root.addHandler(handler)


def _formatter(
    json_lines: bool,
    worker: str,
    text_format: str | None,
    datefmt: str | None,
    warn: Callable[[str], None] | None,
) -> logging.Formatter:
    if json_lines:
        unused = [
            name
            for name, value in (("worker_log_format", text_format), ("worker_log_datefmt", datefmt))
            if value
        ]
        if unused and warn is not None:
            warn(f"{' and '.join(unused)}: not used for JSON lines (--log-format json)")
        return JsonFormatter(worker)
    try:
        return TextFormatter(text_format or LOG_FORMAT, datefmt=datefmt)
    except ValueError as exc:  # a %-format that does not parse
        raise ValueError(f"worker_log_format {text_format!r}: {exc}") from None
