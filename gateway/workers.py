"""``--workers N``: N gateway processes accept on one port (SO_REUSEPORT) and share RabbitMQ.

Each worker has its own AMQP connections and its own fan-out hubs, so a topic watched from several
workers is consumed once per worker. The supervisor forwards SIGINT/SIGTERM and exits with the worst
worker's exit code.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys

from gateway.config import Config

__all__ = ["supervise"]


def supervise(config: Config) -> int:
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_worker, args=(config,), name=f"gateway-{i}") for i in range(config.workers)]
    for worker in workers:
        worker.start()

    def forward(signum: int, _frame: object) -> None:
        for worker in workers:
            if worker.pid is not None and worker.is_alive():
                os.kill(worker.pid, signal.SIGTERM)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    for worker in workers:
        worker.join()
    codes = [worker.exitcode or 0 for worker in workers]
    return 0 if all(code == 0 for code in codes) else 1  # a worker killed by a signal has a negative code


def _worker(config: Config) -> None:
    from gateway.__main__ import configure_logging, serve

    configure_logging(config)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor forwards SIGTERM
    sys.exit(serve(config))
