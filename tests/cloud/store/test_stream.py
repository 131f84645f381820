"""Reading a JetStream subject (bridge.cloud.store.stream): a delivery's reply subject read as
nats-py reads it, only cheaper and with the stored time exact to the nanosecond."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import nats
import pytest
from nats.aio.msg import Msg
from nats.errors import NotJSMessageError

from bridge.cloud.store import stream
from devkit.jscluster import JetStreamCluster


@pytest.fixture
def js(tmp_path: Path) -> Iterator[JetStreamCluster]:
    c = JetStreamCluster(tmp_path / "js").start()
    yield c
    c.stop()


def msg(reply: str) -> Msg:
    return Msg(_client=None, subject="bridge.r.a.1", reply=reply)  # type: ignore[arg-type]


def test_both_reply_layouts_give_stream_seq_time_and_pending() -> None:
    v1 = "$JS.ACK.BRIDGE.c1.1.42.7.1765000000123456789.3"
    v2 = "$JS.ACK._.ACCHASH.BRIDGE.c1.1.42.7.1765000000123456789.3.tok"
    assert stream.delivery(msg(v1)) == (42, 1765000000123456789, 3)
    assert stream.delivery(msg(v2)) == (42, 1765000000123456789, 3)
    assert stream.delivery(msg(v2.rsplit(".", 1)[0])) == (42, 1765000000123456789, 3)


@pytest.mark.parametrize("reply", ["", "_INBOX.x", "$JS.ACK.BRIDGE.c1.1.42.7",
                                   "$JS.NAK.a.b.c.d.e.f.g", "$JS.ACK.BRIDGE.c1.1.x.7.1.3"])
def test_anything_else_is_not_a_jetstream_delivery(reply: str) -> None:
    with pytest.raises((NotJSMessageError, ValueError)):
        stream.delivery(msg(reply))


async def test_a_real_delivery_reads_as_nats_py_reads_it(js: JetStreamCluster) -> None:
    nc = await nats.connect(servers=js.servers)
    try:
        jsc = nc.jetstream()
        await jsc.add_stream(name="T", subjects=["t.>"], num_replicas=3)
        for i in range(5):
            await jsc.publish(f"t.{i % 2}", b"x")
        seen = []
        async for m in stream.messages(jsc, "t.>", start=2, idle_s=10):
            d, meta = stream.delivery(m), m.metadata
            assert (d.stream_seq, d.pending) == (meta.sequence.stream, meta.num_pending)
            assert abs(d.time_ns - meta.timestamp.timestamp() * 1e9) < 1e3  # float: within 1 µs
            seen.append(d.stream_seq)
            if d.pending == 0:
                break
        assert seen == [2, 3, 4, 5]
    finally:
        await nc.close()
