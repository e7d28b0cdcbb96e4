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

__all__ = [
    "AUTO_SYNCFS_MIN_FILES",
    "HAVE_SYNCFS",
    "Body",
    "DeliveryError",
    "ExecutorClosed",
    "ExecutorCrashed",
    "Flag",
    "FsOps",
    "InvalidMaildirPath",
    "Maildir",
    "MaildirEntry",
    "MessageId",
    "MessageTooLarge",
    "SyncMode",
    "add_flag",
    "commit_batch",
    "parse_flags",
    "serialize_flags",
]

__version__ = "0.1.0"
