"""TLS for ``serve``: STARTTLS, implicit-TLS listeners, and certificates reloaded on SIGHUP.

One *front* :class:`ssl.SSLContext` is handed out once: to aiosmtpd as its
``tls_context`` (STARTTLS) and to ``create_server(ssl=...)`` for implicit-TLS
listeners. Its ``sni_callback``, which OpenSSL runs on every ClientHello (with
or without SNI), moves the handshake onto the context loaded last. So
:meth:`TlsManager.reload` takes effect for every new handshake, on every
listener, with nothing rebound; sessions already encrypted keep their
certificate. A reload that fails (missing file, key not matching) keeps the
old certificate and says why.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from pathlib import Path

from aiosmtpd.smtp import SMTP

from ..smtp.sessions import SessionFactory
from .checks import StartupError

__all__ = ["TlsManager", "implicit_tls", "load_context", "tls_for"]


def load_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server context with ``cert`` (PEM chain) and ``key``; ``ValueError`` saying why not.

    TLS 1.2 or newer, Python's default ciphers, no client certificates.
    """
    for flag, path in (("--tls-cert", cert), ("--tls-key", key)):
        try:
            with open(path, "rb"):
                pass  # name the unreadable file; OpenSSL's own error does not
        except OSError as exc:
            raise ValueError(f"{flag} {path}: {exc.strerror}") from None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise ValueError(
            f"--tls-cert {cert} / --tls-key {key}: cannot load them as a PEM certificate"
            f" chain and its private key: {exc}"
        ) from None
    return ctx


class TlsManager:
    """The certificate every TLS listener serves; :meth:`reload` swaps it for new handshakes.

    Raises ``ValueError`` (see :func:`load_context`) if the files cannot be loaded.
    """

    def __init__(self, cert: Path, key: Path) -> None:
        self.cert = cert
        self.key = key
        self.context = load_context(cert, key)
        """The front context: give this one to aiosmtpd and ``create_server``."""
        self._current = self.context
        self.context.sni_callback = self._select
        self.reloads = 0

    def _select(
        self, conn: ssl.SSLObject | ssl.SSLSocket, _name: str | None, ctx: ssl.SSLContext
    ) -> None:
        current = self._current
        if current is not ctx:
            conn.context = current

    def reload(self) -> None:
        """Read the certificate and key again; ``ValueError`` (old one kept) if that fails."""
        self._current = load_context(self.cert, self.key)
        self.reloads += 1


def implicit_tls(
    factory: Callable[[], asyncio.BaseProtocol],
) -> Callable[[], asyncio.BaseProtocol]:
    """Wrap a session factory for an implicit-TLS listener (``create_server(ssl=...)``).

    The connection is encrypted before the first byte, which aiosmtpd cannot
    see: without this it would offer STARTTLS again and, under
    ``require_starttls``, refuse MAIL on a TLS connection.
    """

    if isinstance(factory, SessionFactory):
        return factory.variant(tls_context=None, require_starttls=False)

    def make() -> asyncio.BaseProtocol:
        proto = factory()
        if isinstance(proto, SMTP):
            proto.tls_context = None
            proto.require_starttls = False
        return proto

    return make


def tls_for(cert: Path | None, key: Path | None, *, needed: bool) -> TlsManager | None:
    """The TLS state asked for (None: no TLS); :class:`StartupError` if unusable.

    ``needed``: something (``--require-starttls``, ``--tls-listen``) cannot work without it.
    """
    if (cert is None) != (key is None):
        raise StartupError("--tls-cert and --tls-key go together")
    if cert is None or key is None:
        if needed:
            raise StartupError("--require-starttls and --tls-listen need --tls-cert and --tls-key")
        return None
    try:
        return TlsManager(cert, key)
    except ValueError as exc:
        raise StartupError(str(exc)) from None
