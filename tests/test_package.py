"""The package root: what importing it costs and what it changes."""

from __future__ import annotations

import subprocess
import sys

import aiosmtpd.smtp
import pytest

import delivery_executor


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys\nprint('\\n'.join(sys.modules))"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    return set(out.split())


def _heavy(modules: set[str]) -> set[str]:
    return {
        m
        for m in modules
        if m.split(".")[0] == "aiosmtpd"
        or m.startswith(("delivery_executor.server", "delivery_executor.smtp"))
        or m in ("delivery_executor.cli", "delivery_executor.logs")
    }


def test_the_store_and_the_executor_import_no_smtp_and_no_server() -> None:
    """`from delivery_executor import Maildir, DeliveryExecutor` loads no aiosmtpd and no server."""
    modules = _modules_after("from delivery_executor import Maildir, DeliveryExecutor")
    assert "delivery_executor.executor" in modules
    assert _heavy(modules) == set()


def test_a_server_name_loads_its_layer_on_first_use() -> None:
    """A lazy name (DeliveryHandler) is the real class, and loads the SMTP layer only then."""
    modules = _modules_after("import delivery_executor as d\nassert d.DeliveryHandler.__name__")
    assert "delivery_executor.smtp.handler" in modules
    from delivery_executor.smtp import DeliveryHandler

    assert delivery_executor.DeliveryHandler is DeliveryHandler


def test_every_exported_name_resolves() -> None:
    """Every name in __all__ is an attribute of the package, StartupError included."""
    missing = [n for n in delivery_executor.__all__ if not hasattr(delivery_executor, n)]
    assert missing == []
    from delivery_executor.server import StartupError

    assert delivery_executor.StartupError is StartupError
    assert set(delivery_executor.__all__) <= set(dir(delivery_executor))


def test_an_unknown_name_is_an_attribute_error() -> None:
    """A name the package does not have raises AttributeError naming it."""
    with pytest.raises(AttributeError, match="NoSuchThing"):
        _ = delivery_executor.NoSuchThing


def test_importing_the_server_leaves_aiosmtpd_globals_alone() -> None:
    """Loading our SMTP/LMTP classes and the server does not change aiosmtpd's module globals."""
    code = (
        "import aiosmtpd.smtp as s\n"
        "before = set(s.ALLOWED_BEFORE_STARTTLS)\n"
        "import delivery_executor.smtp, delivery_executor.server, delivery_executor.cli\n"
        "assert set(s.ALLOWED_BEFORE_STARTTLS) == before, s.ALLOWED_BEFORE_STARTTLS"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    assert "LHLO" not in aiosmtpd.smtp.ALLOWED_BEFORE_STARTTLS
