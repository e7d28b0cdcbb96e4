"""Shared fixtures: strict event loops, syscall recorders and real small file systems."""

from __future__ import annotations

import asyncio
import gc
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .helpers import RecordingOps, mounted_tmpfs, self_signed

# -- every loop error (e.g. "Task exception was never retrieved") fails the test

_loop_errors: list[dict[str, Any]] = []


def _strict(loop: asyncio.AbstractEventLoop) -> asyncio.AbstractEventLoop:
    loop.set_exception_handler(lambda _loop, ctx: _loop_errors.append(ctx))
    return loop


def _asyncio_loop() -> asyncio.AbstractEventLoop:
    return _strict(asyncio.new_event_loop())


def _uvloop_loop() -> asyncio.AbstractEventLoop:
    import uvloop

    return _strict(uvloop.new_event_loop())


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Every async test runs on a strict asyncio loop; ``uvloop``-marked ones on uvloop too."""
    if item.get_closest_marker("uvloop") is not None:
        return {"asyncio": _asyncio_loop, "uvloop": _uvloop_loop}
    return {"asyncio": _asyncio_loop}


@pytest.fixture(autouse=True)
def _no_loop_errors() -> Iterator[None]:
    """Fail a test whose loop reported an unhandled error, checked after a GC pass."""
    _loop_errors.clear()
    yield
    gc.collect()
    errors = [ctx.get("message", "") + " " + repr(ctx.get("exception")) for ctx in _loop_errors]
    _loop_errors.clear()
    assert not errors, f"event loop reported errors: {errors}"


# -- fixtures over the helpers


@pytest.fixture
def recording_ops() -> RecordingOps:
    """A fresh recorder of the store's syscalls."""
    return RecordingOps()


@pytest.fixture
def small_tmpfs() -> Iterator[Path]:
    """A 1 MiB tmpfs mounted for this test alone."""
    with mounted_tmpfs("1m") as where:
        yield where


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate and key for localhost (skipped without openssl)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl not installed: no way to make a test certificate")
    return self_signed(openssl, tmp_path_factory.mktemp("tls"))
