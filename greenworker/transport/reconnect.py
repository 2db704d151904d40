"""Reconnecting to the broker: the backoff between attempts, the retries of the
parts with a connection of their own, and one log line per burst of failed writes.
"""

from __future__ import annotations

import logging
import random
import time
from typing import TYPE_CHECKING

from .. import green

if TYPE_CHECKING:
    from ..client.app import App
    from .consumer import Reconnecting

log = logging.getLogger("greenworker.consumer")


#: The first pause before reconnecting; each failed attempt doubles it (up to the cap).
FIRST_BACKOFF = 0.5
#: A connection that stayed up this long ends an outage: the next one backs off from the start.
STABLE_AFTER = 2.0


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
    """The retries of a part with a connection of its own beside the task consumer's
    (remote control, gossip).

    It connects only while the consumer is connected, and backs off as the consumer
    does.  A broker outage is the consumer's to report (one line per retry for the
    whole worker), so a failure is logged as a warning only when the consumer kept its
    connection through it: then the trouble is this part's own.
    """

    def __init__(self, part: str, consumer: Reconnecting, app: App) -> None:
        self.part = part
        self.consumer = consumer
        self.backoff = Backoff(app.conf.broker_connection_max_backoff)
        self._attempt_started = 0.0
        self._generation = 0

    def wait_for_consumer(self) -> None:
        """Block until the task consumer is connected (at once if it is)."""
        self.consumer.wait_ready(None)
        self._attempt_started = time.monotonic()
        self._generation = self.consumer.connection_generation

    def failed(self, exc: BaseException) -> None:
        """The connection failed (or broke): pause, then say so if the consumer's did not."""
        self.backoff.connected_for(time.monotonic() - self._attempt_started)
        pause = self.backoff.next_pause()
        log.debug(
            "%s connection error: %s: %s; again in %.1fs", self.part, type(exc).__name__, exc, pause
        )
        green.sleep(pause)
        # judged after the pause: the consumer may see a shared outage a moment later
        if self.consumer.ready and self.consumer.generation_alive(self._generation):
            log.warning(
                "%s connection error: %s: %s (the task consumer is connected); trying again",
                self.part,
                type(exc).__name__,
                exc,
            )
