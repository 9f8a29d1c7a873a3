"""Prometheus metrics across the processes of one node.

Celery workers, beat and the runsmtp drainer count what they do in their own processes; a
scrape of the web's ``/metrics`` would never see it. With METRICS_DIR set (the default:
``DATA_DIR/metrics``), prometheus_client runs in multiprocess mode: every process writes its
values into files there (one per process and metric type), and ``/metrics`` adds them up
(counters and histograms summed; gauges as each declares with ``multiprocess_mode``).

Metrics computed at scrape time from the database (webhook backlog, index lag, mail flow)
are registered as collectors in this process's default registry and served next to the
files' aggregate. Across machines each node has its own folder: scrape the web process of
every node that runs workers, or give those nodes a web process for the scrape.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from django.core.exceptions import ImproperlyConfigured


def multiprocess_enable(directory: str) -> None:
    """Switch prometheus_client to multiprocess mode with its files in ``directory``.

    Called by settings.py, before any metric is created in the usual start-up order (a
    metric created earlier keeps its value in memory).
    """
    path = Path(directory).resolve()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ImproperlyConfigured(f"METRICS_DIR: cannot create {path}: {exc}") from exc
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
    _closing_tolerates_closed_descriptors()
    from prometheus_client import values

    # Files are named by process: host and pid, since containers sharing the folder (a
    # volume) each number their processes from 1.
    values.ValueClass = values.MultiProcessValue(process_identifier=process_identifier)


_HOST = socket.gethostname().replace("_", "-") or "localhost"  # "_" separates the file name's parts


def process_identifier(pid: int | None = None) -> str:
    """This process among all that write into METRICS_DIR."""
    return f"{_HOST}-{os.getpid() if pid is None else pid}"


def _closing_tolerates_closed_descriptors() -> None:
    """After a fork, prometheus_client closes the parent's metrics files and opens its own.

    billiard (Celery's embedded beat, ``worker -B``) closes every inherited descriptor in
    the child first, so that close fails with EBADF and the child dies on its first metric.
    A descriptor already closed is what closing wanted: drop it and go on.
    """
    from prometheus_client import mmap_dict

    original = mmap_dict.MmapedDict.close
    if getattr(original, "_tolerant", False):
        return

    def close(self: Any) -> None:
        try:
            original(self)
        except OSError:
            self._m = None
            self._f = None

    close._tolerant = True  # type: ignore[attr-defined]
    mmap_dict.MmapedDict.close = close  # type: ignore[method-assign]


def multiprocess_enabled() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


class _ScrapeTimeCollectors:
    """This process's collectors that compute their values when scraped (not from the files)."""

    def collect(self) -> Iterator[Any]:
        from prometheus_client import REGISTRY
        from prometheus_client.gc_collector import GCCollector
        from prometheus_client.metrics import MetricWrapperBase
        from prometheus_client.process_collector import ProcessCollector

        # Counters, gauges and histograms are in the files already; the process and GC
        # collectors would describe only the process that happens to answer the scrape.
        skipped = (MetricWrapperBase, ProcessCollector, GCCollector)
        for collector in list(REGISTRY._collector_to_names):
            if not isinstance(collector, skipped):
                yield from collector.collect()


def scrape_registry() -> Any:
    """What ``/metrics`` serves: the node's aggregate in multiprocess mode, else this process's."""
    from prometheus_client import REGISTRY, CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    if not multiprocess_enabled():
        return REGISTRY
    dead_processes_forget()
    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    registry.register(_ScrapeTimeCollectors())  # type: ignore[arg-type]
    return registry


def dead_processes_forget() -> None:
    """Drop the live gauges of this host's processes that ended without a word (``kill -9``).

    A killed runsmtp would otherwise go on reporting its last spool depth and free bytes. Only
    this host's files are judged: another container's pids mean nothing here.
    """
    prefix = f"{_HOST}-"
    for path in Path(os.environ["PROMETHEUS_MULTIPROC_DIR"]).glob("gauge_live*_*.db"):
        identifier = path.stem.split("_", 2)[-1]
        pid = identifier[len(prefix) :]
        if not identifier.startswith(prefix) or not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            process_dead(int(pid))
        except PermissionError:  # alive, someone else's
            pass


def process_dead(pid: int) -> None:
    """Drop a finished process's live gauges (``multiprocess_mode="live..."``) from the sums."""
    if multiprocess_enabled():
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(process_identifier(pid))
