"""Batch writers: where and how the executor's batches are made durable.

Every writer satisfies :class:`BatchWriter` (``await acommit(groups)``,
``await aclose()``). Pick one by name in ``DeliveryExecutor(writer=...)``:

- ``"loop"``: :class:`LoopWriter`, page-cache work on the loop, syncs in a
  thread (the library's default);
- ``"thread"``: :class:`ThreadWriter`, the whole batch in a thread;
- ``"process"``: :class:`ProcessWriter`, the whole batch in a helper process
  (``serve``'s default).
"""

from .base import (
    AnyGroup,
    BatchResult,
    BatchWriter,
    BlockingWriter,
    FlaggedGroup,
    Group,
    GroupResult,
    write_batch,
)
from .local import INLINE_WRITE_LIMIT, LoopWriter, ThreadWriter
from .process import ProcessWriter

__all__ = [
    "INLINE_WRITE_LIMIT",
    "AnyGroup",
    "BatchResult",
    "BatchWriter",
    "BlockingWriter",
    "FlaggedGroup",
    "Group",
    "GroupResult",
    "LoopWriter",
    "ProcessWriter",
    "ThreadWriter",
    "write_batch",
]
