"""The event loop ``serve`` runs on: uvloop when it is installed, else asyncio's own.

uvloop is optional (``pip install '/path/to/checkout[uvloop]'``); both loops
run the same code, signals included (see :mod:`.signals`).
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["LOOPS", "default_loop", "loop_factory", "run"]

LOOPS = ("uvloop", "asyncio")
T = TypeVar("T")


def default_loop() -> str:
    """``"uvloop"`` if it can be imported, else ``"asyncio"`` (no import: a spec look-up)."""
    return "uvloop" if importlib.util.find_spec("uvloop") is not None else "asyncio"


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """A new-loop callable for ``name``; ``ValueError`` if unknown or not installed."""
    if name == "asyncio":
        return asyncio.new_event_loop
    if name == "uvloop":
        try:
            import uvloop
        except ImportError:
            raise ValueError(
                "--loop uvloop: uvloop is not installed"
                " (pip install '/path/to/checkout[uvloop]', or '.[uvloop]' in it)"
            ) from None
        return uvloop.new_event_loop
    raise ValueError(f"--loop must be one of {', '.join(LOOPS)}, not {name!r}")


def run(main: Callable[[], Coroutine[Any, Any, T]], loop: str) -> T:
    """Run ``main()`` to completion on a new loop of kind ``loop``, then close that loop."""
    factory = loop_factory(loop)  # before main() exists: no never-awaited coroutine
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main())
