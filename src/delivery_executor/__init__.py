"""Durable, group-committed Maildir delivery for asyncio mail servers.

The store (:class:`Maildir`, :func:`commit_batch`) makes each delivery survive
power loss; the :class:`DeliveryExecutor` shares its syncs between concurrent
callers.
"""

from .errors import (
    DeliveryError,
    ExecutorClosed,
    ExecutorCrashed,
    InvalidMaildirPath,
    MessageTooLarge,
    RecipientRejected,
)
from .executor import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_CONCURRENT_FLUSHES,
    DEFAULT_MAX_QUEUED_BYTES,
    DEFAULT_MAX_WAIT,
    INLINE_WRITE_LIMIT,
    BatchPolicy,
    DeliveryExecutor,
    ExecutorStats,
)
from .fsops import HAVE_SYNCFS, FsOps
from .maildir import (
    AUTO_SYNCFS_MIN_FILES,
    Body,
    Flag,
    Maildir,
    MaildirEntry,
    MessageId,
    SyncMode,
    add_flag,
    commit_batch,
    parse_flags,
    serialize_flags,
)
from .offproc import ProcessWriter
from .recipients import MailboxResolver
from .writer import BatchResult, BatchWriter, MaildirWriter

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
    "Body",
    "DeliveryError",
    "DeliveryExecutor",
    "ExecutorClosed",
    "ExecutorCrashed",
    "ExecutorStats",
    "Flag",
    "FsOps",
    "InvalidMaildirPath",
    "MailboxResolver",
    "Maildir",
    "MaildirEntry",
    "MaildirWriter",
    "MessageId",
    "MessageTooLarge",
    "ProcessWriter",
    "RecipientRejected",
    "SyncMode",
    "add_flag",
    "commit_batch",
    "parse_flags",
    "serialize_flags",
]

__version__ = "0.1.0"
