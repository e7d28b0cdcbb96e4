"""Mutation check: each known weakening of the code must make the suite fail.

``python3 tasks.py mutate`` (or ``.venv/bin/python -m tests.mutants``) copies
the working tree to a scratch directory per mutant, applies one mutation
(an exact text replacement, which must match once), runs the tests meant to
catch it there (``PYTHONPATH`` points at the copy, so helper processes and
``serve`` run the mutant too) and reports ``killed`` when they fail. It exits
non-zero if any mutant survives, does not apply, or if the same tests fail
without the mutation. CI does not run it: a few minutes on 2 cores.

Options: ``-k TEXT`` runs the mutants whose name contains TEXT; ``-j N`` runs N
at once; ``--list`` prints them.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = "src/delivery_executor/"


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]
    why: str


MUTANTS = [
    Mutant(
        "create-no-parent-fsync",
        PKG + "store/maildir.py",
        "            ops.fsync_dir(parent)\n",
        "            pass\n",
        ("tests/test_crash_states.py", "-k", "brand_new"),
        "Maildir.create no longer fsyncs the parents of the directories it makes",
    ),
    Mutant(
        "create-outside-the-seam",
        PKG + "store/maildir.py",
        "                ops.mkdir(d)\n",
        "                os.mkdir(d, 0o700)\n",
        ("tests/test_crash_states.py", "-k", "brand_new"),
        "Maildir.create makes tmp/new/cur with the OS directly, unseen by the checker",
    ),
    Mutant(
        "tmp-open-without-o-excl",
        PKG + "fsops.py",
        "_O_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL |",
        "_O_NEW = os.O_WRONLY | os.O_CREAT |",
        ("tests/test_store_hardening.py", "-k", "taken_in_tmp or never_opens"),
        "O_EXCL dropped from the tmp file open",
    ),
    Mutant(
        "constant-host-in-names",
        PKG + "store/names.py",
        "_HOST = sanitize_host(socket.gethostname())",
        '_HOST = "localhost"',
        ("tests/test_store_hardening.py", "-k", "host"),
        "the host part of new names made constant",
    ),
    Mutant(
        "no-retry-on-short-write",
        PKG + "fsops.py",
        "while done < total:\n                    done += os.write(fd, data[done:])",
        "if done < total:\n                    done += os.write(fd, data[done:])",
        ("tests/test_store_hardening.py", "-k", "short_writes"),
        "a short write(2) of a one-part message is not continued",
    ),
    Mutant(
        "no-retry-on-short-writev",
        PKG + "fsops.py",
        "            while pending:\n                n = os.writev(fd, pending)",
        "            if pending:\n                n = os.writev(fd, pending)",
        ("tests/test_store_hardening.py", "-k", "short_writes"),
        "a short writev(2) of a headers + body message is not continued",
    ),
    Mutant(
        "stale-maildir-cache",
        PKG + "writers/base.py",
        "            if isinstance(res, OSError) and res.errno in _REOPEN:",
        "            if False:",
        ("tests/test_store_hardening.py", "-k", "recreated or forgets or mounted_over"),
        "the cached Maildir is not dropped on ENOENT/ENOTDIR/ESTALE",
    ),
    Mutant(
        "no-header-sanitising",
        PKG + "smtp/handler.py",
        '    return "".join(c for c in text if " " <= c < "\\x7f") or default',
        "    return text or default",
        ("tests/test_smtp_input.py", "-k", "inject or strips"),
        "client values written into headers unfiltered (CR/LF)",
    ),
    Mutant(
        "no-hidden-part-check",
        PKG + "recipients.py",
        '        if any(not p or p.startswith(".") for p in parts):',
        "        if False:",
        ("tests/test_smtp_input.py", "-k", "mapper"),
        "a mapper may return '.hidden' or 'a/.b'",
    ),
    Mutant(
        "no-control-check-in-mail-from",
        PKG + "smtp/handler.py",
        '        if any(c < " " or "\\x7f" <= c < "\\xa0" for c in address):',
        "        if False:",
        ("tests/test_smtp_input.py", "-k", "mail_from"),
        "NUL and control characters accepted in MAIL FROM",
    ),
    Mutant(
        "rename-replaces",
        PKG + "store/commit.py",
        "            ops.rename_noreplace(src, md.new_prefix + final + md.info)",
        "            ops.rename(src, md.new_prefix + final + md.info)",
        ("tests/test_store_hardening.py", "-k", "collision"),
        "the move into new/ replaces a message already there",
    ),
    Mutant(
        "writeback-without-wait",
        PKG + "fsops.py",
        """        for fd, path in zip(fds, paths, strict=True):
            self.wait_writeback(fd, path)
""",
        """            pass
""",
        ("tests/test_crash_states.py", "-k", "writeback"),
        "the writeback form starts each file's writeback but moves before waiting for it",
    ),
    Mutant(
        "writeback-fsyncs-the-first-directory",
        PKG + "store/commit.py",
        """                last_dir[g.md.dev] = g.md.new_prefix
""",
        """                last_dir.setdefault(g.md.dev, g.md.new_prefix)
""",
        ("tests/test_power_loss.py", "-k", "one_fsync and xfs"),
        "the writeback form's one fsync is of the first directory moved into, not the last",
    ),
    Mutant(
        "writeback-fsync-after-duplicate-records",
        PKG + "store/commit.py",
        """            if dev in held and dev not in recorded:
""",
        """            if dev in held:
""",
        ("tests/test_crash_states.py", "-k", "duplicate_records"),
        "a writeback batch that wrote duplicate records ends with a directory fsync,"
        " leaving the records' data unsynced",
    ),
    Mutant(
        "writeback-fsync-unopenable-directory-fails-neighbours",
        PKG + "store/commit.py",
        """    if err is not None and call[0] == "fsync_dir" and err.errno in _OPEN_ERRORS:
""",
        """    if False:
""",
        ("tests/test_writeback_fsync.py", "-k", "gone_after_its_move or not_readable"),
        "a Maildir removed after its moves makes the directory fsync fail every group"
        " on its file system, not only its own",
    ),
    Mutant(
        "eager-split-with-a-tiny-max-batch",
        PKG + "executor/collector.py",
        """                parts > 1
                and sum""",
        """                parts >= 0
                and sum""",
        ("tests/test_writeback_fsync.py", "-k", "small_max_batch"),
        "the backlog split divides by zero parts when max_batch is below SPLIT_MIN",
    ),
    Mutant(
        "writeback-on-any-file-system",
        PKG + "store/commit.py",
        """        if not getattr(g.md, "ordered", False):
            out.discard(g.md.dev)""",
        """        if False:
            out.discard(g.md.dev)""",
        ("tests/test_crash_states.py", "-k", "every_crash_state and not writeback"),
        "auto takes the writeback form on a file system that does not order it",
    ),
    Mutant(
        "ext4-without-journal-ordered",
        PKG + "fsops.py",
        '            return os.path.isdir(f"/proc/fs/jbd2/{dev}-8")',
        "            return True",
        ("tests/test_power_loss.py", "-k", "orders_writeback"),
        "an ext4 without a journal taken for one that orders writeback",
    ),
    Mutant(
        "stale-maildir-not-checked",
        PKG + "store/commit.py",
        "            if first and ops.device(fd, path) != g.md.dev:",
        "            if False:",
        ("tests/test_store_hardening.py", "-k", "mounted_over"),
        "a cached Maildir with a file system mounted over it is synced on the old one",
    ),
    Mutant(
        "lf-body-keeps-the-stuffing-dots",
        PKG + "smtp/reader.py",
        "        return speedups.unstuff_to_lf(self.buf, 2, self.dots, self.line_ends)",
        "        return speedups.unstuff_to_lf(self.buf, 2, [], self.line_ends)",
        ("tests/test_speedups.py", "-k", "unstuff"),
        "the body converted straight from the reader's buffer keeps its stuffing dots",
    ),
    Mutant(
        "held-body-size-unchecked",
        PKG + "smtp/handler.py",
        "        if held > self.max_message_size:",
        "        if False:",
        ("tests/test_smtp.py", "-k", "protocol_allows_more"),
        "a body held by the reader is not checked against max_message_size",
    ),
    Mutant(
        "syncfs-on-first-new-dir",
        PKG + "store/commit.py",
        "    err = yield call\n",
        "    err = yield (call[0], -1, live[0].md.new_prefix) if call[0] == 'syncfs' else call\n",
        ("tests/test_isolation.py", "-k", "new-removed"),
        "syncfs opened on the first group's new/, as before issue 14",
    ),
    Mutant(
        "loop-writer-does-not-await-syncs",
        PKG + "writers/local.py",
        "            err = await self._threads.run(run_sync_call, self.ops, call)",
        "            err = None\n            self._threads.run(run_sync_call, self.ops, call)",
        ("tests/test_crash_states.py", "-k", "loop_writer"),
        "LoopWriter.acommit starts its syncs but acknowledges without awaiting them",
    ),
    Mutant(
        "no-per-peer-cap",
        PKG + "smtp/sessions.py",
        "        if key is not None and cap and self.per_peer.get(key, 0) >= cap:",
        "        if False:",
        ("tests/test_fairness.py", "-k", "per_peer"),
        "no per-peer connection cap",
    ),
    Mutant(
        "no-room-when-full",
        PKG + "smtp/sessions.py",
        "        elif len(self.sessions) >= self.max_connections and not self._evict():",
        "        elif len(self.sessions) >= self.max_connections:",
        ("tests/test_fairness.py", "-k", "starve"),
        "a full server refuses instead of closing an idle or slow session",
    ),
    Mutant(
        "no-min-rate",
        PKG + "smtp/sessions.py",
        "            if f.min_rate and self.busy >= f.rate_grace and self.behind() > 0:",
        "            if False:",
        ("tests/test_fairness.py", "-k", "trickling or read_its_replies"),
        "no minimum rate: a trickling client keeps its slot",
    ),
    Mutant(
        "no-headroom-for-the-oldest",
        PKG + "smtp/data_budget.py",
        "        return self.held + n <= self.max_bytes - (oldest.cap - oldest.reserved)",
        "        return True",
        ("tests/test_data_budget.py",),
        "the DATA budget no longer keeps room for the oldest transfer (deadlock-prone)",
    ),
    # Issue 18: holes an independent mutation run found, and its fixes undone.
    Mutant(
        "syncfs-return-ignored",
        PKG + "fsops.py",
        "            if _SYNCFS(fd) != 0:\n",
        "            _SYNCFS(fd)\n            if False:\n",
        ("tests/test_store_hardening.py", "-k", "failed_syncfs"),
        "FsOps.syncfs ignores the kernel's -1: a batch acknowledged without durability",
    ),
    Mutant(
        "collision-rename-drops-sizes",
        PKG + "store/commit.py",
        "            final = unique_name() + suffix",
        "            final = unique_name()",
        ("tests/test_store_hardening.py", "-k", "keeps_its_size_suffix"),
        "a move into new/ retried after a collision loses its ,S=,W= suffix",
    ),
    Mutant(
        "comma-in-host-unescaped",
        PKG + "store/names.py",
        '    return escaped.replace(",", "\\\\054") or "localhost"',
        '    return escaped or "localhost"',
        ("tests/test_store_hardening.py", "-k", "comma"),
        "a ',' in the host name is not escaped (breaks ,S= parsing and host_of)",
    ),
    Mutant(
        "auto-threshold-off-by-one",
        PKG + "store/commit.py",
        "n >= AUTO_SYNCFS_MIN_FILES",
        "n > AUTO_SYNCFS_MIN_FILES",
        ("tests/test_maildir.py", "-k", "exactly_auto"),
        "sync='auto' switches to syncfs one file later than documented",
    ),
    Mutant(
        "path-not-normalised",
        PKG + "store/maildir.py",
        '    if not p.startswith("/") or "/." in p or "//" in p or p.endswith("/"):',
        '    if not p.startswith("/") or "/." in p:',
        ("tests/test_maildir.py", "-k", "normalised"),
        "an absolute Maildir path with '//' or a trailing '/' is not normalised",
    ),
    Mutant(
        "max-message-size-exclusive",
        PKG + "executor/core.py",
        "        if size > self._max_size:",
        "        if size >= self._max_size:",
        ("tests/test_executor.py", "-k", "inclusive"),
        "a message of exactly max_message_size bytes is refused",
    ),
    Mutant(
        "budget-newcomer-first",
        PKG + "budget.py",
        "        if not self.room and self._fits(item.size):",
        "        if self._fits(item.size):",
        ("tests/test_executor.py", "-k", "newcomer or first_come"),
        "a newcomer that fits the byte budget is admitted ahead of older waiters",
    ),
    Mutant(
        "process-slices-one-blob",
        PKG + "writers/base.py",
        "    return id(part.obj) if whole else id(part)",
        "    return id(part.obj)",
        ("tests/test_process_writer.py", "-k", "slices"),
        "slices of one buffer sent to the helper as one blob (wrong bytes written)",
    ),
    Mutant(
        "process-max-parts-unchecked",
        PKG + "executor/core.py",
        "        if self._max_parts is not None and len(parts) > self._max_parts:",
        "        if False:",
        ("tests/test_process_writer.py", "-k", "too_many_parts"),
        "a 256-part message reaches a process-writer batch and fails its 10 neighbours",
    ),
    Mutant(
        "flush-done-keeps-its-slot",
        PKG + "executor/collector.py",
        "        self._slots.release()\n",
        "        pass\n",
        ("tests/test_executor.py", "-k", "cancelled_before_it_begins"),
        "a flush's done-callback does not release its slot (the next batch never starts)",
    ),
    Mutant(
        "flush-done-keeps-its-bytes",
        PKG + "executor/collector.py",
        "        self._enqueue(self.budget.done(sum(r.size for r in batch)))\n",
        "        pass\n",
        ("tests/test_executor.py", "-k", "aborted_flush"),
        "a flush's done-callback does not give its bytes back to the budget",
    ),
    Mutant(
        "add-flag-trusts-its-id",
        PKG + "store/names.py",
        '    if not base or base.startswith(".") or "/" in name or "\\0" in name:',
        "    if False:",
        ("tests/test_maildir.py", "-k", "refuses"),
        "add_flag('') renames new/ itself; '../x' moves a file from outside the Maildir",
    ),
    Mutant(
        "deliver-sync-start-race",
        PKG + "executor/core.py",
        "            self._start_thread(exist_ok=True)  # racing first calls: one starts it",
        "            self.start_thread()",
        ("tests/test_embedding.py", "-k", "at_once"),
        "deliver_sync checks for a home outside the lock: 16 first calls at once fail",
    ),
    Mutant(
        "hold-not-released-on-exit",
        PKG + "smtp/data_budget.py",
        "        self.close()\n",
        "        pass\n",
        ("tests/test_data_budget_stepped.py",),
        "a DATA hold left by a timeout or a cancellation keeps its bytes (no more mail taken)",
    ),
    Mutant(
        "evict-mid-delivery",
        PKG + "smtp/sessions.py",
        "        if self.closed or self.hooks or self.waiting is not None:",
        "        if self.closed or self.waiting is not None:",
        ("tests/test_session_slots.py", "-k", "evicted"),
        "a session closed with 421 while its message is delivered (the MTA resends: a duplicate)",
    ),
    Mutant(
        "slot-held-after-221",
        PKG + "smtp/protocol.py",
        '            elif code == "221":',
        "            elif False:",
        ("tests/test_session_slots.py", "-k", "stops_counting"),
        "a session that said 221 keeps its slot until the loop runs connection_lost",
    ),
    # -- issue 18, item 9: serve's stop, header sanitising, the resolver's root check
    Mutant(
        "stop-without-grace",
        PKG + "server/core.py",
        "        await asyncio.wait_for(factory.idle.wait(), grace)\n",
        "        await asyncio.sleep(0)\n",
        ("tests/test_shutdown.py", "-k", "grace"),
        "serve closes open sessions at once instead of giving them --grace seconds",
    ),
    Mutant(
        "header-text-uncapped",
        PKG + "smtp/handler.py",
        "    text = text[:limit]\n    if text.isascii()",
        "    pass\n    if text.isascii()",
        ("tests/test_header_sanitising.py",),
        "client text in our trace headers is no longer capped (lines over 998 octets)",
    ),
    Mutant(
        "header-text-non-ascii",
        PKG + "smtp/handler.py",
        "    if text.isascii() and text.isprintable():",
        "    if text.isprintable():",
        ("tests/test_header_sanitising.py",),
        "non-ASCII client text reaches our trace headers",
    ),
    Mutant(
        "root-prefix-without-separator",
        PKG + "recipients.py",
        "        self._root_prefix = str(self.root) + os.sep\n",
        "        self._root_prefix = str(self.root)\n",
        ("tests/test_recipients.py", "-k", "sibling"),
        "a mapper's path in a sibling of the root (/var/mail2 next to /var/mail) is accepted",
    ),
    # The batch writeback in one C call (FsOps.writeback).
    Mutant(
        "writeback-c-call-failure-ignored",
        PKG + "fsops.py",
        "            if failed is not None:\n",
        "            if False:\n",
        ("tests/test_writeback_call.py", "-k", "writeback_failures"),
        "a failed sync_file_range in the C call is dropped: moves made over unwritten data",
    ),
    Mutant(
        "writeback-c-call-bypasses-overrides",
        PKG + "fsops.py",
        '            and getattr(self.start_writeback, "__func__", None) is _STOCK_START\n'
        '            and getattr(self.wait_writeback, "__func__", None) is _STOCK_WAIT\n'
        "            and self._sync_file_range is _STOCK_SYNC_FILE_RANGE\n",
        "",
        ("tests/test_writeback_call.py", "-k", "override"),
        "a tracing or failing FsOps subclass is bypassed: the crash model no longer sees the waits",
    ),
    Mutant(
        "writeback-c-call-makes-no-calls",
        PKG + "fsops.py",
        "            failed = _WRITEBACK_ALL(fds)\n",
        "            failed = _WRITEBACK_ALL(())\n",
        ("tests/test_writeback_cache.py", "-k", "no_page_dirty"),
        "the C writeback returns success having written nothing back",
    ),
    Mutant(
        "writeback-c-call-skips-the-wait",
        PKG + "fsops.py",
        "            failed = _WRITEBACK_ALL(fds)\n",
        "            failed = [FsOps._sync_file_range(f, 2, p) for f, p in zip(fds, paths)]"
        " and None\n",
        ("tests/test_writeback_cache.py", "-k", "no_page_dirty"),
        "the C writeback starts every file's writeback and waits for none: moves outrun the data",
    ),
]


def _copy(dest: Path) -> None:
    shutil.copytree(
        ROOT,
        dest,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "__pycache__", "*.egg-info", ".*_cache", "demo-maildir", "*.pyc"
        ),
    )


def _pytest(tree: Path, tests: tuple[str, ...]) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(tree / "src"), PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", *tests]
    return subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=600)


def run_one(m: Mutant) -> tuple[str, float, str]:
    """Apply ``m`` in a scratch copy, run its tests; ``(verdict, seconds, detail)``."""
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"mutant-{m.name}-") as tmp:
        tree = Path(tmp) / "repo"
        _copy(tree)
        target = tree / m.file
        text = target.read_text()
        if text.count(m.old) != 1:
            return (
                "NOT APPLICABLE",
                0.0,
                f"{m.file}: the text to mutate occurs {text.count(m.old)}x",
            )
        target.write_text(text.replace(m.old, m.new))
        res = _pytest(tree, m.tests)
    seconds = time.monotonic() - started
    last = (res.stdout.strip().splitlines() or [""])[-1]
    if res.returncode == 1:
        return "killed", seconds, last
    if res.returncode == 0:
        return "SURVIVED", seconds, last
    return "ERROR", seconds, f"pytest exit {res.returncode}: {last} {res.stderr[-500:]}"


def baseline(mutants: list[Mutant]) -> list[str]:
    """Run every selected test set on an unmutated copy; the ones that fail there."""
    with tempfile.TemporaryDirectory(prefix="mutant-baseline-") as tmp:
        tree = Path(tmp) / "repo"
        _copy(tree)
        probe = subprocess.run(
            [sys.executable, "-c", "import delivery_executor; print(delivery_executor.__file__)"],
            env=dict(os.environ, PYTHONPATH=str(tree / "src")),
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        if not probe.startswith(str(tree)):
            return [f"the copy is not what runs: delivery_executor comes from {probe}"]
        failed = []
        for tests in dict.fromkeys(m.tests for m in mutants):
            res = _pytest(tree, tests)
            if res.returncode != 0:
                failed.append(f"{' '.join(tests)}: {res.stdout.strip().splitlines()[-1:]}")
        return failed


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="tests.mutants", description=__doc__.split("\n\n")[0])
    ap.add_argument("-k", default="", help="only mutants whose name contains this")
    ap.add_argument("-j", type=int, default=1, help="mutants run at once")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTANTS if args.k in m.name]
    if args.list:
        for m in chosen:
            print(f"{m.name:34} {m.why}\n{'':34} {m.file}; tests: {' '.join(m.tests)}")
        return 0
    print(f"baseline: the {len(chosen)} mutants' tests on an unmutated copy ...", flush=True)
    if bad := baseline(chosen):
        print("baseline failed, so no verdict is meaningful:\n  " + "\n  ".join(bad))
        return 2
    ok = True
    with concurrent.futures.ThreadPoolExecutor(max(1, args.j)) as pool:
        for m, (verdict, seconds, detail) in zip(chosen, pool.map(run_one, chosen), strict=True):
            ok &= verdict == "killed"
            print(f"{verdict:14} {m.name:34} {seconds:5.1f} s  {detail}", flush=True)
    print("all mutants killed" if ok else "SOME MUTANTS WERE NOT KILLED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
