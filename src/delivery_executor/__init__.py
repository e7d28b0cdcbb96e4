"""Durable, group-committed Maildir delivery for asyncio mail servers.

The store (:class:`Maildir`, :func:`commit_batch`) makes each delivery survive
power loss; the :class:`DeliveryExecutor` shares its syncs between concurrent
callers on any loop or thread; :class:`DeliveryHandler` plugs it into an
aiosmtpd server, and :func:`serve` is the ``delivery-executor serve`` command.
"""

from importlib.metadata import PackageNotFoundError, version

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
from .recipients import MailboxResolver
from .server import ServerConfig, ServerSummary, run_server, serve
from .smtp import BulkDataMixin, DeliveryHandler, DeliveryLMTP, DeliverySMTP, SessionFactory
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

try:
    __version__ = version("delivery-executor")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

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
