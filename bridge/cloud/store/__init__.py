"""The ingest's stores, bottom up: ``ledger`` (the exact dedupe model) and ``records`` (what
every store commits and answers); ``backend`` (the seam the server commits through);
``sqlite`` and ``jetstream`` beside each other, with ``subjects``, ``stream`` and ``fair``
serving them. ``open_backend`` is the one place a config becomes a store.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from bridge.cloud.store.backend import Backend
from bridge.shared.config import JetStreamSettings
from bridge.shared.telemetry import IngestMetrics


def open_backend(*, store_path: Path | None, jetstream: JetStreamSettings | None,
                 max_epochs_per_site: int, max_gaps_per_stream: int, metrics: IngestMetrics,
                 on_health: Callable[[bool], Awaitable[None]]) -> Backend:
    """A JetStream store when ``jetstream`` is set, else the SQLite file at ``store_path``.

    Imported lazily: a SQLite node never loads nats-py, a replica never opens a file."""
    if jetstream is not None:
        from bridge.cloud.store.jetstream import JetStreamStore

        return JetStreamStore(settings=jetstream, max_epochs_per_site=max_epochs_per_site,
                              max_gaps_per_stream=max_gaps_per_stream, on_health=on_health,
                              metrics=metrics)
    if store_path is None:
        raise ValueError("a SQLite store needs its path")
    from bridge.cloud.store.sqlite import SqliteBackend, Store

    return SqliteBackend(store=Store(path=store_path, max_epochs_per_site=max_epochs_per_site,
                                     max_gaps_per_stream=max_gaps_per_stream))
