"""Plain threads, no asyncio in sight: ``deliver_sync`` from a thread pool.

For threaded servers and scripts. The executor starts a private event loop
thread on first use; every worker thread blocks in ``deliver_sync`` until its
message is durable, and concurrent workers share commits.

    python examples/threaded.py --root ./mail --messages 1000 --threads 16
"""

from __future__ import annotations

import argparse
from concurrent.futures import ThreadPoolExecutor

from delivery_executor import DeliveryExecutor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", required=True, help="directory of the Maildirs")
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=16)
    args = parser.parse_args()

    with DeliveryExecutor() as executor:  # close() on exit waits for every write

        def deliver(i: int) -> str:
            body = f"From: script@example.org\r\nSubject: report {i}\r\n\r\nline {i}\r\n"
            mailbox = f"{args.root}/user{i % 10}"
            return executor.deliver_sync(mailbox, body.encode()).name

        with ThreadPoolExecutor(args.threads) as pool:
            names = list(pool.map(deliver, range(args.messages)))
        stats = executor.stats()
    print(
        f"delivered {len(names)} messages in {stats.batches} batches"
        f" (mean batch {stats.mean_batch_size:.1f}, {stats.syncs} syncs)",
        flush=True,
    )


if __name__ == "__main__":
    main()
