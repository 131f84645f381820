"""A scripted ``Transport``: an ingest that is up, down, hung or throttling on command."""

from __future__ import annotations

import asyncio

from bridge.shared._pb import bridge_pb2 as pb
from bridge.shared.errors import ErrorKind, TransportError


class ScriptedTransport:
    def __init__(self, name: str) -> None:
        self.name = name
        self.up = True
        self.hung = False
        self.throttle_ms: int | None = None
        self.next_after_ms = 0  # the next OK answer to a batch with a backlog behind it
                                # names the site's next turn (once), as a node in demand does
        self.turned: list[int] = []  # backlog_readings of the batch answered so
        self.committed: list[int] = []
        self.calls = 0
        self._hang = asyncio.Event()

    def _unavailable(self) -> TransportError:
        return TransportError(code="UNAVAILABLE", flag="UF", kind=ErrorKind.RETRYABLE,
                              detail=f"{self.name} is down")

    async def push(self, batch: bytes, *, batch_id: str, timeout: float) -> pb.Ack:
        self.calls += 1
        if self.hung:
            await self._hang.wait()  # a stopped process: never answers
        if not self.up:
            raise self._unavailable()
        if self.throttle_ms is not None:
            ms, self.throttle_ms = self.throttle_ms, None
            raise TransportError(code="RESOURCE_EXHAUSTED", flag="RL", kind=ErrorKind.THROTTLED,
                                 detail="slow down", retry_after_s=ms / 1000)
        b = pb.Batch.FromString(batch)
        self.committed.extend(e.seq for e in b.envelopes)
        turn = self.next_after_ms if b.backlog_readings else 0
        if turn:
            self.turned.append(b.backlog_readings)
            self.next_after_ms = 0
        return pb.Ack(batch_id=batch_id, next_after_ms=turn, results=[
            pb.EnvelopeAck(site_id=e.site_id, epoch=e.epoch, seq=e.seq,
                           disposition=pb.DISPOSITION_COMMITTED) for e in b.envelopes])

    async def healthy(self, *, timeout: float) -> bool:
        if self.hung:
            try:
                await asyncio.wait_for(self._hang.wait(), timeout)
            except TimeoutError:
                raise TransportError(code="DEADLINE_EXCEEDED", flag="UT",
                                     kind=ErrorKind.RETRYABLE, detail="health check") from None
        if not self.up:
            raise self._unavailable()
        return True

    async def close(self, grace: float | None = None) -> None:
        self._hang.set()
