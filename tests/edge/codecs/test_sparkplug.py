"""The Sparkplug B decoder: births, aliases, types, deaths, seq, rebirth requests, state."""

from __future__ import annotations

import contextlib
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.edge.codecs.sparkplug import REBIRTH_METRIC, SparkplugDecoder
from bridge.shared._pb import sparkplug_b_pb2 as sp
from bridge.shared.errors import DecodeError

NODE = "spBv1.0/Plant/{}/Edge1"
DEV = "spBv1.0/Plant/{}/Edge1/Pump1"
CORPUS = Path(__file__).parent / "corpus" / "sparkplug"


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def payload(*metrics: dict[str, Any], seq: int | None = None, ts: int | None = None) -> bytes:
    p = sp.Payload()
    if seq is not None:
        p.seq = seq
    if ts is not None:
        p.timestamp = ts
    for m in metrics:
        p.metrics.add(**m)
    return p.SerializeToString()


def nbirth(seq: int = 0, bd: int = 7) -> bytes:
    return payload({"name": "bdSeq", "datatype": sp.Int64, "long_value": bd},
                   {"name": "Uptime", "alias": 1, "datatype": sp.UInt32, "int_value": 5},
                   seq=seq, ts=1_700_000_000_000)


def dbirth(seq: int = 1) -> bytes:
    return payload(
        {"name": "Flow", "alias": 10, "datatype": sp.Double, "double_value": 412.5},
        {"name": "Delta", "alias": 11, "datatype": sp.Int8, "int_value": 0xFFFFFFFE},
        {"name": "Running", "alias": 12, "datatype": sp.Boolean, "boolean_value": True},
        {"name": "Mode", "alias": 13, "datatype": sp.String, "string_value": "auto"},
        {"name": "Level", "alias": 14, "datatype": sp.Float, "float_value": 0.1},
        {"name": "Energy", "alias": 15, "datatype": sp.Int64, "long_value": 2**64 - 3},
        {"name": "LastService", "alias": 16, "datatype": sp.DateTime,
         "long_value": 1_600_000_000_000},
        seq=seq)


def born(notices: list[tuple[str, dict[str, Any]]] | None = None, **kw: Any) -> SparkplugDecoder:
    d = SparkplugDecoder(notice=(lambda k, f: notices.append((k, f))) if notices is not None
                         else None, clock=kw.pop("clock", Clock()), **kw)
    d.decode(NODE.format("NBIRTH"), nbirth())
    d.decode(DEV.format("DBIRTH"), dbirth())
    return d


def values(decoded: Any) -> dict[str, Any]:
    return {v.signal: v.value for v in decoded.values}


def test_the_wire_format_matches_sparkplug_b_field_numbers():
    # Hand-encoded DDATA: timestamp=1 (field 1), seq=2 (field 3), one metric (field 2) with
    # alias=10 (field 2) and double_value=1.5 (field 13, fixed64). If the schema drifted from
    # Sparkplug B's field numbers, this would not decode to Flow = 1.5.
    metric = b"\x10\x0a" + b"\x69" + struct.pack("<d", 1.5)
    wire = b"\x08\x01" + b"\x12" + bytes([len(metric)]) + metric + b"\x18\x02"
    d = born()
    out = d.decode(DEV.format("DDATA"), wire)
    assert values(out) == {"Flow": 1.5}
    assert out.source_seq == 2
    assert out.source_time_ns == 1_000_000


def test_data_resolves_aliases_to_names_and_typed_values():
    d = born()
    out = d.decode(DEV.format("DDATA"), payload(
        *({"alias": a} | v for a, v in [
            (10, {"double_value": 7.25}), (11, {"int_value": 0xFFFFFF80}),
            (12, {"boolean_value": False}), (13, {"string_value": "manual"}),
            (14, {"float_value": 2.2}), (15, {"long_value": 2**64 - 1}),
            (16, {"long_value": 1_700_000_000_123})]), seq=2))
    assert values(out) == {"Flow": 7.25, "Delta": -128, "Running": False, "Mode": "manual",
                           "Level": 2.2, "Energy": -1, "LastService": 1_700_000_000_123}
    assert next(v.unit for v in out.values if v.signal == "LastService") == "unix_ms"
    assert out.labels == {"group": "Plant", "edge_node": "Edge1", "device": "Pump1",
                          "message_type": "DDATA"}


def test_births_are_readings_too():
    d = SparkplugDecoder(clock=Clock())
    out = d.decode(NODE.format("NBIRTH"), nbirth())
    assert values(out) == {"bdSeq": 7, "Uptime": 5}
    out = d.decode(DEV.format("DBIRTH"), dbirth())
    assert values(out)["Delta"] == -2
    assert values(out)["Level"] == 0.1  # float32 shown as the shortest decimal


def test_null_and_historical_values_are_marked():
    d = born()
    out = d.decode(DEV.format("DDATA"), payload(
        {"alias": 10, "is_null": True}, {"alias": 14, "float_value": 3.0, "is_historical": True,
                                         "timestamp": 1_690_000_000_000}, seq=2))
    flow, level = out.values
    assert flow.value is None
    assert level.historical and level.source_time_ns == 1_690_000_000_000 * 1_000_000


def test_data_before_birth_is_refused_and_a_rebirth_is_requested_once_per_interval():
    clock = Clock()
    notices: list[tuple[str, dict[str, Any]]] = []
    d = SparkplugDecoder(clock=clock, rebirth_interval_s=10.0,
                         notice=lambda k, f: notices.append((k, f)))
    for _ in range(3):
        with pytest.raises(DecodeError) as info:
            d.decode(NODE.format("NDATA"), payload({"alias": 1, "int_value": 1}, seq=4))
        assert info.value.reason == "data_before_birth"
    requests = d.take_requests()
    assert len(requests) == 1
    req = requests[0]
    assert req.topic == "spBv1.0/Plant/NCMD/Edge1"
    cmd = sp.Payload.FromString(req.payload)
    assert [(m.name, m.datatype, m.boolean_value) for m in cmd.metrics] == [
        (REBIRTH_METRIC, sp.Boolean, True)]
    clock.t += 10.0
    with pytest.raises(DecodeError):
        d.decode(NODE.format("NDATA"), payload({"alias": 1, "int_value": 1}, seq=5))
    assert len(d.take_requests()) == 1
    assert [k for k, _ in notices] == ["rebirth_requested", "rebirth_requested"]


def test_an_unknown_alias_is_refused_and_asks_for_a_rebirth():
    d = born()
    with pytest.raises(DecodeError) as info:
        d.decode(DEV.format("DDATA"), payload({"alias": 99, "int_value": 1}, seq=2))
    assert info.value.reason == "unknown_alias"
    assert [r.topic for r in d.take_requests()] == ["spBv1.0/Plant/NCMD/Edge1"]


def test_a_device_that_has_not_been_born_is_refused():
    d = born()
    with pytest.raises(DecodeError) as info:
        d.decode("spBv1.0/Plant/DDATA/Edge1/Pump2", payload({"alias": 10, "double_value": 1.0},
                                                             seq=2))
    assert info.value.reason == "data_before_birth"


def test_seq_wraps_at_255_without_a_gap_and_a_jump_is_a_gap():
    notices: list[tuple[str, dict[str, Any]]] = []
    d = SparkplugDecoder(notice=lambda k, f: notices.append((k, f)), clock=Clock())
    d.decode(NODE.format("NBIRTH"), nbirth(seq=254))
    d.decode(NODE.format("NDATA"), payload({"alias": 1, "int_value": 1}, seq=255))
    d.decode(NODE.format("NDATA"), payload({"alias": 1, "int_value": 2}, seq=0))
    assert notices == []
    out = d.decode(NODE.format("NDATA"), payload({"alias": 1, "int_value": 3}, seq=5))
    assert values(out) == {"Uptime": 3}  # the message itself is kept
    assert notices[0] == ("seq_gap", {"topic": NODE.format("NDATA"), "expected": 1, "got": 5})
    assert [r.topic for r in d.take_requests()] == ["spBv1.0/Plant/NCMD/Edge1"]


def test_a_gap_does_not_ask_for_a_rebirth_when_that_is_switched_off():
    d = SparkplugDecoder(rebirth_on_gap=False, clock=Clock())
    d.decode(NODE.format("NBIRTH"), nbirth(seq=0))
    d.decode(NODE.format("NDATA"), payload({"alias": 1, "int_value": 3}, seq=9))
    assert d.take_requests() == []


def test_a_death_with_the_current_bdseq_takes_the_node_and_its_devices_offline():
    d = born()
    out = d.decode(NODE.format("NDEATH"), payload({"name": "bdSeq", "datatype": sp.Int64,
                                                   "long_value": 7}))
    assert out.values == [] and out.labels["message_type"] == "NDEATH" and out.skip is None
    with pytest.raises(DecodeError) as info:
        d.decode(DEV.format("DDATA"), payload({"alias": 10, "double_value": 1.0}, seq=3))
    assert info.value.reason == "data_before_birth"


def test_a_stale_death_from_an_earlier_session_is_skipped():
    notices: list[tuple[str, dict[str, Any]]] = []
    d = born(notices)
    out = d.decode(NODE.format("NDEATH"), payload({"name": "bdSeq", "datatype": sp.Int64,
                                                   "long_value": 6}))
    assert out.skip == "stale_death"
    assert notices[-1][0] == "stale_death"
    assert values(d.decode(DEV.format("DDATA"), payload({"alias": 10, "double_value": 1.0},
                                                        seq=2))) == {"Flow": 1.0}


def test_a_device_death_takes_only_that_device_offline():
    d = born()
    d.decode(DEV.format("DDEATH"), payload(seq=2))
    with pytest.raises(DecodeError):
        d.decode(DEV.format("DDATA"), payload({"alias": 10, "double_value": 1.0}, seq=3))
    assert values(d.decode(NODE.format("NDATA"), payload({"alias": 1, "int_value": 9},
                                                         seq=4))) == {"Uptime": 9}


def test_a_new_node_birth_forgets_the_devices():
    d = born()
    d.decode(NODE.format("NBIRTH"), nbirth(bd=8))
    with pytest.raises(DecodeError):
        d.decode(DEV.format("DDATA"), payload({"alias": 10, "double_value": 1.0}, seq=1))


def test_birth_certificates_survive_a_restart_through_the_saved_state():
    d = born()
    state = d.take_state()
    assert list(state) == ["Plant/Edge1"]
    assert d.take_state() == {}  # only changes are handed over
    fresh = SparkplugDecoder(clock=Clock())
    fresh.restore({k: v for k, v in state.items() if v is not None})
    out = fresh.decode(DEV.format("DDATA"), payload({"alias": 12, "boolean_value": True},
                                                    seq=77))
    assert values(out) == {"Running": True}


def test_unreadable_saved_state_is_reported_and_forgotten():
    notices: list[tuple[str, dict[str, Any]]] = []
    d = SparkplugDecoder(notice=lambda k, f: notices.append((k, f)), clock=Clock())
    d.restore({"Plant/Edge1": b"{not json"})
    assert notices[0][0] == "state_unreadable"
    with pytest.raises(DecodeError):
        d.decode(NODE.format("NDATA"), payload({"alias": 1, "int_value": 1}, seq=1))


def test_metrics_of_complex_types_keep_the_raw_payload():
    d = SparkplugDecoder(clock=Clock())
    ds = sp.Payload.DataSet(num_of_columns=1, columns=["a"], types=[sp.Int32])
    raw = payload({"name": "bdSeq", "datatype": sp.Int64, "long_value": 0},
                  {"name": "Table", "datatype": sp.DataSet, "dataset_value": ds}, seq=0)
    out = d.decode(NODE.format("NBIRTH"), raw)
    assert values(out) == {"bdSeq": 0}
    assert out.raw == raw and out.labels["unsupported"] == "Table"


def test_host_state_messages_are_skipped_and_other_topics_refused():
    d = SparkplugDecoder(clock=Clock())
    assert d.decode("spBv1.0/STATE/scada-1", b'{"online": true}').skip == "host_state"
    for topic in ("spBv1.0/Plant/NDATA", "spBv1.0/Plant/DDATA/Edge1", "plant/x/y/z",
                  "spBv1.0/Plant/NBIRTH/Edge1/Dev", "spBv1.0/Plant/XDATA/Edge1",
                  "spBv1.0//NDATA/Edge1"):
        with pytest.raises(DecodeError) as info:
            d.decode(topic, nbirth())
        assert info.value.reason == "bad_topic", topic


@pytest.mark.parametrize(("metric", "reason"), [
    ({"alias": 10, "int_value": 1}, "type_mismatch"),        # Flow is a Double
    ({"alias": 12, "string_value": "yes"}, "type_mismatch"),  # Running is a Boolean
    ({"name": "New", "int_value": 1}, "unknown_datatype"),
    ({"int_value": 1}, "bad_metric"),
    ({"alias": 14, "timestamp": 2**63, "float_value": 1.0}, "bad_timestamp"),
])
def test_bad_metrics_fail_with_a_specific_reason(metric: dict[str, Any], reason: str):
    d = born()
    with pytest.raises(DecodeError) as info:
        d.decode(DEV.format("DDATA"), payload(metric, seq=2))
    assert info.value.reason == reason


def test_uint_values_out_of_range_for_their_width_are_refused():
    d = SparkplugDecoder(clock=Clock())
    with pytest.raises(DecodeError) as info:
        d.decode(NODE.format("NBIRTH"), payload({"name": "x", "datatype": sp.UInt8,
                                                 "int_value": 300}, seq=0))
    assert info.value.reason == "bad_value"


def test_garbage_and_truncated_payloads_are_invalid_protobuf():
    d = born()
    good = payload({"alias": 10, "double_value": 1.0}, seq=2)
    for bad in (b"\xff\xff\xff", good[:-3], b"\x12\x50" + b"\x00" * 4):
        with pytest.raises(DecodeError) as info:
            d.decode(DEV.format("DDATA"), bad)
        assert info.value.reason == "invalid_protobuf"


def test_the_real_shaped_corpus_decodes_as_recorded():
    """Captures shaped like Ignition/Tahu edge nodes publish them (see corpus/README.md)."""
    d = SparkplugDecoder(clock=Clock())
    decoded = 0
    for path in sorted(CORPUS.glob("*.bin")):
        topic = path.stem.split("__", 1)[1].replace("~", "/")
        expect = path.with_suffix(".expect").read_text().strip()
        try:
            out = d.decode(topic, path.read_bytes())
            got = f"ok {len(out.values)}" if out.skip is None else f"skip {out.skip}"
        except DecodeError as exc:
            got = f"error {exc.reason}"
        assert got == expect, path.name
        decoded += 1
    assert decoded >= 8


topics = st.sampled_from([NODE.format(t) for t in ("NBIRTH", "NDATA", "NDEATH", "NCMD")]
                         + [DEV.format(t) for t in ("DBIRTH", "DDATA", "DDEATH", "DCMD")]
                         + ["spBv1.0/STATE/h", "spBv1.0/Plant/NDATA/Other"])


@settings(max_examples=3000, deadline=None)
@given(topics, st.binary(max_size=300))
def test_arbitrary_bytes_either_decode_or_raise_decode_error(topic: str, data: bytes):
    d = born()
    with contextlib.suppress(DecodeError):
        d.decode(topic, data)


metric_fields = st.fixed_dictionaries({}, optional={
    "name": st.sampled_from(["Flow", "Delta", "bdSeq", "X", ""]),
    "alias": st.integers(0, 20),
    "timestamp": st.integers(0, 2**64 - 1),
    "datatype": st.integers(0, 40),
    "is_null": st.booleans(),
    "is_historical": st.booleans(),
    "int_value": st.integers(0, 2**32 - 1),
    "long_value": st.integers(0, 2**64 - 1),
    "float_value": st.floats(width=32),
    "double_value": st.floats(),
    "boolean_value": st.booleans(),
    "string_value": st.text(max_size=10),
    "bytes_value": st.binary(max_size=10),
})


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.tuples(topics, st.lists(metric_fields, max_size=6),
                          st.none() | st.integers(0, 300)), max_size=6))
def test_arbitrary_well_formed_message_sequences_never_raise_anything_but_decode_error(
        messages: list[tuple[str, list[dict[str, Any]], int | None]]):
    d = SparkplugDecoder(clock=Clock())
    for topic, metrics, seq in messages:
        with contextlib.suppress(DecodeError):
            out = d.decode(topic, payload(*metrics, seq=seq))
            for v in out.values:
                assert v.value is None or isinstance(v.value, bool | int | float | str)
    d.take_state()
    d.take_requests()


def _wrapped(inner: bytes, algorithm: str | None, compress=None) -> bytes:
    import gzip
    import zlib

    if compress is None:
        compress = gzip.compress if algorithm == "GZIP" else zlib.compress
    p = sp.Payload(uuid="SPBV1.0_COMPRESSED", body=compress(inner))
    if algorithm is not None:
        p.metrics.add(name="algorithm", datatype=sp.String, string_value=algorithm)
    return p.SerializeToString()


@pytest.mark.parametrize("algorithm", [None, "DEFLATE", "deflate", "GZIP", "raw-deflate"])
def test_a_compressed_payload_decodes_as_the_payload_inside(algorithm: str | None):
    import zlib

    d = SparkplugDecoder()
    raw = None
    if algorithm == "raw-deflate":
        def raw(b: bytes) -> bytes:
            c = zlib.compressobj(wbits=-15)
            return c.compress(b) + c.flush()
        algorithm = "DEFLATE"
    out = d.decode(NODE.format("NBIRTH"), _wrapped(nbirth(), algorithm, raw))
    assert [(v.signal, v.value) for v in out.values] == [("bdSeq", 7), ("Uptime", 5)]
    assert out.source_seq == 0 and out.source_time_ns == 1_700_000_000_000 * 10**6
    data = d.decode(NODE.format("NDATA"), _wrapped(payload(
        {"alias": 1, "int_value": 9}, seq=1), algorithm, raw))
    assert [(v.signal, v.value) for v in data.values] == [("Uptime", 9)]


@pytest.mark.parametrize(("body", "reason"), [
    ("bomb", "decompression_bomb"), ("BROTLI", "unknown_compression"),
    ("corrupt", "bad_compression"), ("truncated", "bad_compression"),
    ("nested", "nested_compression"), ("not_protobuf", "invalid_protobuf")])
def test_hostile_compressed_payloads_are_refused_by_name(body: str, reason: str):
    import zlib

    d = SparkplugDecoder(max_decompressed_bytes=4096)
    if body == "bomb":
        blob = _wrapped(b"\0" * 10_000, "DEFLATE")
    elif body == "BROTLI":
        blob = _wrapped(b"x", "BROTLI", compress=lambda b: b)
    elif body == "corrupt":
        blob = _wrapped(b"", "GZIP", compress=lambda b: b"\x1f\x8b\x08garbage")
    elif body == "truncated":
        blob = _wrapped(nbirth(), "DEFLATE", compress=lambda b: zlib.compress(b)[:-6])
    elif body == "nested":
        blob = _wrapped(_wrapped(nbirth(), "DEFLATE"), "DEFLATE")
    else:
        blob = _wrapped(b"\xff\xff\xff", "DEFLATE")
    with pytest.raises(DecodeError) as info:
        d.decode(NODE.format("NBIRTH"), blob)
    assert info.value.reason == reason
    assert d.nodes == {}


def test_unknown_edge_nodes_are_tracked_and_asked_to_rebirth_only_within_the_caps():
    clock = Clock()
    notices: list[tuple[str, dict[str, Any]]] = []
    d = SparkplugDecoder(max_edge_nodes=3, rebirth_max_per_s=1.0, clock=clock,
                         notice=lambda kind, f: notices.append((kind, f)))
    for i in range(50):  # a flood of DATA from nodes that were never born
        with pytest.raises(DecodeError):
            d.decode(f"spBv1.0/G/NDATA/Ghost{i}", payload({"alias": 1, "int_value": 1}, seq=1))
    assert len(d.nodes) == 3
    assert not [k for k, _ in notices if k == "rebirth_suppressed"], "none per message"
    assert len(d.take_requests()) == 3  # within the burst of 10; the rest are not tracked
    suppressed = [f for k, f in notices if k == "rebirth_suppressed"]
    assert suppressed == [{"reason": "max_edge_nodes", "count": 47}]  # one per commit group
    d2 = SparkplugDecoder(max_edge_nodes=1000, rebirth_max_per_s=1.0, clock=clock)
    for i in range(50):
        with pytest.raises(DecodeError):
            d2.decode(f"spBv1.0/G/NDATA/Ghost{i}", payload({"alias": 1, "int_value": 1}, seq=1))
    assert len(d2.take_requests()) == 10  # the burst, then at most 1 a second
    clock.t += 3
    with pytest.raises(DecodeError):
        d2.decode("spBv1.0/G/NDATA/Late", payload({"alias": 1, "int_value": 1}, seq=1))
    assert len(d2.take_requests()) == 1
    for i in range(3):
        d.decode(f"spBv1.0/G/NBIRTH/Ghost{i}", nbirth())
    with pytest.raises(DecodeError) as info:
        d.decode("spBv1.0/G/NBIRTH/OneTooMany", nbirth())
    assert info.value.reason == "too_many_edge_nodes"


def test_values_beyond_the_envelopes_int64_are_refused_not_wrapped():
    d = SparkplugDecoder()
    d.decode(NODE.format("NBIRTH"), payload(
        {"name": "bdSeq", "datatype": sp.Int64, "long_value": 1},
        {"name": "Count", "alias": 1, "datatype": sp.UInt64, "long_value": 2**63 - 1},
        {"name": "At", "alias": 2, "datatype": sp.DateTime, "long_value": 1}, seq=0))
    for alias, value, reason in [(1, 2**63, "bad_value"), (1, 2**64 - 1, "bad_value"),
                                 (2, 2**63, "bad_timestamp")]:
        with pytest.raises(DecodeError) as info:
            d.decode(NODE.format("NDATA"), payload({"alias": alias, "long_value": value},
                                                   seq=1))
        assert info.value.reason == reason


def test_only_payloads_with_seq_and_timestamp_count_as_stamped_by_the_publisher():
    d = SparkplugDecoder()
    assert d.stamped("t", payload(seq=3, ts=1_700_000_000_000))
    assert not d.stamped("t", payload(seq=3))
    assert not d.stamped("t", payload(ts=1))
    assert d.stamped("t", _wrapped(payload(seq=3, ts=5), "GZIP"))
    assert not d.stamped("t", b"\xff garbage")
    assert d.nodes == {}
