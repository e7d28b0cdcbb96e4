"""Comparators and match types (RFC 5228 section 2.7, RFC 4790).

``:matches`` uses a non-backtracking glob matcher: it only ever returns to the
most recent ``*``, which is enough for patterns made of ``*``, ``?`` and
literals, so its cost is at most ``len(pattern) * len(value)`` steps (no
exponential blow-up on ``*a*a*a*a*b``). Each ``*`` takes the shortest text that
lets the rest match, the last one takes what is left: the captures RFC 5229
match variables see, and the ones Pigeonhole gives.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

__all__ = ["casemap", "compile_glob", "compile_glob_cached", "glob_match", "match_value"]

_ASCII_FOLD = {c: c + 32 for c in range(ord("A"), ord("Z") + 1)}


def casemap(s: str) -> str:
    """``i;ascii-casemap`` folding: ASCII letters to lower case, nothing else."""
    return s.lower() if s.isascii() else s.translate(_ASCII_FOLD)


# A glob is a tuple of tokens: a one-character literal str, or None for "?"
# and "" for "*" (both capture).
Glob = tuple[str | None, ...]


@functools.lru_cache(maxsize=4096)
def compile_glob_cached(pattern: str) -> Glob:
    """:func:`compile_glob`, remembered (patterns repeat across messages)."""
    return compile_glob(pattern)


def compile_glob(pattern: str) -> Glob:
    """The tokens of a ``:matches`` pattern; ``\\`` quotes the next character."""
    out: list[str | None] = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            out.append(pattern[i + 1])
            i += 2
            continue
        out.append("" if c == "*" else None if c == "?" else c)
        i += 1
    return tuple(out)


def glob_match(
    tokens: Glob, value: str, tick: Callable[[int], None]
) -> list[tuple[int, int]] | None:
    """The span of each ``*``/``?`` in ``value`` when it matches, else None.

    ``value`` and literal tokens must already be folded alike; ``tick(n)``
    is charged the work done (for the run's step limit).
    """
    n, m = len(value), len(tokens)
    spans: list[tuple[int, int]] = [(0, 0)] * m
    si = pi = 0
    star_p = star_s = -1
    steps = 0
    while si < n:
        steps += 1
        t = tokens[pi] if pi < m else "*"  # placeholder: past the end never matches a literal
        if pi < m and (t is None or (t != "" and t == value[si])):
            if t is None:
                spans[pi] = (si, si + 1)
            pi += 1
            si += 1
        elif pi < m and t == "":
            star_p, star_s = pi, si
            spans[pi] = (si, si)
            pi += 1
        elif star_p >= 0:
            star_s += 1
            spans[star_p] = (spans[star_p][0], star_s)
            si = star_s
            pi = star_p + 1
        else:
            tick(steps)
            return None
    while pi < m and tokens[pi] == "":
        spans[pi] = (n, n)
        pi += 1
    tick(steps)
    if pi != m:
        return None
    return [s for s, t in zip(spans, tokens, strict=True) if t is None or t == ""]


def match_value(
    kind: str,
    comparator: str,
    value: str,
    key: str,
    tick: Callable[[int], None],
) -> list[str] | None:
    """Whether ``value`` matches ``key``: None if not, else the match variables.

    For ``:matches`` the list is ``[value, capture1, ...]`` (``${0}``, ``${1}``
    ...); for ``:is``/``:contains`` it is empty (they set no variables).
    """
    tick(1 + len(value) // 64)
    fold = comparator == "i;ascii-casemap"
    v = casemap(value) if fold else value
    if kind == "is":
        return [] if v == (casemap(key) if fold else key) else None
    if kind == "contains":
        tick(len(value) * max(1, len(key)) // 64)
        return [] if (casemap(key) if fold else key) in v else None
    tokens = compile_glob_cached(casemap(key) if fold else key)
    spans = glob_match(tokens, v, tick)
    if spans is None:
        return None
    # Captures come from the unfolded value: ASCII folding keeps every index.
    return [value, *(value[a:b] for a, b in spans)]
