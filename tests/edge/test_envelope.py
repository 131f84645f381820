"""Building an envelope (bridge.edge.envelope): every decoded value lands in its own typed field,
with exactly the optional fields it had, whatever the mix."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.edge.codecs import Decoded, DecodedValue
from bridge.edge.envelope import SourceInfo, encode_batch, prepare_envelope
from bridge.shared._pb import bridge_pb2 as pb

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1),
                    st.floats(allow_nan=False), st.text(max_size=20))
VALUES = st.builds(DecodedValue, signal=st.text(min_size=1, max_size=20), value=SCALARS,
                   unit=st.sampled_from(["", "V", "unix_ms"]),
                   quality=st.sampled_from([0, 1, 2]),
                   source_time_ns=st.none() | st.integers(-(2**63), 2**63 - 1),
                   historical=st.booleans())
KIND = {bool: "boolean", int: "integer", float: "number", str: "text"}


@given(values=st.lists(VALUES, max_size=30))
def test_every_value_keeps_its_type_and_exactly_its_optional_fields(
        values: list[DecodedValue]) -> None:
    env = prepare_envelope(site_id="s", source=SourceInfo(
        name="plant", protocol="mqtt", broker="mqtt://x"), topic="t", decoded=Decoded(
        values=values), codec="json", gateway_time_ns=1, clock_synced=True)
    env = pb.Envelope.FromString(env.SerializeToString())  # as a consumer reads it
    assert len(env.values) == len(values)
    for v, dv in zip(env.values, values, strict=True):
        assert (v.signal, v.unit, v.quality, v.historical) == \
            (dv.signal, dv.unit, dv.quality, dv.historical)
        if dv.value is None:
            assert v.is_null and v.WhichOneof("kind") is None
        else:
            assert not v.is_null and v.WhichOneof("kind") == KIND[type(dv.value)]
            assert getattr(v, KIND[type(dv.value)]) == dv.value
        assert v.HasField("source_time_ns") == (dv.source_time_ns is not None)
        if dv.source_time_ns is not None:
            assert v.source_time_ns == dv.source_time_ns


@pytest.mark.parametrize("backlog", [0, 1, 1250, 2**63, 2**64 - 1])
def test_a_batch_encoded_without_reparsing_is_the_bytes_protobuf_writes(backlog: int):
    envs = [pb.Envelope(site_id="s", epoch=2**64 - 1, seq=k).SerializeToString()
            for k in (1, 2**64 - 1)] + [b""]
    blob = encode_batch("b-1", envs, backlog)
    want = pb.Batch(batch_id="b-1", envelopes=[pb.Envelope.FromString(e) for e in envs],
                    backlog_readings=backlog)
    assert blob == want.SerializeToString()
    assert pb.Batch.FromString(blob).backlog_readings == backlog
