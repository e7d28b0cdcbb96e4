"""Limits that keep a hostile Sieve script from costing more than a bounded amount.

Checked at compile time (size, nesting) and while running (actions, steps,
CPU time). A script over a run-time limit fails with
:class:`~delivery_executor.errors.SieveRuntimeError`; the message is then kept
in INBOX (implicit keep), as Pigeonhole does on a runtime error.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import validate

__all__ = ["Limits"]


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on one script (compile) and one run (per message).

    max_script_bytes: source size (Pigeonhole's ``sieve_max_script_size``, 1 MiB).
    max_nesting: depth of blocks and of nested tests (Pigeonhole: 32).
    max_actions: actions one run may collect (Pigeonhole's ``sieve_max_actions``, 32).
    max_steps: work units per run: one per test, command and character compared
        (bounds ``:matches`` and huge headers without timing anything).
    max_cpu_seconds: process CPU time one run may take, counted from its
        first check and checked every few thousand steps (a run shorter than
        that never reads the clock).
    max_variable_bytes: longest variable value; longer values are truncated
        (RFC 5229 section 3; Pigeonhole: 4 KiB).
    """

    max_script_bytes: int = 1 << 20
    max_nesting: int = 32
    max_actions: int = 32
    max_steps: int = 2_000_000
    max_cpu_seconds: float = 0.5
    max_variable_bytes: int = 4000

    def __post_init__(self) -> None:
        for field in (
            "max_script_bytes",
            "max_nesting",
            "max_actions",
            "max_steps",
            "max_variable_bytes",
        ):
            validate.count(f"Limits.{field}", getattr(self, field))
        cpu = validate.seconds(  # infinity: no CPU limit
            "Limits.max_cpu_seconds", self.max_cpu_seconds, positive=True, infinite=True
        )
        object.__setattr__(self, "max_cpu_seconds", cpu)  # a timedelta becomes seconds
