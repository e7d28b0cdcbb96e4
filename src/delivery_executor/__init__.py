"""Durable, group-committed Maildir delivery for asyncio mail servers.

The store (:class:`Maildir`, :func:`commit_batch`) makes each delivery survive
power loss; the :class:`DeliveryExecutor` shares its syncs between concurrent
callers on any loop or thread; :class:`DeliveryHandler` plugs it into an
aiosmtpd server, and :func:`serve` is the ``delivery-executor serve`` command.

The store, the executor and the writers load with the package; the SMTP/LMTP
layer and the server load on first use of one of their names (PEP 562), so
``from delivery_executor import Maildir`` imports no aiosmtpd and no server.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    DeliveryError,
    ExecutorClosed,
    ExecutorCrashed,
    InvalidMaildirPath,
    InvalidMessageId,
    MessageTooLarge,
    RecipientRejected,
    TooManyParts,
)
from .executor import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_CONCURRENT_FLUSHES,
    DEFAULT_MAX_QUEUED_BYTES,
    DEFAULT_MAX_WAIT,
    BatchPolicy,
    DeliveryExecutor,
    WriterName,
)
from .fsops import HAVE_SYNCFS, FsOps
from .stats import ExecutorStats
from .store import (
    AUTO_SYNCFS_MIN_FILES,
    Body,
    Flag,
    Maildir,
    MaildirEntry,
    Message,
    MessageId,
    SyncMode,
    add_flag,
    commit_batch,
    parse_flags,
    serialize_flags,
)
from .writers import (
    INLINE_WRITE_LIMIT,
    BatchResult,
    BatchWriter,
    BlockingWriter,
    LoopWriter,
    ProcessWriter,
    ThreadWriter,
    write_batch,
)

if TYPE_CHECKING:
    from ._version import __version__
    from .recipients import MailboxResolver
    from .server import ServerConfig, ServerSummary, StartupError, run_server, serve
    from .smtp import BulkDataMixin, DeliveryHandler, DeliveryLMTP, DeliverySMTP, SessionFactory

# name -> the module that defines it, imported on first access.
_LAZY = {
    "__version__": "._version",  # importlib.metadata costs more than the rest together
    "MailboxResolver": ".recipients",
    "ServerConfig": ".server",
    "ServerSummary": ".server",
    "StartupError": ".server",
    "run_server": ".server",
    "serve": ".server",
    "BulkDataMixin": ".smtp",
    "DeliveryHandler": ".smtp",
    "DeliveryLMTP": ".smtp",
    "DeliverySMTP": ".smtp",
    "SessionFactory": ".smtp",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "AUTO_SYNCFS_MIN_FILES",
    "DEFAULT_MAX_BATCH",
    "DEFAULT_MAX_CONCURRENT_FLUSHES",
    "DEFAULT_MAX_QUEUED_BYTES",
    "DEFAULT_MAX_WAIT",
    "HAVE_SYNCFS",
    "INLINE_WRITE_LIMIT",
    "BatchPolicy",
    "BatchResult",
    "BatchWriter",
    "BlockingWriter",
    "Body",
    "BulkDataMixin",
    "DeliveryError",
    "DeliveryExecutor",
    "DeliveryHandler",
    "DeliveryLMTP",
    "DeliverySMTP",
    "ExecutorClosed",
    "ExecutorCrashed",
    "ExecutorStats",
    "Flag",
    "FsOps",
    "InvalidMaildirPath",
    "InvalidMessageId",
    "LoopWriter",
    "MailboxResolver",
    "Maildir",
    "MaildirEntry",
    "Message",
    "MessageId",
    "MessageTooLarge",
    "ProcessWriter",
    "RecipientRejected",
    "ServerConfig",
    "ServerSummary",
    "SessionFactory",
    "StartupError",
    "SyncMode",
    "ThreadWriter",
    "TooManyParts",
    "WriterName",
    "__version__",
    "add_flag",
    "commit_batch",
    "parse_flags",
    "run_server",
    "serialize_flags",
    "serve",
    "write_batch",
]
