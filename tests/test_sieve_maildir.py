"""Sieve results on disk: Maildir++ folders, flags in names, dovecot-keywords, and
the same deliveries as Dovecot's LDA running Pigeonhole for real."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from delivery_executor.errors import SieveRuntimeError
from delivery_executor.sieve import (
    Delivery,
    Envelope,
    MessageView,
    SieveResult,
    compile_script,
    evaluate,
)
from delivery_executor.sieve.maildir import (
    deliver,
    folder_dir,
    keyword_letters,
    mailbox_exists,
    plan,
)
from delivery_executor.store import Maildir

from .sieve_corpus import MESSAGES
from .sieve_oracle import LDA, DovecotLDA

Snapshot = list[tuple[str, str, str, tuple[str, ...]]]


def snapshot(root: Path) -> Snapshot:
    """Every message under ``root``: (folder, new|cur, system letters, keyword names), sorted."""
    out = []
    for folder in sorted(["", *[d for d in os.listdir(root) if d.startswith(".")]]):
        base = root / folder
        kw: dict[str, str] = {}
        kf = base / "dovecot-keywords"
        if kf.exists():
            for line in kf.read_text().splitlines():
                num, _, name = line.partition(" ")
                kw[chr(ord("a") + int(num))] = name
        for sub in ("new", "cur"):
            if not (base / sub).is_dir():
                continue
            for name in os.listdir(base / sub):
                info = name.partition(":2,")[2]
                system = "".join(sorted(c for c in info if c.isupper()))
                keywords = tuple(sorted(kw[c] for c in info if c.islower()))
                out.append((folder, sub, system, keywords))
    return sorted(out)


def test_folder_names_follow_dovecots_maildirpp_layout(tmp_path: Path) -> None:
    """Levels join with '.', names are modified UTF-7, INBOX is the root, bad names fail."""
    root = str(tmp_path)
    assert folder_dir(root, "Lists/python") == f"{root}/.Lists.python"
    assert folder_dir(root, "Café") == f"{root}/.Caf&AOk-"
    assert folder_dir(root, "inbox") == root and folder_dir(root, "") == root
    for bad in ("A.b", "x/", "/x", "a//b", "~x", "a\nb"):
        with pytest.raises(SieveRuntimeError):
            folder_dir(root, bad)
    assert not mailbox_exists(root, "A.b") and not mailbox_exists(root, "Junk")


def test_flagged_delivery_lands_in_cur_with_info(tmp_path: Path) -> None:
    """with_flags: the message is written straight into cur/ as name:2,<sorted letters>."""
    md = Maildir.create(tmp_path / "m")
    (mid,) = md.with_flags("SFa").deliver_batch([b"hi\n"])
    assert os.listdir(md.new_prefix) == []
    (name,) = os.listdir(md.cur_prefix)
    assert name == f"{mid}:2,FSa"
    assert (tmp_path / "m" / "cur" / name).read_bytes() == b"hi\n"
    assert md.with_flags("") is md
    with pytest.raises(ValueError, match="DFPRST"):
        md.with_flags("S/")


def test_keywords_get_stable_letters_and_stop_at_26(tmp_path: Path) -> None:
    """dovecot-keywords grows by lowest free index; known names keep their letter."""
    (tmp_path / "dovecot-keywords").write_text("0 Old\n2 Third\n")
    assert keyword_letters(str(tmp_path), ["New", "Old", "$Label1"]) == "bad"
    assert (tmp_path / "dovecot-keywords").read_text() == "0 Old\n2 Third\n1 New\n3 $Label1\n"
    many = [f"k{i}" for i in range(30)]
    letters = keyword_letters(str(tmp_path), many)
    assert (
        len(letters) == 22 and len((tmp_path / "dovecot-keywords").read_text().splitlines()) == 26
    )


def test_missing_folder_falls_back_to_inbox_and_create_makes_it(tmp_path: Path) -> None:
    """A missing folder without :create drops the result (INBOX, no flags); :create builds it."""
    root = str(tmp_path / "Maildir")
    Maildir.create(root)
    Maildir.create(f"{root}/.Exists")
    res = SieveResult((Delivery("Exists", ("\\Seen",)), Delivery("Missing")), False)
    targets, why = plan(res, root)
    assert [(t.mailbox, t.flags) for t in targets] == [("INBOX", ())] and "Missing" in str(why)
    res = SieveResult(
        (Delivery("Exists", ("\\Seen",)), Delivery("New/Sub", ("Junk",), True)), False
    )
    deliver(root, res, b"Subject: x\n\nbody\n")
    assert os.path.isfile(f"{root}/.New.Sub/maildirfolder")
    assert snapshot(Path(root)) == [(".Exists", "cur", "S", ()), (".New.Sub", "cur", "", ("Junk",))]


# -- against dovecot-lda ------------------------------------------------------

needs_lda = pytest.mark.skipif(
    not os.access(LDA, os.X_OK) and os.environ.get("CI") != "true",
    reason="dovecot-lda (Debian dovecot-sieve) is not installed",
)

_LDA_CASES: list[tuple[str, str, tuple[str, ...]]] = [
    (
        "spam-flags-keywords",
        'require ["fileinto", "imap4flags"];\nif header :contains "X-Spam-Flag" "YES" '
        '{ addflag ["\\\\Seen", "Junk"]; fileinto "Junk"; stop; }\n'
        'if header :contains "subject" "lunch" { keep :flags ["\\\\Flagged", "$Label1"]; }',
        ("Junk",),
    ),
    (
        "missing-folder",
        'require ["fileinto", "imap4flags"];\naddflag "\\\\Seen";\nfileinto "Exists";\n'
        'if exists "list-id" { fileinto "Missing"; }',
        ("Exists",),
    ),
    (
        "create-nested-utf7",
        'require ["fileinto", "mailbox", "variables"];\n'
        'if header :matches "List-Id" "*<*.*.*>" { fileinto :create "Lists/${2}"; }\n'
        'elsif header :contains "from" "Zoë" { fileinto :create "Café/Zoë"; }',
        (),
    ),
    (
        "mailboxexists",
        'require ["fileinto", "mailbox"];\nif mailboxexists "Exists" { fileinto "Exists"; }\n'
        'if mailboxexists ["Exists", "Nope"] { fileinto "Nope"; }',
        ("Exists",),
    ),
    (
        "bad-name",
        'require ["fileinto"];\nif header :contains "subject" "lunch" { fileinto "a.b"; }',
        (),
    ),
    (
        "copy-flags-all",
        'require ["fileinto", "copy", "imap4flags"];\n'
        'fileinto :copy :flags "\\\\Answered \\\\Deleted \\\\Draft \\\\Flagged \\\\Seen"'
        ' "Exists";\n'
        'setflag "Kw1 Kw2";',
        ("Exists",),
    ),
    (
        "null-sender",
        'require ["fileinto", "envelope"];\nif envelope :is "from" "" { fileinto "Null"; }\n'
        'if envelope :localpart :is "from" "" { fileinto "NullLocal"; }\n'
        'if envelope :domain :is "from" "" { fileinto "NullDomain"; }',
        ("Null", "NullLocal", "NullDomain"),
    ),
    ("discard", 'if header :contains "x-spam-flag" "yes" { discard; }', ()),
]


def _ours(root: Path, src: str, msg: bytes, sender: str, rcpt: str) -> None:
    script = compile_script(src)
    res = evaluate(
        [script],
        MessageView.parse(msg),
        Envelope(sender, rcpt),
        mailbox_exists=lambda name: mailbox_exists(str(root), name),
    )
    deliver(str(root), res, msg)


@needs_lda
@pytest.mark.parametrize(("name", "src", "folders"), _LDA_CASES, ids=[c[0] for c in _LDA_CASES])
def test_deliveries_match_dovecot_lda(
    tmp_path: Path, name: str, src: str, folders: tuple[str, ...]
) -> None:
    """Each message ends in the same folders, new/ or cur/, with the same flags and keywords."""
    lda = DovecotLDA()
    try:
        ours_root = tmp_path / "Maildir"
        Maildir.create(ours_root)
        for f in folders:
            lda.make_folder(f)
            Maildir.create(ours_root / f".{f}")
        lda.set_script(src)
        for m in ("spam", "list", "plain", "utf8raw"):
            sender = "" if name == "null-sender" and m != "plain" else "sender@example.net"
            lda.deliver(MESSAGES[m], sender, "bob@example.com")
            _ours(ours_root, src, MESSAGES[m], sender, "bob@example.com")
        theirs = snapshot(lda.maildir)
        assert snapshot(ours_root) == theirs
        assert sorted(d for d in os.listdir(ours_root) if d.startswith(".")) == sorted(
            d for d in os.listdir(lda.maildir) if d.startswith(".")
        )
    finally:
        lda.close()


@needs_lda
def test_before_user_after_chain_matches_dovecot_lda(tmp_path: Path) -> None:
    """sieve_before scripts run around the user's as Pigeonhole's: keep defers, flags carry,
    stop ends one script, fileinto ends the chain."""
    before = [
        'require ["imap4flags"];\naddflag "\\\\Flagged";\nstop;',
        'require ["fileinto"];\nkeep;\n'
        'if header :contains "x-spam-flag" "yes" { fileinto "Junk"; }',
    ]
    user = 'require ["fileinto"];\nif header :contains "subject" "lunch" { fileinto "Food"; }'
    lda = DovecotLDA(before=before)
    try:
        ours_root = tmp_path / "Maildir"
        Maildir.create(ours_root)
        for f in ("Junk", "Food"):
            lda.make_folder(f)
            Maildir.create(ours_root / f".{f}")
        lda.set_script(user)
        chain = [compile_script(s) for s in (*before, user)]
        for m in ("spam", "plain", "list"):
            lda.deliver(MESSAGES[m], "s@example.net", "bob@example.com")
            res = evaluate(
                chain, MessageView.parse(MESSAGES[m]), Envelope("s@example.net", "bob@example.com")
            )
            deliver(str(ours_root), res, MESSAGES[m])
        assert snapshot(ours_root) == snapshot(lda.maildir)
    finally:
        lda.close()
