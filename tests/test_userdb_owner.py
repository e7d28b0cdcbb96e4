"""Per-user uid/gid as root: each user's Maildir and files are theirs, several users per batch."""

from __future__ import annotations

import asyncio
import os
import pwd
from pathlib import Path

import pytest

from delivery_executor import DeliveryExecutor
from delivery_executor.server.core import ServerConfig
from delivery_executor.smtp import DeliveryHandler, SessionFactory
from delivery_executor.testing import send_message
from delivery_executor.userdb import PasswdFile, UserdbResolver, quota_for

from .helpers import files_in

pytestmark = [pytest.mark.timeout(60), pytest.mark.asyncio]


@pytest.mark.root
@pytest.mark.parametrize("writer", ["loop", "process"])
async def test_files_belong_to_each_user_within_one_batch(tmp_path: Path, writer: str) -> None:
    """One LMTP transaction to three users: each file, Maildir and maildirsize has its owner."""
    if os.geteuid() != 0:
        pytest.skip("needs root to give files away")
    mail, nobody = pwd.getpwnam("mail"), pwd.getpwnam("nobody")
    root = tmp_path / "vmail"
    users = tmp_path / "users"
    users.write_text(
        f"a@x.org::{mail.pw_uid}:{mail.pw_gid}::{root}/x.org/a::\n"
        f"b@x.org::{nobody.pw_uid}:{nobody.pw_gid}::{root}/x.org/b::\n"
        "c@x.org:::::::\n"
    )
    resolver = UserdbResolver(root, userdbs=[PasswdFile(str(users))])
    config = ServerConfig(root=root, userdb=(f"passwd-file:{users}",), quota_rule="*:storage=1M")
    loop = asyncio.get_running_loop()
    async with DeliveryExecutor(writer=writer) as ex:  # type: ignore[arg-type]
        deliverer = quota_for(config, ex, resolver)
        assert deliverer is not None
        factory = SessionFactory(
            DeliveryHandler(deliverer, resolver), lmtp=True, max_connections=4, loop=loop
        )
        srv = await loop.create_server(factory, "127.0.0.1", 0)
        try:
            port = srv.sockets[0].getsockname()[1]
            rcpts = ["a@x.org", "b@x.org", "c@x.org"]
            for _ in range(2):
                replies = await send_message(
                    "127.0.0.1", port, mail_from="s@x.org", rcpts=rcpts, body=b"Hi\r\n", lmtp=True
                )
                assert [r.code for r in replies] == [250, 250, 250]
        finally:
            srv.close()
            await srv.wait_closed()
    await resolver.aclose()
    expect = {
        "a": (mail.pw_uid, mail.pw_gid, root / "x.org" / "a" / "Maildir"),
        "b": (nobody.pw_uid, nobody.pw_gid, root / "x.org" / "b" / "Maildir"),
        "c": (0, 0, root / "x.org" / "c"),
    }
    for who, (uid, gid, md) in expect.items():
        names = files_in(md / "new")
        assert len(names) == 2, who
        for p in [md, md / "tmp", md / "new", md / "cur", md / "maildirsize"] + [
            md / "new" / n for n in names
        ]:
            st = p.stat()
            assert (st.st_uid, st.st_gid) == (uid, gid), (who, p)
    home = (root / "x.org" / "a").stat()
    assert (home.st_uid, home.st_gid) == (mail.pw_uid, mail.pw_gid)
    assert (root / "x.org").stat().st_uid == 0  # above the home: not given away
