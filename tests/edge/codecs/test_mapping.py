"""JSON mappings: topic captures and field paths to readings, from config alone."""

from __future__ import annotations

import contextlib
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.edge.codecs import JsonMapping
from bridge.edge.codecs.json import decode_json
from bridge.edge.codecs.mapping import MappedJson, compile_path
from bridge.shared.errors import DecodeError, MappingError

CORPUS = Path(__file__).parent / "corpus" / "json"
T_NS = 1_700_000_000 * 10**9


def mapped(*mappings: JsonMapping) -> MappedJson:
    return MappedJson(mappings=list(mappings), fallback=decode_json)


def test_topic_captures_become_labels_and_the_signal_capture_names_the_reading():
    m = mapped(JsonMapping(topic="plant/{asset}/{signal}", value="v", timestamp="t",
                           unit="u", quality="q"))
    out = m.decode("plant/pump-7/discharge_pressure",
                   b'{"v": 4.2, "t": 1700000000000, "u": "bar", "q": 192}')
    (v,) = out.values
    assert (v.signal, v.value, v.unit, v.quality, v.source_time_ns) == (
        "discharge_pressure", 4.2, "bar", 1, T_NS)
    assert out.labels == {"asset": "pump-7"}


def test_an_array_of_readings_in_one_message_shares_root_fields():
    m = mapped(JsonMapping(topic="site/+/batch", items="data.points", value="val",
                           signal="tag", timestamp="$.header.time",
                           timestamp_format="rfc3339", seq="$.header.n"))
    doc = {"header": {"time": "2023-11-14T22:13:20Z", "n": 41},
           "data": {"points": [{"tag": "FT-101", "val": 12}, {"tag": "LS-3", "val": True},
                               {"tag": "MODE", "val": "auto"}, {"tag": "FT-102", "val": None}]}}
    out = m.decode("site/a/batch", orjson.dumps(doc))
    assert [(v.signal, v.value) for v in out.values] == [
        ("FT-101", 12), ("LS-3", True), ("MODE", "auto"), ("FT-102", None)]
    assert {v.source_time_ns for v in out.values} == {T_NS}
    assert out.source_seq == 41


@pytest.mark.parametrize(("fmt", "raw", "ns"), [
    ("s", 1_700_000_000, T_NS), ("ms", 1_700_000_000_000, T_NS),
    ("us", 1_700_000_000_000_000, T_NS), ("ns", T_NS, T_NS),
    ("s", 1_700_000_000.5, T_NS + 5 * 10**8),
    ("auto", 1_700_000_000_000, T_NS), ("rfc3339", "2023-11-14T23:13:20+01:00", T_NS),
    ("s", 5, 5 * 10**9),  # an explicit unit is taken at its word, however small the number
])
def test_timestamps_in_every_supported_format(fmt: str, raw: object, ns: int):
    m = mapped(JsonMapping(topic="a/#", value="v", timestamp="t", timestamp_format=fmt))
    assert m.decode("a/b", orjson.dumps({"v": 1, "t": raw})).values[0].source_time_ns == ns


@pytest.mark.parametrize(("codes", "raw", "quality"), [
    ("opc_da", 192, 1), ("opc_da", 0x44, 2), ("opc_da", 0, 3), ("opc_ua", 0, 1),
    ("opc_ua", 0x40000000, 2), ("opc_ua", 0x80000000, 3), ("opc_da", "GOOD", 1),
    ("opc_da", "Uncertain", 2), ("opc_da", True, 1), ("opc_da", False, 3),
])
def test_quality_as_words_booleans_or_opc_codes(codes: str, raw: object, quality: int):
    m = mapped(JsonMapping(topic="q", value="v", quality="q", quality_codes=codes))
    assert m.decode("q", orjson.dumps({"v": 1, "q": raw})).values[0].quality == quality


def test_the_first_matching_mapping_wins_and_others_fall_back_to_the_codec():
    m = mapped(JsonMapping(topic="a/{signal}", value="x"), JsonMapping(topic="a/#", value="y"))
    assert m.decode("a/s", b'{"x": 1, "y": 2}').values[0].value == 1
    assert m.decode("a/s/t", b'{"x": 1, "y": 2}').values[0].value == 2
    assert m.decode("b/flow", b'{"value": 3}').values[0].signal == "flow"  # the json codec


def test_amqp_routing_keys_use_dots_as_levels():
    m = mapped(JsonMapping(topic="plant.{asset}.{signal}", value="v", separator="."))
    out = m.decode("plant.pump1.flow", b'{"v": 1}')
    assert out.labels == {"asset": "pump1"} and out.values[0].signal == "flow"


def test_hash_matches_the_parent_level_too_as_in_mqtt():
    m = mapped(JsonMapping(topic="a/#", value="v"))
    assert m.decode("a", b'{"v": 1}').values[0].value == 1


@pytest.mark.parametrize(("mapping", "payload", "reason"), [
    ({"value": "v"}, b'{"w": 1}', "missing_value"),
    ({"value": "v"}, b'{"v": {"x": 1}}', "bad_value"),
    ({"value": "v"}, b"{oops", "invalid_json"),
    ({"value": "v"}, b'{"v": "\xff"}', "invalid_utf8"),
    ({"value": "v", "items": "list"}, b'{"list": 5}', "bad_items"),
    ({"value": "v", "items": "list"}, b'{"other": []}', "missing_items"),
    ({"value": "v", "signal": "n"}, b'{"v": 1, "n": 5}', "bad_signal"),
    ({"value": "v", "unit": "u"}, b'{"v": 1, "u": 5}', "bad_unit"),
    ({"value": "v", "quality": "q"}, b'{"v": 1, "q": "fine"}', "bad_quality"),
    ({"value": "v", "timestamp": "t"}, b'{"v": 1, "t": "today"}', "bad_timestamp"),
    ({"value": "v", "timestamp": "t", "timestamp_format": "ms"}, b'{"v": 1, "t": "1"}',
     "bad_timestamp"),
    ({"value": "v", "timestamp": "t", "timestamp_format": "s"}, b'{"v": 1, "t": 1e300}',
     "bad_timestamp"),
    ({"value": "v", "seq": "s"}, b'{"v": 1, "s": -4}', "bad_seq"),
    ({"value": "a[3]"}, b'{"a": [1]}', "missing_value"),
])
def test_payloads_that_do_not_fit_the_mapping_fail_with_a_specific_reason(
        mapping: dict[str, str], payload: bytes, reason: str):
    m = mapped(JsonMapping(topic="t", **mapping))
    with pytest.raises(DecodeError) as info:
        m.decode("t", payload)
    assert info.value.reason == reason


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"topic": "a/#/b"}, "'#' must be the last level"),
    ({"topic": "a/{x}/{x}"}, "appears twice"),
    ({"topic": "a/pre{x}"}, "mixes text and a wildcard"),
    ({"value": "a..b"}, "cannot read path"),
    ({"value": "a."}, "ends with '.'"),
    ({"value": ""}, "empty path"),
    ({"timestamp_format": "minutes"}, "timestamp_format"),
    ({"quality_codes": "modbus"}, "quality_codes"),
])
def test_malformed_mappings_are_refused_with_the_field_named(kwargs: dict[str, str],
                                                            message: str):
    args = {"topic": "a/b", "value": "v"} | kwargs
    with pytest.raises(MappingError, match=message):
        JsonMapping(where="sources[0].mappings[0]", **args)


def test_paths_read_keys_and_indexes():
    assert compile_path("$.a.b[2][0].c", "f") == (True, ("a", "b", 2, 0, "c"))
    assert compile_path("$", "f") == (True, ())
    assert compile_path("x", "f") == (False, ("x",))


def test_the_real_shaped_corpus_decodes_as_recorded():
    """Site JSON shapes seen in the field, one mapping each (see corpus/json/*.toml)."""
    import tomllib
    checked = 0
    for case in sorted(CORPUS.glob("*.toml")):
        spec = tomllib.loads(case.read_text())
        m = mapped(JsonMapping(**spec["mapping"]))
        out = m.decode(spec["topic"], case.with_suffix(".json").read_bytes())
        got = [[v.signal, v.value, v.unit, v.quality, v.source_time_ns] for v in out.values]
        assert got == spec["expect"]["values"], case.name
        assert out.labels == spec["expect"].get("labels", {}), case.name
        checked += 1
    assert checked >= 4


json_docs = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(["v", "t", "q", "u", "n", "items", "tag", "hdr"]),
                      children, max_size=5),
    max_leaves=15)
MAPPINGS = [
    JsonMapping(topic="a/{asset}/{signal}", value="v", timestamp="t", quality="q", unit="u"),
    JsonMapping(topic="b/#", items="items", value="v", signal="tag", timestamp="$.hdr.t",
                timestamp_format="ms", seq="$.n", quality="q", quality_codes="opc_ua"),
    JsonMapping(topic="c/+", items="$", value="v[0]", timestamp="t", timestamp_format="rfc3339"),
]


@settings(max_examples=3000, deadline=None)
@given(st.sampled_from(["a/x/y", "b/z", "c/q", "d"]), json_docs)
def test_arbitrary_documents_either_decode_or_raise_decode_error(topic: str, doc: object):
    try:
        payload = orjson.dumps(doc)
    except TypeError:  # integers beyond 64 bits cannot be encoded
        return
    with contextlib.suppress(DecodeError):
        out = mapped(*MAPPINGS).decode(topic, payload)
        for v in out.values:
            assert v.value is None or isinstance(v.value, bool | int | float | str)


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_either_decode_or_raise_decode_error(payload: bytes):
    with contextlib.suppress(DecodeError):
        mapped(*MAPPINGS).decode("b/z", payload)
