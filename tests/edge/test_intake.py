"""The intake (bridge.edge.intake): group commits bounded in messages and in payload bytes, acked
in receive order; the event loop keeps turning while a large group is decoded. A scripted
source stands in for the broker (the seam); the spool is real."""

from __future__ import annotations

import asyncio
from pathlib import Path

from bridge.edge.codecs import Publish, make_decoder
from bridge.edge.envelope import SourceInfo
from bridge.edge.intake import ClockSync, Intake, IntakePolicy
from bridge.edge.sources.base import Message
from bridge.edge.spool import AsyncSpool, Spool
from bridge.shared.telemetry import AgentMetrics
from tests.conftest import LoopTurns


class Scripted:
    """A source that hands over the messages it was given and records every ack."""

    def __init__(self, messages: list[Message]) -> None:
        self.info = SourceInfo(name="plant", protocol="mqtt", broker="mqtt://test")
        self.subscribed = asyncio.Event()
        self.reconnect_max_s = 1.0
        self._left = list(messages)
        self.acks: list[list[int]] = []
        self.drained = asyncio.Event()

    async def run(self) -> None:
        return None

    async def take(self, max_messages: int) -> list[Message]:
        if not self._left:
            await asyncio.Event().wait()  # nothing more: wait to be cancelled
        out, self._left = self._left[:max_messages], self._left[max_messages:]
        return out

    async def ack(self, messages: list[Message]) -> None:
        self.acks.append([m.token for m in messages])
        if not self._left:
            self.drained.set()

    def publish(self, message: Publish) -> None:
        return None

    async def stop(self) -> None:
        return None


def messages(n: int, size: int) -> list[Message]:
    body = b'{"value": %d, "pad": "%s"}'
    return [Message(topic="plant/p", payload=body % (i, b"x" * size), redelivered=False,
                    generation=1, token=i, qos=1) for i in range(n)]


async def run_intake(tmp_path: Path, source: Scripted, policy: IntakePolicy
                     ) -> tuple[AsyncSpool, AgentMetrics]:
    spool = AsyncSpool(Spool(path=tmp_path / "spool.db", site_id="site-a", max_bytes=1 << 26))
    metrics = AgentMetrics()
    intake = Intake(source=source, spool=spool, site_id="site-a",
                    decoder=make_decoder(codec="json"), metrics=metrics, clock=ClockSync(),
                    policy=policy)
    task = asyncio.create_task(intake.run())
    try:
        async with asyncio.timeout(20):
            await source.drained.wait()
    finally:
        intake.stop()
        await task
    return spool, metrics


async def test_a_group_is_cut_at_commit_max_bytes_and_acked_in_receive_order(tmp_path: Path):
    source = Scripted(messages(10, 1_000))  # about 1 kB each, taken in one go
    spool, metrics = await run_intake(tmp_path, source, IntakePolicy(commit_max=100,
                                                                     commit_max_bytes=2_500))
    try:
        assert source.acks == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
        assert metrics.spool_commits._value.get() == 5
        assert spool.figures().readings == 10
    finally:
        await spool.close()


async def test_a_message_larger_than_commit_max_bytes_is_a_group_of_its_own(tmp_path: Path):
    source = Scripted(messages(1, 10_000) + messages(2, 10))
    spool, _ = await run_intake(tmp_path, source, IntakePolicy(commit_max=100,
                                                               commit_max_bytes=2_000))
    try:
        assert [len(a) for a in source.acks] == [1, 2]
        assert spool.figures().readings == 3
    finally:
        await spool.close()


async def test_the_event_loop_turns_while_a_large_group_is_decoded(tmp_path: Path):
    """A task counting loop turns advances during the decode of 1,000 messages (in slices),
    not only after it."""
    source = Scripted(messages(1_000, 10))
    decode = Intake._prepare
    during: list[int] = []
    async with LoopTurns() as turns:

        def spy(self: Intake, batch: list[Message], seen: object, digests: object) -> object:
            during.append(turns.count)
            return decode(self, batch, seen, digests)  # type: ignore[arg-type]

        Intake._prepare = spy  # type: ignore[assignment,method-assign]
        try:
            spool, _ = await run_intake(tmp_path, source, IntakePolicy(commit_max=1_000))
            await spool.close()
        finally:
            Intake._prepare = decode  # type: ignore[method-assign]
    assert len(during) > 10 and during[-1] > during[0], "decoded in one go, loop frozen"
