"""The DATA path's C helpers: built, in use, and equal to the Python paths they replace.

The batch writeback's C call: ``tests/test_writeback_call.py``."""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from delivery_executor import _native
from delivery_executor.smtp import handler, reader

pytestmark = pytest.mark.timeout(60)

speedups = _native.speedups
needs_c = pytest.mark.skipif(speedups is None, reason="C helpers off (DELIVERY_EXECUTOR_PURE)")

# Bytes that matter to both loops: CR, LF, CRLF, dots at line starts.
nasty = st.lists(
    st.sampled_from([b"\r", b"\n", b"x", b".", b"\r\n", b"\r\n.", b"\r\r\n", b"\n."]), max_size=40
).map(b"".join)


def _compiler() -> str | None:
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    return shutil.which(cc)


@pytest.mark.skipif(
    os.environ.get("DELIVERY_EXECUTOR_PURE", "") not in ("", "0"), reason="turned off on purpose"
)
def test_the_install_built_the_c_helpers_and_the_data_path_uses_them() -> None:
    """`pip install -e .` (tasks.py) compiled _speedups, and the reader and handler call it."""
    if speedups is None and _compiler() is None:
        pytest.skip("no C compiler: the install took the pure-Python paths, as designed")
    assert speedups is not None, f"a compiler ({_compiler()}) is there but _speedups was not built"
    assert reader.find_dot_or_bare_lf_counted is speedups.find_dot_or_bare_lf_counted
    assert reader.judge_lines is speedups.judge_lines
    body = b"a\r\nb\r\n"
    assert handler.to_lf_counted(body) == (b"a\nb\n", 2)


def test_pure_switch_runs_the_python_paths() -> None:
    """DELIVERY_EXECUTOR_PURE=1 loads no C: the reader and handler take their Python fallbacks."""
    code = (
        "from delivery_executor import _native\n"
        "from delivery_executor.smtp import reader\n"
        "assert _native.speedups is None\n"
        "assert reader.find_dot_or_bare_lf_counted is reader.find_dot_or_bare_lf_counted_py\n"
        "assert reader.judge_lines is reader.judge_lines_py\n"
        "print('pure')\n"
    )
    env = {**os.environ, "DELIVERY_EXECUTOR_PURE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == "pure\n"


@needs_c
@given(nasty, st.integers(-3, 45))
@example(b"\n", 0)  # an LF with nothing before it is bare
@example(b"\r\n.", 1)
@example(b"\r\n", 2)  # pos at the end
@example(b"x\r\nx\n", 4)  # the CR the lookbehind sees is before pos
@example(b"\r\n\r\n", 3)
def test_line_scan_is_the_regex(data: bytes, pos: int) -> None:
    """The line scan gives the regex's match offset for every buffer and start."""
    assert speedups is not None
    want = reader.find_dot_or_bare_lf_py(data, pos)
    assert speedups.find_dot_or_bare_lf_counted(bytearray(data), pos)[0] == want
    assert speedups.find_dot_or_bare_lf_counted(data, pos)[0] == want


@needs_c
@given(nasty, nasty, nasty, st.integers(-3, 45))
@example(b"\r", b"\n", b"", 0)  # the CR before the view is not the LF's
@example(b"\n.", b"x", b"", -2)  # nor is an LF before it: a negative pos starts at 0
@example(b"", b"\r\n", b".", 0)  # nor is a dot after it
@example(b"x\r", b"\n\r\n", b"", 1)
def test_line_scan_reads_only_its_buffer(
    before: bytes, data: bytes, after: bytes, pos: int
) -> None:
    """A view into a bigger buffer: the bytes around it (CR, LF, dot) change nothing."""
    assert speedups is not None
    whole = before + data + after
    with memoryview(whole) as view:
        part = view[len(before) : len(before) + len(data)]
        got = speedups.find_dot_or_bare_lf_counted(part, pos)[0]
        assert got == reader.find_dot_or_bare_lf_py(data, pos)


@needs_c
@given(nasty, st.integers(-3, 45))
@example(b"\r\n", 0)  # one line end passed, none found
@example(b"a\r\nb\r\n.c", 0)  # two passed before the dot line's LF
@example(b"\n", 0)  # found at once: none passed
def test_counted_line_scan_is_the_regex_and_a_count(data: bytes, pos: int) -> None:
    """find_dot_or_bare_lf_counted: the regex's offset and the LFs from pos to it (or the end)."""
    assert speedups is not None
    j = reader.find_dot_or_bare_lf_py(data, pos)
    passed = data.count(b"\n", max(pos, 0), len(data) if j < 0 else j)
    assert reader.find_dot_or_bare_lf_counted_py(data, pos) == (j, passed)
    assert speedups.find_dot_or_bare_lf_counted(bytearray(data), pos) == (j, passed)
    with memoryview(b"\n." + data + b"\n.") as view:  # LFs around the view are not its own
        assert speedups.find_dot_or_bare_lf_counted(view[2 : 2 + len(data)], pos) == (j, passed)


@needs_c
@given(nasty, st.integers(0, 90), st.integers(0, 90), st.integers(1, 12))
@example(b"a\r\nb", 0, 4, 3)  # the CRLF ends the window exactly
@example(b"ab\r\n", 0, 4, 3)  # one byte too far: a long line
@example(b"\r\n", 1, 2, 5)  # a CR before start is not half of a CRLF
@example(b"x" * 20, 0, 20, 1)
def test_line_length_check_is_the_rfind_loop(data: bytes, a: int, b: int, width: int) -> None:
    """judge_lines steps as the Python rfind loop does, and reads only [start, end)."""
    assert speedups is not None
    start, end = sorted((min(a, len(data)), min(b, len(data))))
    want = reader.judge_lines_py(data, start, end, width)
    assert speedups.judge_lines(data, start, end, width) == want
    assert speedups.judge_lines(bytearray(data), start, end, width) == want
    with memoryview(b"\r\n" + data + b"\r\n") as view:  # CRLFs around it are not its own
        part = view[2 : 2 + len(data)]
        assert speedups.judge_lines(part, start, end, width) == want


@needs_c
@pytest.mark.parametrize(("start", "end", "width"), [(-1, 2, 5), (3, 2, 5), (0, 9, 5), (0, 2, 0)])
def test_line_length_check_refuses_bad_bounds(start: int, end: int, width: int) -> None:
    """Bounds outside the buffer or a width under 1 are a ValueError, in C as in Python."""
    assert speedups is not None
    for judge in (speedups.judge_lines, reader.judge_lines_py):
        with pytest.raises(ValueError, match="need 0 <= start <= end <= len"):
            judge(b"abc\r\n", start, end, width)


def _hashed_after_cr(head: bytes) -> bytes:
    """``head`` plus a tag, hashed so that the byte CPython stores just before the data is a CR.

    A ``bytes`` object keeps its hash in the word before its first byte (the
    top byte of it on little-endian machines): a read before the start then
    sees a CR, where a fresh object's ``-1`` hash would show ``0xff``.
    """
    for tag in range(1 << 20):
        body = head + tag.to_bytes(3, "big")
        if (hash(body) >> 56) & 0xFF == 13:
            return body
    raise AssertionError("no tag found")  # pragma: no cover


@needs_c
@pytest.mark.parametrize("head", [b"\n", b"\r\n", b"\nx\n", b"\r\r\n"])
@pytest.mark.parametrize("big", [False, True], ids=["small", "nogil"])
def test_conversion_reads_only_its_buffer(head: bytes, big: bool) -> None:
    """A CR in the memory just before the body is not taken for part of a CRLF."""
    assert speedups is not None
    body = _hashed_after_cr(head + b"\r\n" * (40_000 if big else 0))
    lf = body.replace(b"\r\n", b"\n")
    assert speedups.to_lf_counted(body) == (lf, lf.count(b"\n") - lf.count(b"\r\n"))


@needs_c
@given(nasty)
@example(b"\r\r\n")  # the kept CR makes a CRLF in the result
@example(b"\n")
@example(b"\r")
@example(b"")
def test_conversion_is_replace_and_count(body: bytes) -> None:
    """to_lf_counted is replace(CRLF, LF) and the result's LF-minus-CRLF count."""
    assert speedups is not None
    lf = body.replace(b"\r\n", b"\n")
    assert speedups.to_lf_counted(body) == (lf, lf.count(b"\n") - lf.count(b"\r\n"))


@needs_c
@pytest.mark.parametrize(
    "line",
    [b"\r\n", b"x" * 78 + b"\r\n", b"a\rb\r\r\n", b"bare\n"],
    ids=["empty", "long", "cr", "lf"],
)
def test_conversion_of_a_big_body_without_the_gil(line: bytes) -> None:
    """Past 64 KiB (the GIL released) the bytes and the count are still replace()'s."""
    assert speedups is not None
    body = line * (200_000 // len(line)) + b"\r"
    lf = body.replace(b"\r\n", b"\n")
    assert speedups.to_lf_counted(body) == (lf, lf.count(b"\n") - lf.count(b"\r\n"))


@needs_c
@given(nasty, st.integers(-5, 60))
@example(b"a\r\nb\r\n", 2)  # right
@example(b"a\r\nb\r\n", 1)  # too few: the copy would run past the allocation
@example(b"a\r\nb\r\n", 3)  # too many: the copy would fall short
@example(b"\r\n", 10**6)  # more than the body could hold
def test_conversion_with_any_crlf_count(body: bytes, crlf: int) -> None:
    """A CRLF count from the caller, right or wrong, never changes the result."""
    assert speedups is not None
    lf = body.replace(b"\r\n", b"\n")
    assert speedups.to_lf_counted(body, crlf) == (lf, lf.count(b"\n") - lf.count(b"\r\n"))


@needs_c
@pytest.mark.parametrize("off", [-1, 0, 1], ids=["too-few", "right", "too-many"])
def test_conversion_of_a_big_body_with_a_count(off: int) -> None:
    """Past 64 KiB (the GIL released) a wrong count is caught as well."""
    assert speedups is not None
    body = b"x" * 78 + b"\r\n" * 1 + (b"y" * 78 + b"\r\n") * 3000
    lf = body.replace(b"\r\n", b"\n")
    got = speedups.to_lf_counted(body, body.count(b"\r\n") + off)
    assert got == (lf, lf.count(b"\n"))


@needs_c
def test_wrong_arguments_are_type_errors() -> None:
    """A bytearray body, a missing position or a non-buffer say what was wrong."""
    assert speedups is not None
    with pytest.raises(TypeError, match="needs bytes, not bytearray"):
        speedups.to_lf_counted(bytearray(b"x"))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        speedups.find_dot_or_bare_lf_counted("text", 0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="takes 2 arguments"):
        speedups.find_dot_or_bare_lf_counted(b"x")  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        speedups.to_lf_counted(b"x", "1")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="takes 1 or 2 arguments"):
        speedups.to_lf_counted(b"x", 1, 2)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="takes 4 arguments"):
        speedups.judge_lines(b"x", 0, 1)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        speedups.judge_lines("text", 0, 1, 5)  # type: ignore[arg-type]


# -- unstuff_to_lf: the reader's raw body straight to LF line ends

body_lines = st.lists(
    st.lists(st.sampled_from([b"x", b".", b"\r", b"..", b"y\r"]), max_size=6).map(b"".join),
    max_size=30,
)


def _fed(lines: list[bytes], cuts: list[int]) -> reader._Body:
    """A DATA body of ``lines`` (stuffed, CRLF ends, then the terminator), fed in pieces."""
    raw = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)
    stream = raw + b".\r\n"
    body = reader._Body(None, 1000)
    edges = [0, *sorted({c % (len(stream) + 1) for c in cuts}), len(stream)]
    for a, b in itertools.pairwise(edges):
        if b > a:
            body.feed(stream[a:b])
    assert body.done
    return body


@needs_c
@given(body_lines, st.lists(st.integers(0, 400), max_size=6))
@example([b".", b"..", b"x"], [])
@example([b"", b".\r", b"x\r"], [3])
def test_unstuff_to_lf_is_the_made_body_converted(lines: list[bytes], cuts: list[int]) -> None:
    """From the reader's raw buffer: the unstuffed body's to_lf and W - S, as the two-copy path."""
    assert speedups is not None
    body = _fed(lines, cuts)
    assert body.bare_lf is False and body.dots is not None and body.line_ends is not None
    fused = body.lf_content()
    made = body.content()
    assert made == b"".join(line + b"\r\n" for line in lines)
    assert fused == speedups.to_lf_counted(made) == handler.to_lf_counted_py(made)


@needs_c
def test_unstuff_to_lf_refuses_a_wrong_count_or_a_dot_off_a_line_start() -> None:
    """A wrong CRLF count gives None (the caller makes the body); a misplaced dot, ValueError."""
    assert speedups is not None
    buf = bytearray(b"\r\nab\r\n..x\r\n.y\r\nz\r\n")
    assert speedups.unstuff_to_lf(buf, 2, [6, 11], 4) == (b"ab\n.x\ny\nz\n", 4)
    for wrong in (3, 5, 0, -1, 10**6, -(2**63), 2**63 - 1):
        assert speedups.unstuff_to_lf(buf, 2, [6, 11], wrong) is None
    for dots in ([7], [11, 6], [6, 6], [4], [40], [-1]):
        with pytest.raises(ValueError, match="no stuffing dot"):
            speedups.unstuff_to_lf(buf, 2, dots, 4)
    with pytest.raises(ValueError, match="start out of range"):
        speedups.unstuff_to_lf(buf, 99, [], 0)
    with pytest.raises(TypeError, match="list of dots"):
        speedups.unstuff_to_lf(buf, 2, (6, 11), 4)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="takes 4 arguments"):
        speedups.unstuff_to_lf(buf, 2, [6, 11])  # type: ignore[call-arg]


@needs_c
def test_unstuff_to_lf_of_a_big_body_without_the_gil() -> None:
    """Past 64 KiB (the GIL released, the buffer held exported): the same bytes; no resizing."""
    assert speedups is not None
    lines = [b".dot" if i % 97 == 0 else b"y" * 78 for i in range(3000)]
    body = _fed(lines, [70_000])
    assert len(body.buf) > 64 * 1024
    fused = body.lf_content()
    assert fused is not None
    assert fused[0] == b"".join(line + b"\n" for line in lines)
