# ruff: noqa: E501  (Sieve scripts are data; their lines stay as written)
"""The differential corpus: Sieve scripts (hand-written and generated) and messages.

Every script is run on every message (or on a sample) by Pigeonhole's
``sieve-test`` and by our evaluator; tests/test_sieve_pigeonhole.py compares
where each message lands and with which flags.
"""

from __future__ import annotations

import random

__all__ = ["MESSAGES", "SCRIPTS", "envelope_of"]


def _msg(*headers: str, body: str = "Hello.\n") -> bytes:
    return ("\n".join(headers) + "\n\n" + body).encode("utf-8")


MESSAGES: dict[str, bytes] = {
    "spam": _msg(
        "From: Spammer <win@lottery.example>",
        "To: bob@example.com",
        "Subject: You WON",
        "X-Spam-Flag: YES",
        "X-Spam-Score: 12.5",
        "X-Spam-Level: ************",
    ),
    "list": _msg(
        "From: Guido <guido+py@python.org>",
        "To: python-list@python.org",
        "Cc: Bob <bob@example.com>, carol@Example.NET",
        "Subject: [Python] release 3.14",
        "List-Id: General discussion <python-list.python.org>",
        "List-Post: <mailto:python-list@python.org>",
        "Precedence: list",
    ),
    "encoded": _msg(
        "From: =?utf-8?q?Ren=C3=A9e?= <renee@example.fr>",
        "To: =?iso-8859-1?q?J=F6rg?= <joerg@example.de>",
        "Subject: =?utf-8?b?Q2Fmw6kgbWVudQ==?= =?utf-8?q?_du_jour?=",
        "X-Note: =?iso-8859-1?q?caf=E9?= and plain",
    ),
    "folded": _msg(
        "From: alice@example.org",
        "To: bob@example.com,",
        "  dave+tag@example.com,",
        "\tErin <erin@sub.example.com>",
        "Subject: a folded",
        "  subject line",
        "X-Empty:",
        "X-Dup: one",
        "X-Dup: two",
        "X-Spaces:    padded value   ",
    ),
    "missing": _msg("X-Only: yes", body="no from, no to, no subject\n"),
    "group": _msg(
        "From: alice@example.org",
        "To: undisclosed-recipients:;",
        "Cc: Team: bob@example.com, carol@example.com;",
        "Subject: group syntax",
    ),
    "weird": _msg(
        'From: "Doe, John" <john.doe@EXAMPLE.COM>',
        "To: no-domain",
        "Reply-To: <>",
        "Subject: Wildcards * and ? and \\ inside",
        "X-Mixed: MiXeD CaSe",
        "Sender: list-bounces+bob=example.com@lists.example.org",
    ),
    "utf8raw": _msg(
        "From: Zoë <zoe@example.org>",
        "To: bob@example.com",
        "Subject: Grüße aus Köln",
    ),
    "big": _msg(
        "From: big@example.org",
        "To: bob@example.com",
        "Subject: large",
        body="x" * 70 + "\n" + ("line of text " * 6 + "\n") * 400,
    ),
    "plain": _msg(
        "From: Bob <bob@example.com>",
        "To: Alice <alice+work@example.org>",
        "Subject: lunch?",
        "Message-ID: <1@example.com>",
    ),
    "flagged": _msg(
        "From: boss@corp.example",
        "To: bob@example.com",
        "Subject: URGENT: report",
        "X-Priority: 1",
        "Importance: high",
    ),
    "xspamno": _msg(
        "From: friend@example.net",
        "To: bob+family@example.com",
        "Subject: photos",
        "X-Spam-Flag: NO",
        "X-Spam-Score: -1.2",
    ),
}

_ENVELOPES: dict[str, tuple[str, str]] = {
    "list": ("python-list-bounces+bob=example.com@python.org", "bob@example.com"),
    "plain": ("bob@example.com", "alice+work@example.org"),
    "xspamno": ("friend@example.net", "bob+family@example.com"),
    "folded": ("Alice@Example.ORG", "dave+tag+more@example.com"),
}


def envelope_of(message: str) -> tuple[str, str]:
    """(MAIL FROM, RCPT TO) used for ``message`` by both implementations."""
    return _ENVELOPES.get(message, ("sender@example.net", "bob+box@example.com"))


_HAND: list[tuple[str, str]] = [
    (
        "copy-then-same-fileinto",
        'require ["fileinto", "copy"];\nfileinto :copy "X";\nfileinto "X";',
    ),
    (
        "qmark-captures",
        'require ["fileinto", "variables"];\nif header :matches "subject" "*?*" { fileinto "Q-${1}-${2}-${3}"; }',
    ),
    (
        "matches-octet",
        'require ["fileinto", "variables"];\nif header :comparator "i;octet" :matches "from" "*@*.*" { fileinto "O-${2}"; }',
    ),
    (
        "hasflag-matches",
        'require ["imap4flags", "fileinto"];\nsetflag "\\\\Seen Work";\nif hasflag :matches "w*" { fileinto "W"; }\nif hasflag :is "\\\\seen" { fileinto "S"; }',
    ),
    (
        "address-detail-header",
        'require ["fileinto", "subaddress", "variables"];\nif address :detail :matches ["to", "from"] "*" { fileinto "HD-${1}"; }',
    ),
    (
        "size-boundary",
        'require "fileinto";\nif size :over 150 { fileinto "Over150"; }\nif size :under 151 { fileinto "Under151"; }',
    ),
    (
        "text-with-variables",
        'require ["fileinto", "variables"];\nset "f" text:\nFrom-Text\n.\n;\nfileinto "${f}";',
    ),
    ("unclosed-variable", 'require ["fileinto", "variables"];\nset "a" "x";\nfileinto "A${a";'),
    (
        "match-var-out-of-range",
        'require ["fileinto", "variables"];\nif header :matches "subject" "*" { fileinto "M${1}${2}${9}"; }',
    ),
    (
        "upper-unicode",
        'require ["fileinto", "variables"];\nset :upper "u" "grüße";\nset :length "n" "grüße";\nfileinto "${u}-${n}";',
    ),
    (
        "variable-case",
        'require ["fileinto", "variables"];\nset "Name" "v";\nfileinto "${NAME}-${name}";',
    ),
    (
        "header-name-variable",
        'require ["fileinto", "variables"];\nset "h" "subject";\nif header :contains "${h}" "a" { fileinto "HV"; }',
    ),
    (
        "envelope-to-detail-empty",
        'require ["fileinto", "envelope", "subaddress"];\nif envelope :detail :is "to" "" { fileinto "E"; }\nif envelope :user :contains "to" "bob" { fileinto "U"; }',
    ),
    (
        "keep-flags-then-implicit",
        'require ["imap4flags", "fileinto", "copy"];\naddflag "A";\nkeep;\naddflag "B";\nfileinto :copy "C";',
    ),
    (
        "removeflag-all",
        'require ["imap4flags"];\naddflag "\\\\Seen \\\\Flagged";\nremoveflag ["\\\\seen", "\\\\FLAGGED"];\nkeep;',
    ),
    ("setflag-empty", 'require ["imap4flags"];\naddflag "X";\nsetflag "";'),
    (
        "contains-empty-key",
        'require "fileinto";\nif header :contains "subject" "" { fileinto "HasSubject"; }',
    ),
    (
        "matches-star-only-missing",
        'require "fileinto";\nif header :matches "x-absent" "*" { fileinto "Absent"; }',
    ),
    (
        "exists-list",
        'require "fileinto";\nif exists ["from", "to", "subject"] { fileinto "All3"; }',
    ),
    (
        "not-anyof-empty-like",
        'require "fileinto";\nif not anyof (false, not true) { fileinto "N"; }',
    ),
    (
        "address-all-display-name",
        'require "fileinto";\nif address :is "from" "Guido <guido+py@python.org>" { fileinto "Bad"; } elsif address :is "from" "guido+py@python.org" { fileinto "Good"; }',
    ),
    (
        "domain-case",
        'require "fileinto";\nif address :domain :is "cc" "example.net" { fileinto "D"; }\nif address :domain :comparator "i;octet" :is "cc" "example.net" { fileinto "DO"; }',
    ),
    (
        "quotewildcard-match",
        'require ["fileinto", "variables"];\nset :quotewildcard "p" "*";\nif header :matches "subject" "*${p}*" { fileinto "Star"; }',
    ),
    (
        "spam-junk",
        'require "fileinto";\nif header :contains "X-Spam-Flag" "YES" { fileinto "Junk"; }',
    ),
    (
        "spam-junk-seen-stop",
        'require ["fileinto", "imap4flags"];\n'
        'if header :is "X-Spam-Flag" "yes" {\n  addflag "\\\\Seen";\n  fileinto "Junk";\n  stop;\n}\n'
        'fileinto "Other";',
    ),
    (
        "spam-level",
        'require "fileinto";\nif header :matches "X-Spam-Level" "*****" { fileinto "Junk"; }',
    ),
    (
        "list-id-variables",
        'require ["fileinto", "variables"];\n'
        'if header :matches "List-Id" "*<*.*.*>" { fileinto "Lists/${2}"; }',
    ),
    (
        "list-exists",
        'require "fileinto";\nif exists "List-Id" { fileinto "Lists"; } elsif exists "Precedence" '
        '{ fileinto "Bulk"; } else { keep; }',
    ),
    (
        "list-post",
        'require ["fileinto", "variables"];\n'
        'if header :matches "List-Post" "<mailto:*@*>" { set :lower "l" "${1}"; fileinto "L.${l}"; }',
    ),
    (
        "from-domain",
        'require "fileinto";\nif address :domain :is "from" ["python.org", "example.org"] { fileinto "Known"; }',
    ),
    (
        "from-localpart-octet",
        'require "fileinto";\nif address :localpart :comparator "i;octet" :is "from" "John.Doe" '
        '{ fileinto "Case"; } elsif address :localpart :is "from" "john.doe" { fileinto "NoCase"; }',
    ),
    (
        "cc-anyof",
        'require "fileinto";\nif anyof (address :is "cc" "bob@example.com", address :domain :is "to" '
        '"example.de") { fileinto "Cc"; }',
    ),
    (
        "allof-not",
        'require "fileinto";\nif allof (exists "subject", not header :contains "subject" "lunch", '
        'not exists "x-spam-flag") { fileinto "Clean"; }',
    ),
    ("discard-big", "if size :over 10K { discard; }"),
    ("discard-small", "if size :under 200 { discard; stop; }\nkeep;"),
    (
        "flags-priority",
        'require ["imap4flags"];\nif header :is "X-Priority" "1" { setflag "\\\\Flagged"; }\n'
        'if header :contains "importance" "HIGH" { addflag ["\\\\Answered", "$Important"]; }',
    ),
    (
        "flags-fileinto",
        'require ["imap4flags", "fileinto"];\nfileinto :flags ["\\\\Seen", "\\\\Draft"] "Drafts";\n'
        'keep :flags "$Keyword";',
    ),
    (
        "flags-remove",
        'require ["imap4flags", "fileinto", "copy"];\naddflag "\\\\Seen \\\\Flagged Later";\n'
        'removeflag "later \\\\SEEN";\nfileinto :copy "Copy";',
    ),
    (
        "hasflag",
        'require ["imap4flags", "fileinto"];\naddflag "Work";\n'
        'if hasflag :contains "or" { fileinto "HasWork"; }\nif hasflag :is "work" { addflag "Two"; }',
    ),
    (
        "flag-variable",
        'require ["imap4flags", "variables", "fileinto"];\naddflag "fv" "A B";\nremoveflag "fv" "a";\n'
        'if hasflag :is "fv" "B" { fileinto :flags "${fv}" "V"; }',
    ),
    (
        "copy-and-keep",
        'require ["fileinto", "copy"];\nfileinto :copy "Archive";\nif header :contains "subject" "lunch" '
        "{ discard; }",
    ),
    ("explicit-keep-twice", 'require "fileinto";\nkeep;\nfileinto "INBOX";\nkeep;'),
    ("fileinto-inbox-case", 'require "fileinto";\nfileinto "inbox";'),
    ("stop-early", 'require "fileinto";\nstop;\nfileinto "Never";'),
    (
        "subaddress-detail",
        'require ["fileinto", "envelope", "subaddress", "variables"];\n'
        'if envelope :detail :matches "to" "*" { fileinto "Detail/${1}"; }',
    ),
    (
        "subaddress-user",
        'require ["fileinto", "envelope", "subaddress"];\n'
        'if envelope :user :is "to" "bob" { fileinto "User"; }\n'
        'if address :detail :is "to" "" { fileinto "EmptyDetail"; }',
    ),
    (
        "envelope-from-domain",
        'require ["fileinto", "envelope"];\nif envelope :domain :is "from" "python.org" { fileinto "FromPy"; }\n'
        'if envelope :all :contains "from" "bounces" { fileinto "Bounce"; }',
    ),
    (
        "encoded-subject",
        'require "fileinto";\nif header :contains "subject" "Café menu du" { fileinto "Cafe"; }\n'
        'if header :contains "x-note" "café" { fileinto "Note"; }',
    ),
    (
        "encoded-from-name",
        'require ["fileinto", "variables"];\nif header :matches "from" "* <*>" { fileinto "N-${1}"; }',
    ),
    (
        "utf8-raw",
        'require "fileinto";\nif header :contains "subject" "Köln" { fileinto "Koeln"; }\n'
        'if header :matches "from" "Zo? *" { fileinto "Zoe"; }',
    ),
    (
        "wildcard-escapes",
        'require "fileinto";\nif header :matches "subject" "*\\\\* and \\\\? and \\\\\\\\*" { fileinto "Esc"; }',
    ),
    ("missing-header-is-empty", 'if header :is "subject" "" { discard; }'),
    ("missing-header-contains-empty", 'if header :contains "x-absent" "" { discard; }'),
    ("exists-empty-header", 'require "fileinto";\nif exists "x-empty" { fileinto "HasEmpty"; }'),
    (
        "header-empty-value-is",
        'require "fileinto";\nif header :is "x-empty" "" { fileinto "EmptyVal"; }',
    ),
    (
        "dup-headers",
        'require ["fileinto", "variables"];\nif header :is "x-dup" "two" { fileinto "Two"; }\n'
        'if header :matches "x-dup" "*" { fileinto "First-${0}"; }',
    ),
    (
        "spaces-trimmed",
        'require "fileinto";\nif header :is "x-spaces" "padded value" { fileinto "Trimmed"; }',
    ),
    (
        "folded-subject",
        'require ["fileinto", "variables"];\nif header :matches "subject" "a folded*" { fileinto "F${1}"; }',
    ),
    (
        "set-modifiers",
        'require ["fileinto", "variables"];\nset :upperfirst :lower "x" "hELLO";\nset :length "n" "${x}";\n'
        'set :quotewildcard "q" "a*b?c";\nfileinto "${x}-${n}-${q}";',
    ),
    (
        "string-test",
        'require ["fileinto", "variables"];\nset "a" "Mixed";\n'
        'if string :is "${a}" "mixed" { fileinto "CaseIns"; }\n'
        'if string :comparator "i;octet" :is "${a}" "mixed" { fileinto "Octet"; }',
    ),
    (
        "match-vars-keep-last",
        'require ["fileinto", "variables"];\nif header :matches "subject" "*" {}\n'
        'if header :is "subject" "nothing" {}\nfileinto "S-${1}";',
    ),
    (
        "redirect-copy",
        'require ["copy"];\nredirect :copy "other@example.org";',
    ),
    (
        "vacation",
        'require ["vacation"];\nif not header :contains "precedence" "list" { vacation :days 3 "away"; }',
    ),
    (
        "nested-elsif",
        'require "fileinto";\nif header :contains "subject" "a" {\n  if header :contains "subject" "b" '
        '{ fileinto "AB"; } elsif header :contains "subject" "c" { fileinto "AC"; } else { fileinto "A"; }\n'
        '} elsif exists "from" { fileinto "NoA"; }',
    ),
    (
        "mailbox-create",
        'require ["fileinto", "mailbox"];\nfileinto :create "Made/Here";',
    ),
    (
        "text-multiline",
        'require "fileinto";\nif header :contains "subject" text:\nlunch\n.\n{ fileinto "T"; }',
    ),
    (
        "comparator-require",
        'require ["fileinto", "comparator-i;octet"];\nif header :comparator "i;octet" :contains "x-mixed" '
        '"MiXeD" { fileinto "Oct"; }',
    ),
    (
        "sender-header",
        'require "fileinto";\nif address :domain :is "sender" "lists.example.org" { fileinto "S"; }',
    ),
    ("true-false", 'require "fileinto";\nif false { fileinto "F"; } elsif true { fileinto "T"; }'),
    ("discard-keep", "discard;\nkeep;"),
    (
        "group-address",
        'require "fileinto";\nif address :is "cc" "carol@example.com" { fileinto "Grp"; }\n'
        'if address :matches "to" "*" { fileinto "AnyTo"; }',
    ),
    (
        "no-domain-address",
        'require "fileinto";\nif address :localpart :is "to" "no-domain" { fileinto "LP"; }\n'
        'if address :all :is "to" "no-domain" { fileinto "All"; }',
    ),
]

_HEADERS = [
    "subject",
    "from",
    "to",
    "cc",
    "x-spam-flag",
    "list-id",
    "x-absent",
    "x-mixed",
    "x-dup",
    "x-empty",
    "x-note",
    "sender",
]
_KEYS = [
    "",
    "yes",
    "YES",
    "example",
    "Example.com",
    "bob",
    "*",
    "?",
    "*@*",
    "*example*",
    "b?b*",
    "*.org",
    "python",
    "café",
    "Köln",
    "MiXeD",
    "*[Python]*",
    "\\*",
    "two",
    "one",
    "a*",
    "*e",
    "lunch?",
    "*o*o*",
]
_MATCH = [":is", ":contains", ":matches"]
_COMPS = ["", ':comparator "i;ascii-casemap"', ':comparator "i;octet"']
_PARTS = [":all", ":localpart", ":domain", ":user", ":detail"]
_ADDR_HEADERS = ["from", "to", "cc", "sender", "reply-to"]


def _q(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _keys(r: random.Random) -> str:
    ks = r.sample(_KEYS, r.choice([1, 1, 2, 3]))
    return _q(ks[0]) if len(ks) == 1 else "[" + ", ".join(_q(k) for k in ks) + "]"


def _simple_test(r: random.Random) -> str:
    kind = r.choice(["header", "header", "address", "envelope", "exists", "size"])
    m, c = r.choice(_MATCH), r.choice(_COMPS)
    if kind == "header":
        names = r.sample(_HEADERS, r.choice([1, 1, 2]))
        hs = _q(names[0]) if len(names) == 1 else "[" + ", ".join(_q(h) for h in names) + "]"
        return f"header {m} {c} {hs} {_keys(r)}".replace("  ", " ")
    if kind == "address":
        return (
            f"address {r.choice(_PARTS)} {m} {c} {_q(r.choice(_ADDR_HEADERS))} {_keys(r)}".replace(
                "  ", " "
            )
        )
    if kind == "envelope":
        part = _q(r.choice(["from", "to"]))
        return f"envelope {r.choice(_PARTS)} {m} {c} {part} {_keys(r)}".replace("  ", " ")
    if kind == "exists":
        return f"exists {_q(r.choice(_HEADERS))}"
    return f"size {r.choice([':over', ':under'])} {r.choice(['100', '1K', '4K', '10K', '500'])}"


def _test(r: random.Random, depth: int) -> str:
    roll = r.random()
    if depth < 3 and roll < 0.15:
        return f"not {_test(r, depth + 1)}"
    if depth < 3 and roll < 0.3:
        op = r.choice(["allof", "anyof"])
        return f"{op} ({', '.join(_test(r, depth + 1) for _ in range(r.choice([2, 3])))})"
    return _simple_test(r)


def _generated(count: int) -> list[tuple[str, str]]:
    r = random.Random(5228)
    out: list[tuple[str, str]] = []
    for i in range(count):
        lines = [
            'require ["fileinto", "envelope", "subaddress", "copy", "imap4flags", "variables"];'
        ]
        style = i % 4
        for j in range(r.choice([2, 3, 4])):
            t = _test(r, 0)
            if style == 0:
                lines.append(f'if {t} {{ fileinto :copy "G{j}"; }}')
            elif style == 1:
                flag = r.choice(
                    ["\\\\Seen", "\\\\Flagged", "$Label1", "Junk", "\\\\Answered \\\\Draft"]
                )
                lines.append(f'if {t} {{ addflag "{flag}"; }} else {{ fileinto :copy "E{j}"; }}')
            elif style == 2:
                lines.append(f'if {t} {{ fileinto "G{j}"; stop; }}')
            else:
                lines.append(f'if {t} {{ fileinto :copy "V{j}-${{1}}-${{2}}"; }}')
        if style == 1 and r.random() < 0.5:
            lines.append('fileinto "Flagged";')
        out.append((f"gen-{i:03d}", "\n".join(lines) + "\n"))
    return out


SCRIPTS: list[tuple[str, str]] = _HAND + _generated(220)
