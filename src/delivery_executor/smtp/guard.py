"""What a session's protocol (:mod:`.protocol`) asks of the guard watching it.

:class:`~.sessions.SessionGuard` is the implementation; this Protocol lets
the protocol module name it without importing :mod:`.sessions`, which imports
the protocol classes (no import cycle).
"""

from __future__ import annotations

from typing import Protocol

from .data_budget import DataBudget, DataHold

__all__ = ["Guard", "GuardFactory"]


class GuardFactory(Protocol):
    """The server-wide side of the guard: the DATA budget and how long DATA waits for it."""

    @property
    def budget(self) -> DataBudget: ...

    @property
    def data_wait(self) -> float: ...


class Guard(Protocol):
    """One session's fairness and DATA-budget hooks, called by the protocol."""

    hold: DataHold | None

    @property
    def factory(self) -> GuardFactory: ...

    def received(self, data: bytes) -> bool: ...

    def hook(self, running: bool, command: str = "") -> None: ...

    def data_started(self) -> None: ...

    def data_done(self) -> None: ...

    def paused(self, paused: bool) -> None: ...

    def stop(self) -> None: ...
