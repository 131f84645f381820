"""The seam between the ingest server and where committed readings live.

``Backend`` is what ``IngestService`` calls; ``SqliteBackend`` (one node, one file: the
embedded default) and ``bridge.ingest.jetstream.JetStreamStore`` (stateless replicas in front
of a replicated stream) implement it. Both keep the same exact ledger per (site, epoch) and
answer per item ``COMMITTED``, ``DUPLICATE`` or a rejection reason.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from bridge._pb import bridge_pb2 as pb
from bridge.common import wait_event
from bridge.ingest.fair import FairExecutor
from bridge.ingest.ledger import Key, Ledger, StreamLedger
from bridge.ingest.store import COMMITTED, Incoming, Reader, Store

_PAGE = 1000

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


class SqliteBackend:
    """``Store`` behind the seam: one writer thread (every commit), a small reader pool."""

    def __init__(self, *, store: Store) -> None:
        self.store = store
        self.max_epochs_per_site = store.max_epochs_per_site
        self.max_gaps_per_stream = store.max_gaps_per_stream
        self.ledger: Ledger = store.ledger
        self._writer = FairExecutor(name="store-writer")
        self._readers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="store-reader")
        self._committed = asyncio.Event()
        self.inline_commit: Callable[[Sequence[Incoming]], list[str]] | None = store.commit
        self.executor = self._writer

    def committed_now(self) -> None:
        """Wake followers after an inline commit (called on the event loop)."""
        ev, self._committed = self._committed, asyncio.Event()
        ev.set()

    def watermark(self, key: Key) -> int | None:
        s = self.ledger.streams.get(key)
        return s.watermark if s is not None else None

    def sites(self) -> dict[str, tuple[int, int]]:
        newest: dict[str, tuple[int, int]] = {}
        count: dict[str, int] = {}
        for (site, epoch), stream in list(self.ledger.streams.items()):
            count[site] = count.get(site, 0) + 1
            if site not in newest or epoch > newest[site][0]:
                newest[site] = (epoch, stream.watermark)
        return {site: (wm, count[site]) for site, (_, wm) in newest.items()}

    async def start(self) -> None:
        return None

    async def commit(self, batch: Sequence[Incoming]) -> list[str]:
        loop = asyncio.get_running_loop()
        out = await loop.run_in_executor(self._writer, self.store.commit, batch)
        if COMMITTED in out:
            ev, self._committed = self._committed, asyncio.Event()
            ev.set()
        return out

    async def status(self) -> list[StreamState]:
        loop = asyncio.get_running_loop()
        reader = Reader(self.store.path)
        try:
            dropped = await loop.run_in_executor(self._readers, reader.dropped)
        finally:
            await loop.run_in_executor(self._readers, reader.close)
        by_key: dict[Key, list[tuple[int, int, str]]] = {}
        for site, epoch, first, last, reason in dropped:
            by_key.setdefault((site, epoch), []).append((first, last, reason))
        return [(key, s.copy(), by_key.get(key, []))
                for key, s in sorted(list(self.ledger.streams.items()))]

    async def read(self, *, follow: bool, cursors: dict[Key, int] | None = None
                   ) -> AsyncIterator[tuple[bytes, int]]:
        """What was committed up to now, stream by stream from each cursor (an index seek
        per (site, epoch): the cost grows with what is read, not with what is stored); then,
        with ``follow``, every later commit in commit order."""
        loop = asyncio.get_running_loop()
        reader = Reader(self.store.path)
        cursors = cursors or {}
        try:
            upto = await loop.run_in_executor(self._readers, reader.max_offset)
            for site, epoch in sorted(list(self.ledger.streams)):
                after = cursors.get((site, epoch), 0)
                while True:
                    rows = await loop.run_in_executor(self._readers, reader.key_page, site,
                                                      epoch, after, upto, _PAGE)
                    for r in rows:
                        yield r.envelope, r.commit_ns
                    if len(rows) < _PAGE:
                        break
                    after = rows[-1].seq
            if not follow:
                return
            offset = upto
            while True:
                waiter = self._committed
                rows = await loop.run_in_executor(self._readers, reader.page, offset, _PAGE)
                for r in rows:
                    offset = r.offset
                    yield r.envelope, r.commit_ns
                if len(rows) < _PAGE:
                    await wait_event(waiter, 1.0)
        finally:
            await loop.run_in_executor(self._readers, reader.close)

    async def close(self, timeout: float = 5.0) -> bool:
        """Stop the threads; True once the writer is idle (then the file is closed)."""
        done = threading.Event()
        self._writer.submit(done.set)
        self._writer.shutdown(wait=False, cancel_futures=False)
        self._readers.shutdown(wait=False, cancel_futures=True)
        idle = await asyncio.get_running_loop().run_in_executor(None, done.wait, timeout)
        if idle:
            self.store.close()
        return idle
