"""aiosmtpd's Controller, delivering through one executor shared across threads.

The Controller runs the SMTP server in its own thread with its own event loop;
the executor runs in a private loop thread of its own (``with DeliveryExecutor()``).
Handlers on the Controller's loop call ``await executor.deliver()``, which is
handed over to the executor's loop and back: any loop, any thread.

    python examples/controller_smtp.py --root ./mail --port 8025
    swaks --server 127.0.0.1:8025 --to alice@example.org

Stops on SIGINT/SIGTERM, after the Controller has stopped and every accepted
message is durable.
"""

from __future__ import annotations

import argparse
import signal
import threading

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP

from delivery_executor import DeliveryExecutor, DeliveryHandler, DeliverySMTP, MailboxResolver


class DeliveryController(Controller):
    """A Controller whose sessions use our protocol class (enhanced status codes)."""

    def factory(self) -> SMTP:
        return DeliverySMTP(self.handler, **self.SMTP_kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", required=True, help="directory of all Maildirs")
    parser.add_argument("--port", type=int, default=8025)
    args = parser.parse_args()

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    with DeliveryExecutor() as executor:  # its own home loop, in a thread
        handler = DeliveryHandler(executor, MailboxResolver(args.root))
        controller = DeliveryController(handler, hostname="127.0.0.1", port=args.port)
        controller.start()
        print(f"listening on 127.0.0.1:{args.port}", flush=True)
        stop.wait()
        controller.stop()
    print(f"delivered {executor.stats().delivered}", flush=True)


if __name__ == "__main__":
    main()
