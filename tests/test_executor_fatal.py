"""A writer raising SystemExit/KeyboardInterrupt: every caller is answered before it goes on."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import pytest

from delivery_executor import DeliveryExecutor, ExecutorCrashed
from delivery_executor.writers import BatchResult, Group

pytestmark = pytest.mark.timeout(30)


class ExitingWriter:
    """A batch writer whose every batch raises SystemExit, as sys.exit() in a plug-in would."""

    def __init__(self) -> None:
        self.batches = 0

    async def acommit(self, groups: Sequence[Group]) -> BatchResult:
        self.batches += 1
        raise SystemExit(3)

    async def aclose(self) -> None:
        pass


def test_systemexit_from_a_writer_settles_every_caller_then_propagates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four blocked callers all get ExecutorCrashed (cause: SystemExit); then it ends the loop."""
    escaped: list[tuple[str, type[BaseException]]] = []
    monkeypatch.setattr(
        threading,
        "excepthook",
        lambda a: escaped.append((a.thread.name, a.exc_type)),
    )
    writer = ExitingWriter()
    ex = DeliveryExecutor(writer=writer, policy="window", max_batch=4, max_wait=5.0)
    ex.start_thread()
    outcomes: list[BaseException | object] = [None] * 4

    def call(i: int) -> None:
        try:
            outcomes[i] = ex.deliver_sync(tmp_path / "m", b"x", timeout=10)
        except BaseException as exc:  # the outcome is what is checked
            outcomes[i] = exc

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    assert writer.batches == 1  # one batch of four: all were answered by that one failure
    for out in outcomes:
        assert isinstance(out, ExecutorCrashed), out
        assert isinstance(out.__cause__, SystemExit)
    home = ex._thread  # the private home loop's thread: SystemExit went on and ended it
    assert home is not None
    home.join(10)
    assert not home.is_alive()
    assert escaped == [("delivery-executor", SystemExit)]
    ex.close()  # returns although the home loop is gone
