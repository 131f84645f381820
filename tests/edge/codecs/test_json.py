from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.edge.codecs.json import decode_json, parse_timestamp
from bridge.shared.errors import DecodeError

T = 1_700_000_000  # 2023-11-14T22:13:20Z


def test_an_object_with_value_is_one_reading_with_its_metadata():
    d = decode_json("plant/p1/flow", b'{"seq": 7, "ts": 1700000000123, "value": 4.5, '
                                      b'"unit": "m3/h", "quality": "good"}')
    assert d.source_seq == 7 and d.source_time_ns == 1_700_000_000_123_000_000
    (v,) = d.values
    assert (v.signal, v.value, v.unit, v.quality) == ("flow", 4.5, "m3/h", 1)


def test_values_lists_and_bare_scalars_are_accepted():
    d = decode_json("a/b", b'{"ts": 1700000000, "values": [{"name": "x", "value": true}, '
                           b'{"signal": "y", "value": "open"}, {"signal": "z", "value": 3}]}')
    assert [(v.signal, v.value) for v in d.values] == [("x", True), ("y", "open"), ("z", 3)]
    assert isinstance(d.values[2].value, int)
    assert decode_json("plant/p1/pressure", b"4.25").values[0].signal == "pressure"


@pytest.mark.parametrize(("ts", "ns"), [
    (T, T * 10**9), (T * 1000, T * 10**9), (T * 10**6, T * 10**9), (T * 10**9, T * 10**9),
    ("2023-11-14T22:13:20Z", T * 10**9), ("2023-11-14T23:13:20.5+01:00", T * 10**9 + 5 * 10**8),
])
def test_timestamps_in_every_documented_unit_mean_the_same_instant(ts: object, ns: int):
    assert parse_timestamp(ts) == ns


@pytest.mark.parametrize(("payload", "reason"), [
    (b"{nope", "invalid_json"), (b"\xff\xfe", "invalid_utf8"), (b'{"value": null}', "bad_value"),
    (b'{"value": [1]}', "bad_value"), (b"[1, 2]", "bad_shape"), (b"{}", "missing_value"),
    (b'{"value": 1, "ts": "yesterday"}', "bad_timestamp"),
    (b'{"value": 1, "ts": "2023-11-14T22:13:20"}', "bad_timestamp"),
    (b'{"value": 1, "quality": "great"}', "bad_quality"), (b'{"value": 1, "seq": -1}', "bad_seq"),
    (b'{"values": []}', "bad_values"), (b"null", "bad_shape"),
])
def test_bad_payloads_fail_with_a_specific_reason(payload: bytes, reason: str):
    with pytest.raises(DecodeError) as info:
        decode_json("t", payload)
    assert info.value.reason == reason


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_either_decode_or_raise_decode_error(payload: bytes):
    with contextlib.suppress(DecodeError):
        decode_json("plant/x", payload)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(["value", "values", "ts", "seq", "signal", "unit",
                                       "quality", "name", "timestamp"]), children, max_size=5),
    max_leaves=12)


@settings(max_examples=3000, deadline=None)
@given(json_values)
def test_arbitrary_json_documents_either_decode_or_raise_decode_error(doc: object):
    import orjson
    try:
        payload = orjson.dumps(doc)
    except TypeError:  # integers beyond 64 bits cannot be encoded
        return
    try:
        decoded = decode_json("plant/x", payload)
    except DecodeError:
        return
    for v in decoded.values:
        assert isinstance(v.value, bool | int | float | str)
    _fits_the_wire(decoded)


def _fits_the_wire(decoded) -> None:
    """Whatever the decoder accepted becomes an envelope: every value fits its wire type."""
    from bridge.edge.envelope import SourceInfo, prepare_envelope, seal
    from bridge.shared._pb import bridge_pb2 as pb
    env = prepare_envelope(site_id="s", source=SourceInfo(name="n", protocol="mqtt",
                                                                   broker="b"),
                           topic="plant/x", decoded=decoded, codec="json", gateway_time_ns=1,
                           clock_synced=True)
    assert pb.Envelope.FromString(seal(env, 1, 1)).seq == 1


@pytest.mark.parametrize(("ts", "ok"), [
    ("2262-04-11T23:47:16.854775Z", True), ("2262-04-11T23:47:16.854776Z", False),
    ("1677-09-21T00:12:43.145225Z", True), ("1677-09-21T00:12:43.145224Z", False),
    ("9999-12-31T23:59:59Z", False), ("0001-01-01T00:00:00+01:00", False),
    (9_223_372_036_854_775_807, True), (9_223_372_036_854_775_808, False),
    (1e300, False), (-1e300, False), ("", False)])
def test_timestamps_at_and_past_the_int64_nanosecond_range(ts: object, ok: bool):
    import orjson
    payload = orjson.dumps({"value": 1, "ts": ts}) if not isinstance(ts, int) or ts < 2**63 \
        else b'{"value": 1, "ts": %d}' % ts
    if ok:
        _fits_the_wire(decode_json("plant/x", payload))
        return
    with pytest.raises(DecodeError) as info:
        decode_json("plant/x", payload)
    assert info.value.reason == "bad_timestamp"


@settings(max_examples=500, deadline=None)
@given(st.integers(min_value=-(2**70), max_value=2**70))
def test_any_integer_value_either_fits_the_envelope_or_is_refused_by_name(n: int):
    try:
        decoded = decode_json("plant/x", b'{"value": %d, "seq": %d}' % (n, abs(n)))
    except DecodeError as exc:
        assert exc.reason in ("bad_value", "bad_seq", "invalid_json")
        assert not (-(2**63) <= n < 2**63) or abs(n) >= 2**64
        return
    _fits_the_wire(decoded)
