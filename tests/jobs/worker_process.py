"""A summary worker in its own process, for the killed-worker test: fake models, the in-process backend.

Usage: ``python -m tests.jobs.worker_process DB_URL DELAY_S LEASE_S``. SIGTERM stops it cleanly;
the test SIGKILLs it to play a crashed host.
"""

from __future__ import annotations

import asyncio
import signal
import sys

from agent.jobs.lifecycle import run_worker
from tests.jobs.helpers import SlowReasoner, job_runtime


async def _main(db_url: str, delay_s: float, lease_s: float) -> None:
    runtime = job_runtime(db_url, reasoner=SlowReasoner(delay_s))
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("WORKER READY", flush=True)
    await run_worker(runtime, stop, lease_s=lease_s)


if __name__ == "__main__":
    asyncio.run(_main(sys.argv[1], float(sys.argv[2]), float(sys.argv[3])))
