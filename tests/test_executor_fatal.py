"""Writer failures that must not strand callers: SystemExit from a writer, oversized frames."""

from __future__ import annotations

import mmap
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest

from delivery_executor import DeliveryExecutor, ExecutorCrashed
from delivery_executor.writers import BatchResult, Group, ProcessWriter
from delivery_executor.writers.process import encode_request

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
    home = ex._handoff.thread  # the private home loop's thread: SystemExit went on and ended it
    assert home is not None
    home.join(10)
    assert not home.is_alive()
    assert escaped == [("delivery-executor", SystemExit)]
    ex.close()  # returns although the home loop is gone


@pytest.mark.asyncio
async def test_a_batch_past_the_4_gib_frame_fails_clearly_and_leaks_nothing(
    tmp_path: Path,
) -> None:
    """A 4 GiB body (virtual memory only) is a ValueError from acommit; no future is left."""
    with mmap.mmap(-1, 1 << 32) as huge:
        view = memoryview(huge)
        try:
            with pytest.raises(ValueError, match="too large for the helper's 4 GiB frame"):
                encode_request(1, [(str(tmp_path / "m"), [(view,)])])
            writer = ProcessWriter(thread_above=None)  # the pipe path: the frame limit applies
            with pytest.raises(ValueError, match="4 GiB frame"):
                await writer.acommit([(str(tmp_path / "m"), [(view,)])])
            assert writer._helpers[0].waiting == {}  # nothing registered, nothing to settle later
            assert repr(writer).endswith("pids=[None] waiting=0>")  # and no helper was started
            await writer.aclose()
        finally:
            view.release()
