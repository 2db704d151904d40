"""Signals for a worker run by the CLI (an embedded worker never installs any).

The handlers only record the signal and wake one supervisor greenlet, which
does the work outside signal context:

* ``SIGTERM``, ``SIGINT``: warm shutdown -- stop consuming, give unstarted
  messages back, let running tasks finish (up to the shutdown timeout) while
  heartbeats and remote control keep answering, flush the state store, close,
  exit 0.  A second one turns it cold.
* ``SIGQUIT``: cold shutdown -- kill running tasks (a message that acks late
  goes back to the queue), close, exit 0 quickly.
* ``SIGHUP``: warm shutdown, then the same command starts again in place (the
  command calls :func:`restart_in_place`).
* ``SIGUSR1``: log every greenlet's stack, naming the task each one runs.

These signals are blocked from :meth:`SignalSupervisor.install` until the worker
has started (:meth:`SignalSupervisor.deliver`), and from a restart in place's
last step until the new process has started: the kernel keeps one that arrives
meanwhile, across the ``exec``, for the new process to handle.  (Unblocked, a
``SIGTERM`` during a restart killed the process before it had a handler: exit
143, its pid file left behind.)
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable

import greenlet as greenlet_module

from .. import green
from .executor import request_in_stack

log = logging.getLogger("greenworker.signals")

#: The signals a CLI worker handles.
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGUSR1)
#: Those that end the process (no restart after them).
_SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)


def block_signals() -> None:
    """Hold :data:`HANDLED_SIGNALS` back from this thread (the kernel keeps them pending;
    the mask and what is pending survive an ``exec``)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)


def unblock_signals() -> None:
    """Let :data:`HANDLED_SIGNALS` in again: those pending arrive now."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)


class SignalSupervisor:
    """Turns signals into calls: ``warm_stop()`` must return at once (the worker's
    ``request_stop``); ``cold_stop()`` runs in its own greenlet and kills what runs;
    ``running_tasks()`` counts the tasks running, for the log line."""

    def __init__(
        self,
        *,
        warm_stop: Callable[[], None],
        cold_stop: Callable[[], None],
        running_tasks: Callable[[], int],
        on_shutdown: Callable[[str, str], object] | None = None,
    ) -> None:
        """``on_shutdown(signal name, "Warm" or "Cold")`` is told of each shutdown a signal
        starts, before it starts (Celery's ``worker_shutting_down``)."""
        self.warm_stop = warm_stop
        self.cold_stop = cold_stop
        self.running_tasks = running_tasks
        self.on_shutdown = on_shutdown
        self.pending: list[int] = []
        #: SIGHUP asked for a restart in place.
        self.restart = False
        #: SIGTERM, SIGINT or SIGQUIT asked for a shutdown (it wins over a restart).
        self.shutdown = False
        self._wake = green.new_event()
        self._stopping = False

    def install(self) -> None:
        """Handle the signals; they stay blocked until :meth:`deliver` (the worker is
        not started yet: a warm stop now would find nothing to stop)."""
        block_signals()
        for signum in HANDLED_SIGNALS:
            green.on_signal(signum, self._flag(signum))
        green.spawn(self._supervise)

    def deliver(self) -> None:
        """The worker has started: signals come in, those held back first."""
        unblock_signals()

    def hold_for_restart(self) -> bool:
        """Block the signals for a restart in place (the new process handles what comes
        from now on); True if a shutdown signal came before (then there is no restart)."""
        block_signals()
        green.sleep(0)  # the handler greenlet of a signal that came just before runs
        return self.shutdown or any(signum in _SHUTDOWN_SIGNALS for signum in self.pending)

    def _flag(self, signum: int) -> Callable[[], None]:
        def handler() -> None:  # only records the signal: the supervisor acts on it
            self.pending.append(signum)
            self._wake.set()

        return handler

    def _supervise(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            while self.pending:
                self._act(self.pending.pop(0))

    def _act(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGUSR1:
            log.warning("%s: greenlet stacks follow\n%s", name, dump_stacks())
            return
        if signum != signal.SIGHUP:
            self.shutdown = True
            self.restart = False
        if signum == signal.SIGQUIT or (self._stopping and signum != signal.SIGHUP):
            log.warning("%s: cold shutdown, killing %d running task(s)", name, self.running_tasks())
            self._stopping = True
            self._announce(name, "Cold")
            green.spawn(self.cold_stop)
            return
        if self._stopping:
            return
        self._stopping = True
        self.restart = signum == signal.SIGHUP
        log.info("%s: warm shutdown%s", name, " and restart" if self.restart else "")
        self._announce(name, "Warm")
        self.warm_stop()

    def _announce(self, name: str, how: str) -> None:
        if self.on_shutdown is not None:
            try:
                self.on_shutdown(name, how)
            except Exception:  # a listener never stops the shutdown
                log.exception("a shutdown listener raised; ignored")


def restart_in_place(
    *,
    cwd: str | None = None,
    executable: str | None = None,
    environ: dict[str, str] | None = None,
) -> None:
    """Replace this process (same pid) with the same command line: after a SIGHUP or a
    ``worker_max_*_per_child`` limit, and for ``-D``.  ``cwd`` is where the command was
    started (its relative paths, ``--workdir`` among them, are read from there);
    ``executable`` replaces the Python interpreter (Celery's ``--executable``)."""
    block_signals()  # a signal from here on is the new process's to handle
    program = executable or sys.executable
    argv = [program, *sys.orig_argv[1:]]
    log.info("restarting: %s", " ".join(argv))
    for handler in logging.getLogger().handlers:
        handler.flush()
    if cwd is not None:
        os.chdir(cwd)
    os.execve(program, argv, os.environ if environ is None else environ)


def dump_stacks() -> str:
    """Every live greenlet's stack, headed by the task it runs (if any)."""
    blocks = []
    for obj in gc.get_objects():
        if not isinstance(obj, greenlet_module.greenlet) or obj.dead:
            continue
        frame = obj.gr_frame
        if frame is None:
            continue
        request = request_in_stack(frame)
        task = "no task" if request is None else f"task {request.name}[{request.id}]"
        stack = "".join(traceback.format_stack(frame))
        blocks.append(f"--- greenlet {id(obj):#x} ({task})\n{stack}")
    return "\n".join(blocks) or "(no greenlets)"
