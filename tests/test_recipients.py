"""MailboxResolver: the address → Maildir policy, and a long table of hostile input."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from delivery_executor import MailboxResolver, Maildir
from delivery_executor.errors import RecipientRejected
from delivery_executor.recipients import imap_utf7


def test_default_layout_lowercases_domain_and_local(tmp_path: Path) -> None:
    """Alice@Example.ORG maps to <root>/example.org/alice."""
    r = MailboxResolver(tmp_path)
    assert r.resolve("Alice@Example.ORG") == str(tmp_path / "example.org" / "alice")


def test_fold_case_off_keeps_local_case(tmp_path: Path) -> None:
    """fold_case=False keeps the local part's case; the domain is still lowercased."""
    r = MailboxResolver(tmp_path, fold_case=False)
    assert r.resolve("Alice@Example.ORG") == str(tmp_path / "example.org" / "Alice")


def test_recipient_delimiter_strips_detail(tmp_path: Path) -> None:
    """With '+', bob+lists@x.org maps to bob's Maildir."""
    r = MailboxResolver(tmp_path, recipient_delimiter="+")
    assert r.resolve("bob+lists@x.org") == str(tmp_path / "x.org" / "bob")
    with pytest.raises(RecipientRejected, match="empty before the delimiter"):
        r.resolve("+x@x.org")


def test_accepted_domains(tmp_path: Path) -> None:
    """Only listed domains are accepted; others get 550 5.7.1."""
    r = MailboxResolver(tmp_path, domains=["Example.org"])
    assert r.resolve("a@EXAMPLE.org").endswith("example.org/a")
    with pytest.raises(RecipientRejected) as ei:
        r.resolve("a@other.org")
    assert ei.value.code == "550 5.7.1"
    assert ei.value.reply.startswith("550 5.7.1 domain 'other.org'")


def test_existing_only(tmp_path: Path) -> None:
    """existing_only rejects a missing Maildir with 550 5.1.1 and accepts a created one."""
    r = MailboxResolver(tmp_path, existing_only=True)
    with pytest.raises(RecipientRejected) as ei:
        r.resolve("carol@x.org")
    assert ei.value.code == "550 5.1.1"
    Maildir.create(tmp_path / "x.org" / "carol")
    assert r.resolve("carol@x.org") == str(tmp_path / "x.org" / "carol")


def test_custom_mapper_is_confined_to_the_root(tmp_path: Path) -> None:
    """A mapper picks the path; None means unknown user; escapes are still refused."""
    table = {"postmaster": "admin", "evil": "../../etc", "abs": "/etc"}
    r = MailboxResolver(tmp_path, mapper=lambda local, domain: table.get(local))
    assert r.resolve("postmaster@x.org") == str(tmp_path / "admin")
    with pytest.raises(RecipientRejected, match=r"550 5\.1\.1"):
        r.resolve("nobody@x.org")
    for who in ("evil", "abs"):
        with pytest.raises(RecipientRejected, match="outside the mail root"):
            r.resolve(f"{who}@x.org")


def test_mapper_cannot_reach_a_sibling_that_shares_the_roots_prefix(tmp_path: Path) -> None:
    """Root /x/mail: a mapper's /x/mail2/alice or ../mail2/alice is refused (prefix ends in /)."""
    root = tmp_path / "mail"
    sibling = tmp_path / "mail2"
    table = {"abs": str(sibling / "alice"), "rel": "../mail2/alice", "bare": str(sibling)}
    r = MailboxResolver(root, mapper=lambda local, domain: table.get(local))
    for who in table:
        with pytest.raises(RecipientRejected, match="outside the mail root"):
            r.resolve(f"{who}@x.org")
    table["ok"] = str(root / "alice")
    assert r.resolve("ok@x.org") == str(root / "alice")


def test_bad_configuration(tmp_path: Path) -> None:
    """A bad delimiter, a str for domains, or a non-callable mapper raise at construction."""
    with pytest.raises(ValueError, match="recipient_delimiter"):
        MailboxResolver(tmp_path, recipient_delimiter="/")
    with pytest.raises(TypeError, match="single str"):
        MailboxResolver(tmp_path, domains="example.org")
    with pytest.raises(TypeError, match="mapper must be callable"):
        MailboxResolver(tmp_path, mapper=3)  # type: ignore[arg-type]


HOSTILE = [
    ("../x@example.org", "553 5.1.3", "'/'"),
    ("../../etc@example.org", "553 5.1.3", "'/'"),
    ("..@example.org", "553 5.1.3", "dot"),
    (".hidden@example.org", "553 5.1.3", "dot"),
    ("a..b@example.org", "553 5.1.3", "dot"),
    ("trailing.@example.org", "553 5.1.3", "dot"),
    ("a/b@example.org", "553 5.1.3", "'/'"),
    ("a\\b@example.org", "553 5.1.3", "quoted"),
    ('"a b"@example.org', "553 5.1.3", "quoted"),
    ("a\x00b@example.org", "553 5.1.3", "control"),
    ("a\nb@example.org", "553 5.1.3", "control"),
    ("a\rb@example.org", "553 5.1.3", "control"),
    ("a\x7fb@example.org", "553 5.1.3", "control"),
    ("a b@example.org", "553 5.1.3", "invalid character"),
    ("a<b@example.org", "553 5.1.3", "invalid character"),
    ("a:b@example.org", "553 5.1.3", "invalid character"),
    ("@example.org", "553 5.1.3", "local@domain"),
    ("alice@", "553 5.1.3", "local@domain"),
    ("alice", "553 5.1.3", "local@domain"),
    ("", "553 5.1.3", "empty"),
    ("a@b@example.org", "553 5.1.3", "more than one @"),
    ("x" * 65 + "@example.org", "553 5.1.3", "longer than 64"),
    ("a@" + "b" * 64 + ".org", "553 5.1.3", "malformed domain"),
    ("a@" + ("b" * 60 + ".") * 5 + "org", "553 5.1.3", "domain too long"),
    ("a@exa_mple.org", "553 5.1.3", "malformed domain"),
    ("a@.example.org", "553 5.1.3", "malformed domain"),
    ("a@example.org.", "553 5.1.3", "malformed domain"),
    ("a@example..org", "553 5.1.3", "malformed domain"),
    ("a@-example.org", "553 5.1.3", "malformed domain"),
    ("a@..", "553 5.1.3", "malformed domain"),
    ("a@example/org", "553 5.1.3", "malformed domain"),
    ("a@[127.0.0.1]", "553 5.1.3", "unsupported domain"),
    ("jörg@example.org", "553 5.6.7", "SMTPUTF8"),
    ("a@exämple.org", "553 5.6.7", "SMTPUTF8"),
]


@pytest.mark.parametrize(("address", "code", "why"), HOSTILE)
def test_hostile_addresses_are_rejected_with_a_reason(
    tmp_path: Path, address: str, code: str, why: str
) -> None:
    """Each hostile or malformed address gets a 5xx code and a text saying why."""
    r = MailboxResolver(tmp_path)
    with pytest.raises(RecipientRejected) as ei:
        r.resolve(address)
    assert ei.value.code == code
    assert why in ei.value.text


def test_non_ascii_local_part_with_smtputf8(tmp_path: Path) -> None:
    """With SMTPUTF8, a non-ASCII local part maps inside the root."""
    r = MailboxResolver(tmp_path)
    assert r.resolve("jörg@example.org", smtputf8=True) == str(tmp_path / "example.org" / "jörg")
    with pytest.raises(RecipientRejected, match="'/'"):
        r.resolve("jö/rg@example.org", smtputf8=True)
    with pytest.raises(RecipientRejected, match="unsupported domain"):
        r.resolve("a@exämple.org", smtputf8=True)


@settings(max_examples=400, deadline=None)
@given(address=st.text(max_size=80), smtputf8=st.booleans(), delim=st.sampled_from([None, "+"]))
def test_fuzz_never_escapes_the_root(address: str, smtputf8: bool, delim: str | None) -> None:
    """Any text either raises RecipientRejected or maps to a path strictly inside the root."""
    root = "/srv/mail-root"
    r = MailboxResolver(root, recipient_delimiter=delim)
    try:
        path = r.resolve(address, smtputf8=smtputf8)
    except RecipientRejected as exc:
        code = exc.code
        path = ""
    else:
        code = ""
    if code:
        assert code[:1] == "5"
        return
    assert path.startswith(root + os.sep)
    assert os.path.normpath(path) == path
    rel = path[len(root) + 1 :].split(os.sep)
    assert len(rel) == 2
    assert all(part and not part.startswith(".") for part in rel)


# -- detail_to_folder: user+box@domain into the Maildir++ folder .box


def _folders(tmp_path: Path) -> MailboxResolver:
    Maildir.create(tmp_path / "x.org" / "bob")
    for box in ("Lists", "a.b", "a&-b", "r&AOk-sum&AOk-"):
        Maildir.create(tmp_path / "x.org" / "bob" / f".{box}")
    return MailboxResolver(tmp_path, recipient_delimiter="+", detail_to_folder=True)


def test_detail_to_folder_uses_existing_folders_as_dovecot_names_them(tmp_path: Path) -> None:
    """bob+Lists → .Lists; Maildir++ sub-folders, '&' and non-ASCII in modified UTF-7."""
    r = _folders(tmp_path)
    bob = tmp_path / "x.org" / "bob"
    assert r.resolve("Bob+Lists@x.org") == str(bob / ".Lists")
    assert r.resolve("bob+a.b@x.org") == str(bob / ".a.b")
    assert r.resolve("bob+a&b@x.org") == str(bob / ".a&-b")
    assert r.resolve("bob+résumé@x.org", smtputf8=True) == str(bob / ".r&AOk-sum&AOk-")


def test_detail_to_folder_missing_folder_means_inbox(tmp_path: Path) -> None:
    """A folder that does not exist (or a case that differs, or no detail) means INBOX."""
    r = _folders(tmp_path)
    bob = str(tmp_path / "x.org" / "bob")
    for address in ("bob+nope@x.org", "bob+lists@x.org", "bob+@x.org", "bob@x.org"):
        assert r.resolve(address) == bob, address
    assert not (tmp_path / "x.org" / "bob" / ".nope").exists()


FOLDER_HOSTILE = [
    ("bob+../x@x.org", "553 5.1.3", "'/'"),
    ("bob+a/b@x.org", "553 5.1.3", "'/'"),
    ("bob+.x@x.org", "553 5.1.3", "may not start with a dot"),
    ("bob+.@x.org", "553 5.1.3", "start or end with a dot"),
    ("bob+..@x.org", "553 5.1.3", "start or end with a dot"),
    ("bob+a..b@x.org", "553 5.1.3", "start or end with a dot"),
    ("bob+x\x01@x.org", "553 5.1.3", "control character"),
    ("bob+x\x7f@x.org", "553 5.1.3", "control character"),
    ("bob+" + "l" * 61 + "@x.org", "553 5.1.3", "longer than 64"),
    ("bob+résumé@x.org", "553 5.6.7", "SMTPUTF8"),
    ("bob+a\\b@x.org", "553 5.1.3", "quoted"),
]


@pytest.mark.parametrize(("address", "code", "why"), FOLDER_HOSTILE)
def test_detail_to_folder_refuses_hostile_folder_names(
    tmp_path: Path, address: str, code: str, why: str
) -> None:
    """A folder name obeys the local part's rules (and no leading dot): 5xx saying why."""
    r = _folders(tmp_path)
    with pytest.raises(RecipientRejected) as ei:
        r.resolve(address)
    assert ei.value.code == code
    assert why in ei.value.text


def test_detail_to_folder_needs_a_delimiter(tmp_path: Path) -> None:
    """detail_to_folder without recipient_delimiter is a configuration error."""
    with pytest.raises(ValueError, match="recipient_delimiter"):
        MailboxResolver(tmp_path, detail_to_folder=True)


def test_imap_utf7_matches_rfc3501() -> None:
    """Folder names are encoded as IMAP modified UTF-7 (RFC 3501 5.1.3's own example)."""
    assert imap_utf7("日本語") == "&ZeVnLIqe-"
    assert imap_utf7("~peter/mail/台北/日本語") == "~peter/mail/&U,BTFw-/&ZeVnLIqe-"
    assert imap_utf7("a&b") == "a&-b"
    assert imap_utf7("plain") == "plain"


@settings(max_examples=300, deadline=None)
@given(detail=st.text(max_size=70), smtputf8=st.booleans())
def test_fuzz_folder_never_leaves_the_users_maildir(detail: str, smtputf8: bool) -> None:
    """Any detail maps to bob's Maildir or to an existing .folder directly inside it."""
    import tempfile

    with tempfile.TemporaryDirectory() as root:
        bob = Path(root) / "x.org" / "bob"
        for box in ("Lists", "a.b", detail.replace("/", "_")[:50] or "x"):
            with contextlib.suppress(OSError, ValueError):
                (bob / f".{box}").mkdir(parents=True)
        r = MailboxResolver(root, recipient_delimiter="+", detail_to_folder=True)
        try:
            path = r.resolve(f"bob+{detail}@x.org", smtputf8=smtputf8)
        except RecipientRejected as exc:
            code = exc.code
        else:
            code = ""
        if code:
            assert code[:1] == "5"
            return
        assert path == str(bob) or (
            os.path.dirname(path) == str(bob)
            and os.path.basename(path).startswith(".")
            and os.path.basename(path) not in (".", "..")
            and os.path.isdir(path)
        )
