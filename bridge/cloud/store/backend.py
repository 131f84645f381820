"""The seam between the ingest server and where committed readings live.

``Backend`` is what ``IngestService`` calls; ``bridge.cloud.store.sqlite.SqliteBackend`` (one
node, one file: the embedded default) and ``bridge.cloud.store.jetstream.JetStreamStore``
(stateless replicas in front of a replicated stream) implement it, and
``bridge.cloud.store.open_backend`` picks one from the config. Both keep the same exact
ledger per (site, epoch) and answer per item ``COMMITTED``, ``DUPLICATE`` or a rejection
reason.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from typing import Protocol

from bridge.cloud.store.fair import FairExecutor
from bridge.cloud.store.ledger import Key, StreamLedger
from bridge.cloud.store.records import Incoming
from bridge.shared._pb import bridge_pb2 as pb

StreamState = tuple[Key, StreamLedger, list[tuple[int, int, str]]]


def status_reply(node: str, streams: list[StreamState]) -> pb.StatusReply:
    """Per (site, epoch): watermark, highest seq, count, gaps and dropped ranges."""
    reply = pb.StatusReply(node=node)
    for (site, epoch), s, dropped in streams:
        st = reply.streams.add(site_id=site, epoch=epoch, committed_through=s.watermark,
                               highest_seq=s.highest, committed=s.committed,
                               dropped=[pb.DroppedRange(first_seq=f, last_seq=last, reason=r)
                                        for f, last, r in dropped])
        for first, last in s.gaps():
            st.gaps.add(first_seq=first, last_seq=last)
    return reply


class Backend(Protocol):
    max_epochs_per_site: int
    max_gaps_per_stream: int
    # A store bound to one thread offers its synchronous commit and that thread, so the
    # server validates, commits and answers in one hop there; None for an async store.
    inline_commit: Callable[[Sequence[Incoming]], list[str]] | None
    executor: FairExecutor

    def committed_now(self) -> None: ...

    def watermark(self, key: Key) -> int | None:
        """The stream's contiguous watermark as this node knows it (for acks); None if it
        holds no state for it now."""

    def sites(self) -> dict[str, tuple[int, int]]:
        """Per site: the watermark of its newest epoch and how many epochs this node knows
        (read from the metrics scrape thread: a snapshot, never a live view)."""

    async def start(self) -> None: ...

    async def commit(self, batch: Sequence[Incoming]) -> list[str]: ...

    async def status(self) -> list[StreamState]: ...

    def read(self, *, follow: bool, cursors: dict[Key, int] | None = None
             ) -> AsyncIterator[tuple[bytes, int]]: ...

    async def close(self, timeout: float = 5.0) -> bool: ...
