"""A minimal asyncio SMTP/LMTP client, for tests and the load benchmark.

Unlike ``smtplib.LMTP`` it reads one reply per accepted recipient after DATA
(RFC 2033), so it can check a server's LMTP replies one by one.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

__all__ = ["Reply", "SMTPClientError", "dot_stuff", "send_message"]


class SMTPClientError(Exception):
    """The server answered a command the client cannot go on after."""


@dataclass(frozen=True, slots=True)
class Reply:
    """One recipient's outcome: the RCPT reply if refused there, else its DATA reply."""

    rcpt: str
    code: int
    text: str

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300


def dot_stuff(body: bytes) -> bytes:
    """``body`` with CRLF line ends, leading dots doubled, and the final ``.`` line."""
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    if body.startswith(b"."):
        body = b"." + body
    return body.replace(b"\r\n.", b"\r\n..") + b".\r\n"


async def _reply(reader: asyncio.StreamReader) -> tuple[int, str]:
    lines = []
    while True:
        line = await reader.readline()
        if not line:
            raise SMTPClientError("connection closed by the server")
        text = line.decode("utf-8", "replace").rstrip("\r\n")
        lines.append(text[4:])
        if len(text) < 4 or text[3] != "-":
            return int(text[:3]), "\n".join(lines)


async def send_message(
    host: str,
    port: int,
    *,
    mail_from: str,
    rcpts: list[str],
    body: bytes,
    lmtp: bool = True,
    helo: str = "client.invalid",
) -> list[Reply]:
    """One connection, one message: greet, MAIL, RCPT each, DATA, QUIT.

    Returns one :class:`Reply` per recipient, in order. Raises
    :class:`SMTPClientError` when the greeting, HELO or MAIL is refused, and
    ``OSError`` when the connection fails.
    """
    reader, writer = await asyncio.open_connection(host, port)
    try:
        code, text = await _reply(reader)
        if code != 220:
            raise SMTPClientError(f"greeting: {code} {text}")
        writer.write(f"{'LHLO' if lmtp else 'EHLO'} {helo}\r\n".encode())
        code, text = await _reply(reader)
        if code != 250:
            raise SMTPClientError(f"{'LHLO' if lmtp else 'EHLO'}: {code} {text}")
        writer.write(f"MAIL FROM:<{mail_from}>\r\n".encode())
        code, text = await _reply(reader)
        if code != 250:
            raise SMTPClientError(f"MAIL: {code} {text}")
        results: list[Reply | None] = []
        accepted: list[int] = []
        for i, rcpt in enumerate(rcpts):
            writer.write(f"RCPT TO:<{rcpt}>\r\n".encode())
            code, text = await _reply(reader)
            if code == 250:
                accepted.append(i)
                results.append(None)
            else:
                results.append(Reply(rcpt, code, text))
        if accepted:
            writer.write(b"DATA\r\n")
            code, text = await _reply(reader)
            if code != 354:
                for i in accepted:
                    results[i] = Reply(rcpts[i], code, text)
            else:
                writer.write(dot_stuff(body))
                if lmtp:
                    for i in accepted:
                        code, text = await _reply(reader)
                        results[i] = Reply(rcpts[i], code, text)
                else:
                    code, text = await _reply(reader)
                    for i in accepted:
                        results[i] = Reply(rcpts[i], code, text)
        writer.write(b"QUIT\r\n")
        try:
            await _reply(reader)
        except SMTPClientError:
            pass
        return [r for r in results if r is not None]
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass
