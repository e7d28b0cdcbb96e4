"""The durable Maildir store: the port of mailrs-maildir 1.2, made power-loss safe.

- :mod:`.names`: unique file names and the ``:2,`` flags;
- :mod:`.maildir`: one Maildir on disk (create, deliver, scan, flag, clean up);
- :mod:`.commit`: the commit protocol, as a sans-IO generator of syncs
  (:func:`commit_steps`) and its drivers.
"""

from .commit import (
    AUTO_SYNCFS_MIN_FILES,
    Body,
    Message,
    StepDriver,
    StoreOptions,
    SyncCall,
    SyncMode,
    check_message,
    check_sync,
    commit_batch,
    commit_steps,
    run_sync_call,
)
from .maildir import DEFAULT_TMP_MAX_AGE, Maildir, MaildirEntry, check_maildir_path
from .names import (
    Flag,
    MessageId,
    add_flag,
    check_info_letters,
    check_message_id,
    parse_flags,
    serialize_flags,
    unique_name,
)

__all__ = [
    "AUTO_SYNCFS_MIN_FILES",
    "DEFAULT_TMP_MAX_AGE",
    "Body",
    "Flag",
    "Maildir",
    "MaildirEntry",
    "Message",
    "MessageId",
    "StepDriver",
    "StoreOptions",
    "SyncCall",
    "SyncMode",
    "add_flag",
    "check_info_letters",
    "check_maildir_path",
    "check_message",
    "check_message_id",
    "check_sync",
    "commit_batch",
    "commit_steps",
    "parse_flags",
    "run_sync_call",
    "serialize_flags",
    "unique_name",
]
