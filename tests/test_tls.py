"""TLS and identity in serve: STARTTLS, --require-starttls, implicit TLS, reload on SIGHUP.

Certificates are made here with ``openssl req -x509``; the clients are
Python's smtplib, a raw ``ssl`` socket and swaks (``--tls``,
``--tls-on-connect``; swaks needs Net::SSLeay, Debian's libnet-ssleay-perl).
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest

from delivery_executor import Maildir, __version__
from delivery_executor.server.identity import banner, check_hostname, default_hostname
from delivery_executor.testing import ServerProcess

from .helpers import self_signed

pytestmark = pytest.mark.timeout(120)

BODY = b"Subject: tls\r\n\r\nover TLS\r\n"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is missing in CI: .ci/run should have installed it")
        pytest.skip(f"{name} not installed")
    return path


def _swaks_tls() -> str:
    swaks = _tool("swaks")
    support = subprocess.run([swaks, "--support"], capture_output=True, text=True, timeout=30)
    if "=== TLS supported" not in support.stdout + support.stderr:
        if os.environ.get("CI") == "true":
            pytest.fail("swaks has no TLS in CI: .ci/run should install libnet-ssleay-perl")
        pytest.skip("swaks has no TLS support (Debian: libnet-ssleay-perl)")
    return swaks


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """Two self-signed localhost certificates: name -> (cert, key)."""
    openssl = _tool("openssl")
    d = tmp_path_factory.mktemp("certs")
    out = {}
    for name in ("one", "two"):
        out[name] = self_signed(openssl, d, name)
    return out


def _der(cert: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(cert.read_text())


def _trusting(cert: Path) -> ssl.SSLContext:
    """A client context that accepts exactly ``cert`` (no host name check: we dial 127.0.0.1)."""
    ctx = ssl.create_default_context(cafile=str(cert))
    ctx.check_hostname = False
    return ctx


def _any_cert() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _greeting(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        return s.makefile("rb").readline().rstrip(b"\r\n")


def _wait_for(srv: ServerProcess, text: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while text not in srv.readline(deadline - time.monotonic()):
        pass


def _starttls_cert(port: int) -> bytes:
    with smtplib.LMTP("127.0.0.1", port) as c:
        c.starttls(context=_any_cert())
        der = c.sock.getpeercert(binary_form=True)  # type: ignore[union-attr]
        assert der is not None
        return bytes(der)


def _implicit_cert(port: int) -> bytes:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        _any_cert().wrap_socket(raw) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return der


class _Lines:
    """A tiny line client over an implicit-TLS socket."""

    def __init__(self, sock: ssl.SSLSocket) -> None:
        self.file = sock.makefile("rwb")

    def reply(self) -> list[bytes]:
        lines = []
        while True:
            line = self.file.readline()
            assert line, "connection closed"
            lines.append(line.rstrip(b"\r\n"))
            if line[3:4] != b"-":
                return lines

    def send(self, line: bytes) -> list[bytes]:
        self.file.write(line + b"\r\n")
        self.file.flush()
        return self.reply()


def test_lmtp_starttls_required_and_implicit_tls(
    tmp_path: Path, certs: dict[str, tuple[Path, Path]]
) -> None:
    """Plain MAIL gets 530 under --require-starttls, STARTTLS then delivers, implicit TLS too."""
    # Also: --hostname names the banner, the LHLO line and Received: by, and
    # the banner shows no software version.
    cert, key = certs["one"]
    root = tmp_path / "mail"
    args = ["--tls-cert", str(cert), "--tls-key", str(key), "--require-starttls"]
    args += ["--tls-listen", "127.0.0.1:0", "--hostname", "mx.test.example"]
    with ServerProcess(root, *args) as srv:
        plain, implicit = srv.ports
        assert "with implicit TLS" in srv.lines[-1]
        assert _greeting(plain) == b"220 mx.test.example LMTP ready"
        c = smtplib.LMTP("127.0.0.1", plain)
        assert c.ehlo()[0] == 250
        assert c.ehlo_resp is not None
        assert c.ehlo_resp.splitlines()[0] == b"mx.test.example"
        assert c.has_extn("starttls")
        assert c.mail("s@x.org")[0] == 530  # plain text: refused
        assert c.starttls(context=_trusting(cert))[0] == 220
        assert c.sock.getpeercert(binary_form=True) == _der(cert)  # type: ignore[union-attr]
        c.ehlo()
        assert not c.has_extn("starttls")
        assert c.sendmail("s@x.org", ["alice@example.org"], BODY) == {}
        c.quit()

        with (
            socket.create_connection(("127.0.0.1", implicit), timeout=10) as raw,
            _trusting(cert).wrap_socket(raw) as tls,
        ):
            lines = _Lines(tls)
            assert lines.reply() == [b"220 mx.test.example LMTP ready"]
            lhlo = lines.send(b"LHLO client.example")
            assert not any(b"STARTTLS" in line for line in lhlo)
            assert lines.send(b"MAIL FROM:<s@x.org>")[0].startswith(b"250")
            assert lines.send(b"RCPT TO:<bob@example.org>")[0].startswith(b"250")
            assert lines.send(b"DATA")[0].startswith(b"354")
            (done,) = lines.send(BODY + b".")
            assert done.startswith(b"250 2.0.0 <bob@example.org>")
            assert lines.send(b"QUIT")[0].startswith(b"221")
            lines.file.close()  # the socket's fd lives as long as this file object
        assert srv.stop() == 0
    for user in ("alice", "bob"):
        (entry,) = Maildir.open(root / "example.org" / user).scan_new()
        data = entry.path.read_bytes()
        assert b"by mx.test.example (delivery-executor)" in data
        assert data.endswith(BODY.replace(b"\r\n", b"\n"))  # stored with LF


def test_swaks_starttls_and_tls_on_connect(
    tmp_path: Path, certs: dict[str, tuple[Path, Path]]
) -> None:
    """swaks --tls (STARTTLS) and --tls-on-connect (implicit) deliver over LMTP."""
    swaks = _swaks_tls()
    cert, key = certs["one"]
    root = tmp_path / "mail"
    args = ["--tls-cert", str(cert), "--tls-key", str(key), "--require-starttls"]
    with ServerProcess(root, *args, "--tls-listen", "127.0.0.1:0") as srv:
        plain, implicit = srv.ports
        outs = []
        for port, mode, rcpt in ((plain, "--tls", "alice"), (implicit, "--tls-on-connect", "bob")):
            res = subprocess.run(
                [swaks, "--server", f"127.0.0.1:{port}", "--protocol", "LMTP", mode,
                 "--from", "s@example.net", "--to", f"{rcpt}@example.org"],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            outs.append(res.stdout + res.stderr)
            assert res.returncode == 0, outs[-1]
            assert f"250 2.0.0 <{rcpt}@example.org> Ok: delivered as" in outs[-1]
        assert "STARTTLS" in outs[0]
        assert "TLS started" in outs[0]
        assert srv.stop() == 0
    assert len(Maildir.open(root / "example.org" / "alice").scan_new()) == 1
    assert len(Maildir.open(root / "example.org" / "bob").scan_new()) == 1


def test_certificate_reloaded_on_sighup(
    tmp_path: Path, certs: dict[str, tuple[Path, Path]]
) -> None:
    """SIGHUP: new handshakes get the new certificate on both listeners; a bad one is refused."""
    # A session encrypted before the reload goes on with the old certificate.
    cert, key = tmp_path / "live.pem", tmp_path / "live.key"
    shutil.copy(certs["one"][0], cert)
    shutil.copy(certs["one"][1], key)
    root = tmp_path / "mail"
    args = ["--tls-cert", str(cert), "--tls-key", str(key), "--tls-listen", "127.0.0.1:0"]
    with ServerProcess(root, *args) as srv:
        plain, implicit = srv.ports
        one, two = _der(certs["one"][0]), _der(certs["two"][0])
        assert _starttls_cert(plain) == one
        assert _implicit_cert(implicit) == one
        early = smtplib.LMTP("127.0.0.1", plain)
        early.starttls(context=_any_cert())

        cert.write_text("not a certificate\n")
        srv.proc.send_signal(signal.SIGHUP)
        _wait_for(srv, "TLS reload failed, still serving the previous certificate")
        assert _starttls_cert(plain) == one

        shutil.copy(certs["two"][0], cert)
        shutil.copy(certs["two"][1], key)
        srv.proc.send_signal(signal.SIGHUP)
        _wait_for(srv, "TLS certificate reloaded")
        assert _starttls_cert(plain) == two
        assert _implicit_cert(implicit) == two
        assert early.sock.getpeercert(binary_form=True) == one  # type: ignore[union-attr]
        assert early.sendmail("s@x.org", ["alice@example.org"], BODY) == {}
        early.quit()
        assert srv.stop() == 0
    assert len(Maildir.open(root / "example.org" / "alice").scan_new()) == 1


def test_smtp_starttls_smtps_and_banner_version(
    tmp_path: Path, certs: dict[str, tuple[Path, Path]]
) -> None:
    """--smtp on asyncio: SMTP.starttls and SMTP_SSL deliver; --banner-version names the version."""
    cert, key = certs["one"]
    root = tmp_path / "mail"
    args = ["--smtp", "--tls-cert", str(cert), "--tls-key", str(key), "--banner-version"]
    args += ["--loop", "asyncio"]  # the other TLS tests run on the default loop (uvloop)
    with ServerProcess(root, *args, "--tls-listen", "127.0.0.1:0", "--hostname", "mx") as srv:
        plain, implicit = srv.ports
        assert _greeting(plain) == f"220 mx ESMTP delivery-executor {__version__} ready".encode()
        c = smtplib.SMTP("127.0.0.1", plain)
        c.starttls(context=_trusting(cert))
        assert c.sendmail("s@x.org", ["alice@example.org"], BODY) == {}
        c.quit()
        with smtplib.SMTP_SSL("127.0.0.1", implicit, context=_trusting(cert)) as s:
            s.ehlo()
            assert not s.has_extn("starttls")
            assert s.sendmail("s@x.org", ["bob@example.org"], BODY) == {}
        assert srv.stop() == 0
    assert len(Maildir.open(root / "example.org" / "alice").scan_new()) == 1
    assert len(Maildir.open(root / "example.org" / "bob").scan_new()) == 1


def test_default_hostname_never_silently_localhost(caplog: pytest.LogCaptureFixture) -> None:
    """An FQDN of localhost falls back to the host name, with a warning naming --hostname."""
    with caplog.at_level(logging.WARNING, "delivery_executor.server"):
        assert default_hostname(lambda: "mx.example.org", lambda: "mx") == "mx.example.org"
        assert not caplog.records
        for local in ("localhost", "localhost.localdomain", "localhost6.localdomain6"):
            assert default_hostname(functools.partial(str, local), lambda: "vm") == "vm"
    assert len(caplog.records) == 3
    assert all("--hostname" in r.getMessage() for r in caplog.records)


def test_banner_and_hostname_values() -> None:
    """The banner names no version unless asked; a host name with spaces or CR is refused."""
    assert banner(lmtp=True) == "LMTP ready"
    assert banner(lmtp=False, with_version=True) == f"ESMTP delivery-executor {__version__} ready"
    assert check_hostname("mx-1.example.org") == "mx-1.example.org"
    for bad in ("", "a b", "x\r\nInjected: 1", "-lead", "a..b"):
        with pytest.raises(ValueError, match="not a host name"):
            check_hostname(bad)
