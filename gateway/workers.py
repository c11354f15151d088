"""``--workers N``: N gateway processes accept on one port (SO_REUSEPORT) and share RabbitMQ.

Each worker has its own AMQP connections and its own fan-out hubs, so a topic watched from several
workers is consumed once per worker. The supervisor forwards SIGINT/SIGTERM and exits with the worst
worker's exit code.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import sys
import tempfile

from prometheus_client.multiprocess import mark_process_dead

from gateway.config import Config

__all__ = ["supervise"]


def supervise(config: Config) -> int:
    # Every worker writes its metrics here and a scrape of any worker sums them (prometheus-client's
    # multiprocess mode); the workers are spawned, so they import prometheus-client with this set.
    metrics_dir = tempfile.mkdtemp(prefix="stomp-gateway-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        return _supervise(config)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _supervise(config: Config) -> int:
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
        if worker.pid is not None:  # its live gauges no longer count
            mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]
    codes = [worker.exitcode or 0 for worker in workers]
    return 0 if all(code == 0 for code in codes) else 1  # a worker killed by a signal has a negative code


def _worker(config: Config) -> None:
    from gateway.__main__ import configure_logging, serve

    configure_logging(config)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor forwards SIGTERM
    sys.exit(serve(config))
