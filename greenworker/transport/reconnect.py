"""Reconnecting to the broker: the one retry loop (:func:`retry_until_stopped`), the
backoff between attempts, the retries of the parts with a connection of their own,
and one log line per burst of failed writes.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from .. import green

if TYPE_CHECKING:
    from .base import TaskConsumer

log = logging.getLogger("greenworker.consumer")


#: The first pause before reconnecting; each failed attempt doubles it (up to the cap).
FIRST_BACKOFF = 0.5
#: A connection that stayed up this long ends an outage: the next one backs off from the start.
STABLE_AFTER = 2.0


class RetryPolicy(Protocol):
    """What one part does around the attempts of :func:`retry_until_stopped`."""

    def before_attempt(self) -> None:
        """Called before each attempt (it may wait)."""
        ...

    def lost(self, exc: Exception, attempt_seconds: float) -> None:
        """The attempt failed after ``attempt_seconds``: clean up, even when stopping."""
        ...

    def pause(self, exc: Exception) -> float | None:
        """Not stopping: log the failure as this part does; return the pause to take,
        or None to give up (the loop ends)."""
        ...

    def paused(self, exc: Exception) -> None:
        """The pause is over and the loop goes on: anything to say after it."""
        ...


def retry_until_stopped(
    attempt: Callable[[], None], stop: green.Event, policy: RetryPolicy
) -> None:
    """Run ``attempt`` (connect, then consume until stopped) until it returns, ``stop``
    is set or ``policy`` gives up; after each failure pause as ``policy`` says, then try
    again.  Setting ``stop`` ends a pause at once: a part stopped without its broker
    exits now."""
    while not stop.is_set():
        policy.before_attempt()
        started = time.monotonic()
        try:
            attempt()
            return
        except green.GreenletExit:
            raise
        except Exception as exc:
            policy.lost(exc, time.monotonic() - started)
            if stop.is_set():
                return
            pause = policy.pause(exc)
            if pause is None:
                return
            stop.wait(pause)
            if stop.is_set():
                return
            policy.paused(exc)


class Backoff:
    """Pauses between connection attempts: doubling from :data:`FIRST_BACKOFF` up to
    ``maximum``, each one jittered to half to all of its step, so that the workers of
    one outage do not all come back at the same instant."""

    def __init__(self, maximum: float) -> None:
        self.maximum = maximum
        self._step = FIRST_BACKOFF

    def next_pause(self) -> float:
        pause = min(self._step, self.maximum) * (0.5 + random.random() / 2)
        self._step = min(self._step * 2, self.maximum)
        return pause

    def connected_for(self, seconds: float) -> None:
        """A connection was up for ``seconds``: once it stayed up, start over."""
        if seconds >= STABLE_AFTER:
            self._step = FIRST_BACKOFF


class FailureBurst:
    """Counts failures of one kind and logs each burst as one line with the count.

    The line goes out once no failure came for ``quiet`` seconds (or at
    :meth:`flush`): a lost connection fails every ack of its tasks, and one
    line says so better than hundreds.
    """

    def __init__(self, what: str, consequence: str, quiet: float = 0.5) -> None:
        self.what = what
        self.consequence = consequence
        self.quiet = quiet
        self.count = 0
        self._last_error: BaseException | str | None = None
        self._reporter: green.Greenlet | None = None

    def add(self, error: BaseException | str, count: int = 1) -> None:
        self.count += count
        self._last_error = error
        if self._reporter is None:
            self._reporter = green.spawn(self._report_when_quiet)

    def _report_when_quiet(self) -> None:
        seen = -1
        while seen != self.count:
            seen = self.count
            green.sleep(self.quiet)
        self._reporter = None
        self.flush()

    def flush(self) -> None:
        """Log what was counted (if anything) now."""
        if self._reporter is not None:
            reporter, self._reporter = self._reporter, None
            reporter.kill()
        if self.count:
            log.warning(
                "could not %s %d message(s): %s; %s",
                self.what,
                self.count,
                self._last_error,
                self.consequence,
            )
        self.count = 0
        self._last_error = None


class ConnectionRetry:
    """The retry policy of a part with a connection of its own beside the task
    consumer's (remote control, gossip), for :func:`retry_until_stopped`.

    It connects only while the consumer is connected, and backs off as the consumer
    does.  A broker outage is the consumer's to report (one line per retry for the
    whole worker), so a failure is logged as a warning only when the consumer kept its
    connection through it: then the trouble is this part's own.  ``on_lost`` is called
    at each failure (the part is not ready any more).
    """

    def __init__(
        self,
        part: str,
        consumer: TaskConsumer,
        max_backoff: float,
        *,
        on_lost: Callable[[], None],
    ) -> None:
        self.part = part
        self.consumer = consumer
        self.backoff = Backoff(max_backoff)
        self._on_lost = on_lost
        self._generation = 0

    def before_attempt(self) -> None:
        """Block until the task consumer is connected (at once if it is): no broker,
        nothing to retry before."""
        self.consumer.wait_ready(None)
        self._generation = self.consumer.connection_generation

    def lost(self, exc: Exception, attempt_seconds: float) -> None:
        self._on_lost()
        self.backoff.connected_for(attempt_seconds)

    def pause(self, exc: Exception) -> float:
        pause = self.backoff.next_pause()
        log.debug(
            "%s connection error: %s: %s; again in %.1fs", self.part, type(exc).__name__, exc, pause
        )
        return pause

    def paused(self, exc: Exception) -> None:
        """Say so if the consumer's connection did not fail too."""
        # judged after the pause: the consumer may see a shared outage a moment later
        if self.consumer.ready and self.consumer.generation_alive(self._generation):
            log.warning(
                "%s connection error: %s: %s (the task consumer is connected); trying again",
                self.part,
                type(exc).__name__,
                exc,
            )
