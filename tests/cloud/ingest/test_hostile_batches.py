"""A site with a valid certificate cannot wedge an ingest node: a real process, real mTLS."""

from __future__ import annotations

import signal
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.cloud.store.sqlite import Store
from bridge.shared._pb import bridge_pb2 as pb
from bridge.shared._pb import bridge_pb2_grpc as pb_grpc
from bridge.shared.config import TlsConfig
from bridge.shared.grpcconn import DEADLINE_METADATA
from devkit import localrun
from tests.conftest import metric_value, wait_for

C, D, R = pb.DISPOSITION_COMMITTED, pb.DISPOSITION_DUPLICATE, pb.DISPOSITION_REJECTED


def channel(target: str, tls: TlsConfig) -> grpc.Channel:
    ca, cert, key = tls.read()
    return grpc.secure_channel(target, grpc.ssl_channel_credentials(ca, key, cert))


def reading(seq: int, epoch: int = 7, site: str = "site-a") -> pb.Envelope:
    return pb.Envelope(site_id=site, epoch=epoch, seq=seq, values=[pb.Value(signal="v",
                                                                            number=1.0)])


def stone(first: int, last: int, epoch: int = 7, count: int | None = None) -> pb.Envelope:
    return pb.Envelope(site_id="site-a", epoch=epoch, seq=first, dropped=pb.DropNotice(
        reason="ttl", last_seq=last, count=last - first + 1 if count is None else count))


def paced(push: Any, batch: pb.Batch, within: float) -> pb.Ack:
    """``push(batch)`` acknowledged within ``within`` seconds, waiting out the node's
    admission control (RESOURCE_EXHAUSTED node_busy: its retry-after) as an agent does."""
    deadline = time.monotonic() + within
    while True:
        try:
            ack: pb.Ack = push(batch, timeout=max(deadline - time.monotonic(), 0))
            return ack
        except grpc.RpcError as exc:
            busy: Any = exc
            if busy.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise
            assert "admitted work" in busy.details()
            time.sleep(int(dict(busy.trailing_metadata())["retry-after-ms"]) / 1000)


class Node:
    """One real ingest process and clients for a site, a second site and a consumer."""

    def __init__(self, workdir: Path, pkis: localrun.Pki, extra: str = "") -> None:
        self.pkis = pkis
        self.proc = localrun.ingest(workdir, pkis, "aws", extra=extra).start()
        self.store_path = workdir / "store-aws.db"
        localrun.wait_healthy(self.proc.target, pkis.consumer())
        self.site = pb_grpc.IngestStub(channel(self.proc.target, pkis.site("site-a")))
        self.other = pb_grpc.IngestStub(channel(self.proc.target, pkis.site("site-b")))
        cons = channel(self.proc.target, pkis.consumer())
        self.status = pb_grpc.IngestStub(cons)
        self.health = health_pb2_grpc.HealthStub(cons)
        self.other_seq = 0

    def push(self, envs: list[pb.Envelope], timeout: float = 10) -> pb.Ack:
        ack: pb.Ack = self.site.PushBatch(pb.Batch(batch_id="t", envelopes=envs),
                                          timeout=timeout)
        return ack

    def answers(self) -> None:
        """A health check within 1 s, and another site's push committed within 5 s, waiting
        as an agent does when the node answers that it is busy (admission control)."""
        t0 = time.monotonic()
        resp = self.health.Check(health_pb2.HealthCheckRequest(service="bridge.v1.Ingest"),
                                 timeout=1.0)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        assert time.monotonic() - t0 < 1.0
        self.other_seq += 1
        batch = pb.Batch(batch_id="o", envelopes=[reading(self.other_seq, epoch=1,
                                                          site="site-b")])
        assert paced(self.other.PushBatch, batch, 5).results[0].disposition == C

    def agrees_after_reopen(self) -> None:
        """The node's ledger (Status) equals the one a reopen of its file rebuilds from rows."""
        reply = self.status.Status(pb.StatusRequest(), timeout=5)
        live = {(s.site_id, s.epoch): (s.committed_through, s.highest_seq, s.committed,
                                       [(g.first_seq, g.last_seq) for g in s.gaps])
                for s in reply.streams}
        store = Store(path=self.store_path)
        try:
            reopened = {k: (s.watermark, s.highest, s.committed, s.gaps())
                        for k, s in store.ledger.streams.items()}
        finally:
            store.close()
        assert live == reopened


@pytest.fixture
def node(tmp_path: Path, pkis: localrun.Pki) -> Iterator[Node]:
    n = Node(tmp_path, pkis)
    yield n
    n.proc.proc.stop()


def test_extreme_seqs_and_wide_tombstones_get_an_answer_per_envelope_not_a_failed_batch(
        node: Node):
    t0 = time.monotonic()
    ack = node.push([stone(2, 2**62), stone(2, 2**40 + 1), reading(2**64 - 1),
                     reading(2**63 - 1), stone(5, 9, count=3), stone(9, 5, count=1), reading(0),
                     pb.Envelope(site_id="site-a", epoch=0, seq=1)])
    assert time.monotonic() - t0 < 2.0
    got = [(r.disposition, r.reason.split(":")[0]) for r in ack.results]
    assert got == [(R, "tombstone_too_wide"), (C, ""), (R, "seq_out_of_range"), (C, ""),
                   (R, "bad_drop_notice"), (R, "bad_drop_notice"), (R, "bad_identity"),
                   (R, "bad_identity")]
    assert [(r.epoch, r.seq) for r in ack.results][:4] == [(7, 2), (7, 2), (7, 2**64 - 1),
                                                           (7, 2**63 - 1)]
    node.answers()
    assert node.push([reading(1), reading(3)]).results[1].disposition == D  # in the stone
    node.agrees_after_reopen()


def test_a_batch_past_the_envelope_limit_is_refused_whole_before_any_envelope_is_stored(
        tmp_path: Path, pkis: localrun.Pki):
    n = Node(tmp_path, pkis, extra="[limits]\nmax_batch_envelopes = 100\n")
    try:
        with pytest.raises(grpc.RpcError) as info:
            n.push([reading(s) for s in range(1, 151)])
        err: Any = info.value
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_batch_envelopes=100" in err.details()
        assert ("max-batch-envelopes", "100") in tuple(err.trailing_metadata())
        assert [r.disposition for r in n.push([reading(s) for s in range(1, 101)]).results] \
            == [C] * 100, "nothing of the refused batch was stored"
        n.answers()
    finally:
        n.proc.proc.stop()


def test_a_message_past_the_byte_limit_is_refused_by_grpc_and_the_node_answers_others(
        tmp_path: Path, pkis: localrun.Pki):
    n = Node(tmp_path, pkis, extra="[limits]\nmax_batch_bytes = 65536\n")
    try:
        with pytest.raises(grpc.RpcError) as info:  # 820,000 bare envelopes would be 14 MiB
            n.push([pb.Envelope(site_id="site-a", epoch=7, seq=s) for s in range(1, 20_001)])
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
        n.answers()
    finally:
        n.proc.proc.stop()


def test_a_site_past_its_calls_in_flight_is_told_to_retry_and_other_sites_are_not(
        tmp_path: Path, pkis: localrun.Pki):
    import sqlite3

    port = localrun.free_port()
    n = Node(tmp_path, pkis, extra=f'[limits]\nmax_in_flight_per_site = 1\n'
                                   f'[metrics]\nlisten = "127.0.0.1:{port}"\n')
    lock = sqlite3.connect(n.store_path, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")  # the first call stays in flight while the lock is held
    outcome: list[BaseException] = []

    def first() -> None:
        try:
            n.push([reading(1)], timeout=10)
        except grpc.RpcError as exc:
            outcome.append(exc)

    def in_flight() -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        return metric_value(text, 'bridge_ingest_requests_in_flight{method="PushBatch"}')

    t = threading.Thread(target=first)
    t.start()
    try:
        wait_for(lambda: in_flight() >= 1, what="the first call in flight")
        # On the same connection the call waits on the client's side (the server allows a
        # connection the site's calls in flight as its concurrent streams): nothing to parse.
        with pytest.raises(grpc.RpcError) as waited:
            n.push([reading(2)], timeout=0.5)
        assert waited.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
        assert in_flight() == 1
        # A second connection of the same site is told to retry at once.
        again = pb_grpc.IngestStub(channel(n.proc.target, pkis.site("site-a")))
        with pytest.raises(grpc.RpcError) as info:
            again.PushBatch(pb.Batch(batch_id="t2", envelopes=[reading(2)]), timeout=10)
        refused: Any = info.value
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        retry = dict(refused.trailing_metadata())["retry-after-ms"]
        assert 20 <= int(retry) <= 100
        assert "max_in_flight_per_site" in refused.details()
        with pytest.raises(grpc.RpcError) as other:  # site-b is not capped by site-a's calls
            n.other.PushBatch(pb.Batch(batch_id="o", envelopes=[
                reading(1, epoch=1, site="site-b")]), timeout=0.5)
        assert other.value.code() != grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
    finally:
        lock.execute("ROLLBACK")
        lock.close()
        t.join(15)
    n.answers()
    assert n.push([reading(3)]).results[0].disposition == C
    n.proc.proc.stop()


def test_health_and_other_sites_are_answered_while_a_large_batch_commits(node: Node):
    big = [reading(s, epoch=9) for s in range(1, 10_001)]
    errors: list[BaseException] = []

    def push_big() -> None:
        try:
            for i in range(4):
                paced(node.site.PushBatch, pb.Batch(batch_id="big", envelopes=[
                    pb.Envelope(site_id="site-a", epoch=9 + i, seq=e.seq, values=e.values)
                    for e in big]), 60)
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=push_big)
    t.start()
    while t.is_alive():
        node.answers()
    t.join()
    assert not errors
    assert node.other_seq >= 1


def test_sigterm_stops_the_node_within_its_grace_while_the_store_is_locked(
        node: Node, tmp_path: Path):
    import sqlite3

    lock = sqlite3.connect(node.store_path, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")  # another process holds the write lock: commits stall
    try:
        with pytest.raises(grpc.RpcError) as info:
            node.push([reading(1)], timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
        assert "store unavailable" in (info.value.details() or "")  # type: ignore[attr-defined]
        def push_stuck() -> None:
            with pytest.raises(grpc.RpcError):
                node.push([reading(2)], 10)

        pushing = threading.Thread(target=push_stuck)
        pushing.start()
        t0 = time.monotonic()
        node.proc.proc.signal(signal.SIGTERM)
        assert node.proc.proc.popen is not None
        node.proc.proc.popen.wait(timeout=10)
        assert time.monotonic() - t0 < 7.0  # 5 s grace, plus start-up slack
        pushing.join(10)
    finally:
        lock.execute("ROLLBACK")
        lock.close()


# -- property-based: generated batches from a valid site certificate -------------------------

SEQ = st.one_of(st.integers(1, 300), st.sampled_from([0, 2**63 - 1, 2**63, 2**64 - 1]))
ENVELOPE = st.one_of(
    st.builds(lambda s, e: reading(s, epoch=e), SEQ, st.integers(1, 3)),
    st.builds(lambda s, w, e: stone(s, s + w, epoch=e), st.integers(1, 300),
              st.integers(0, 40), st.integers(1, 3)),
    st.builds(lambda s, w: stone(s, s + w, epoch=4), st.integers(1, 2**40),
              st.integers(0, 2**41)),
    st.builds(lambda e: reading(1, epoch=e), st.integers(5, 2**64 - 1)),  # many epochs
)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory, pkis: localrun.Pki) -> Iterator[Node]:
    n = Node(tmp_path_factory.mktemp("prop"), pkis,
             extra="[limits]\nmax_epochs_per_site = 40\nmax_batch_envelopes = 500\n")
    yield n
    n.proc.proc.stop()


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.lists(ENVELOPE, min_size=1, max_size=600))
def test_generated_batches_never_wedge_the_node_and_ledger_and_rows_always_agree(
        shared: Node, envs: list[pb.Envelope]):
    if len(envs) > 500:  # past max_batch_envelopes: refused whole, nothing stored
        with pytest.raises(grpc.RpcError) as info:
            shared.push(envs)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
        shared.answers()
        shared.agrees_after_reopen()
        return
    ack = shared.push(envs)
    assert len(ack.results) == len(envs)
    assert [(r.epoch, r.seq) for r in ack.results] == [(e.epoch, e.seq) for e in envs]
    for r in ack.results:
        assert r.disposition in (C, D, R)
        assert (r.disposition == R) == bool(r.reason)
    shared.answers()
    shared.agrees_after_reopen()


def test_a_node_in_demand_names_the_next_turn_of_a_site_that_says_it_has_a_backlog(
        tmp_path: Path, pkis: localrun.Pki):
    port = localrun.free_port()
    n = Node(tmp_path, pkis, extra="[limits]\nmax_batch_envelopes = 150000\n"
             f'[rate_limit]\nreadings_per_s = 0\n[metrics]\nlisten = "127.0.0.1:{port}"\n')
    try:
        # Another site's call that says it waited a minute before its handler ran: refused
        # late, and its 150,000 readings take a place in the line (5 s at the first guess of
        # the node's rate): the node is in demand for the next few seconds.
        late = pb.Batch(batch_id="late", envelopes=[
            pb.Envelope(site_id="site-b", epoch=1, seq=s) for s in range(1, 150_001)])
        with pytest.raises(grpc.RpcError) as err:
            n.other.PushBatch(late, timeout=30, metadata=((DEADLINE_METADATA, "90000"),))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
        live = n.site.PushBatch(pb.Batch(batch_id="l", envelopes=[reading(1)]), timeout=5)
        assert live.results[0].disposition == C and live.next_after_ms == 0, \
            "a batch with nothing behind it is given no turn"
        draining = n.site.PushBatch(pb.Batch(batch_id="d", envelopes=[reading(2)],
                                             backlog_readings=5_000), timeout=5)
        assert draining.results[0].disposition == C
        assert 1_000 < draining.next_after_ms <= 6_000, "its place behind the line"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        assert metric_value(text, "bridge_ingest_admission_next_turns_total") == 1
        assert metric_value(text, 'bridge_ingest_admission_refusals_total{why="late"}') == 1
    finally:
        n.proc.proc.stop()
