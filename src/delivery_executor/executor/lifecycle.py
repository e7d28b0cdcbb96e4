"""The executor's lifecycle: one value, moved forward only.

``IDLE`` (no home loop yet) -> ``OPEN`` (home bound, collector running) ->
``CLOSING`` (``aclose()`` begun) -> ``CLOSED`` (closed, or the home loop
ended). A collector that dies moves to ``CRASHED`` from any open state, and
``CRASHED_CLOSED`` once a close begins or the home loop ends after that: a
crash stays visible (``deliver()`` raises :class:`ExecutorCrashed`) while
``closed`` still says whether a close has begun.
"""

from __future__ import annotations

import enum

__all__ = ["Lifecycle"]


class Lifecycle(enum.IntEnum):
    """Where an executor is; ``>= CLOSING`` refuses new requests."""

    IDLE = 0
    OPEN = 1
    CLOSING = 2
    CLOSED = 3
    CRASHED = 4
    CRASHED_CLOSED = 5

    def crashed(self) -> Lifecycle:
        """The state after the collector died in this one."""
        return Lifecycle.CRASHED if self < Lifecycle.CLOSING else Lifecycle.CRASHED_CLOSED

    def closing(self, to: Lifecycle) -> Lifecycle:
        """The state after moving toward ``to`` (``CLOSING`` or ``CLOSED``) from this one."""
        if self >= Lifecycle.CRASHED:
            return Lifecycle.CRASHED_CLOSED
        return max(self, to)

    @property
    def closed(self) -> bool:
        """A close has begun, or the home loop ended."""
        return self is not Lifecycle.CRASHED and self >= Lifecycle.CLOSING

    @property
    def label(self) -> str:
        """The word ``repr`` shows: idle, open, closing, closed or crashed."""
        return "crashed" if self >= Lifecycle.CRASHED else self.name.lower()
