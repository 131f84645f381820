"""Writes the Sparkplug corpus: messages shaped like Ignition/Tahu edge nodes publish them.

Run ``python tests/edge/codecs/corpus/make_sparkplug.py`` to regenerate. Each ``NN__<topic>.bin``
(``~`` stands for ``/``) comes with ``.expect``: what the decoder must make of it, written here
by hand, in order (the decoder keeps state from one file to the next).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[4]))

from bridge.shared._pb import sparkplug_b_pb2 as sp

OUT = Path(__file__).parent / "sparkplug"
T = 1_700_000_000_000


def msg(seq: int | None, *metrics: sp.Payload.Metric) -> bytes:
    p = sp.Payload(timestamp=T)
    if seq is not None:
        p.seq = seq
    p.metrics.extend(metrics)
    return p.SerializeToString()


def m(**kw: object) -> sp.Payload.Metric:
    return sp.Payload.Metric(**kw)  # type: ignore[arg-type]


def props(**kv: str) -> sp.Payload.PropertySet:
    return sp.Payload.PropertySet(keys=list(kv), values=[
        sp.Payload.PropertyValue(type=sp.String, string_value=v) for v in kv.values()])


def main() -> None:
    node = "spBv1.0/Water Works/{}/Edge-01"
    dev = node + "/Pump 3"
    template = sp.Payload.Template(version="1", template_ref="Motor", metrics=[
        m(name="Amps", datatype=sp.Float, float_value=12.5)])
    cases = [
        (node.format("NBIRTH"), msg(
            0, m(name="bdSeq", datatype=sp.Int64, long_value=3, timestamp=T),
            m(name="Node Control/Rebirth", alias=0, datatype=sp.Boolean, boolean_value=False),
            m(name="Node Control/Next Server", alias=1, datatype=sp.Boolean,
              boolean_value=False),
            m(name="Properties/Hardware Make", alias=2, datatype=sp.String,
              string_value="Opto 22"),
            m(name="Inputs/Supply Pressure", alias=3, datatype=sp.Float, float_value=4.2,
              properties=props(engUnit="bar"))), "ok 5"),
        (dev.format("DBIRTH"), msg(
            1, m(name="Status/Running", alias=10, datatype=sp.Boolean, boolean_value=True),
            m(name="Outputs/Speed Setpoint", alias=11, datatype=sp.Int16, int_value=0xFFFFFC18),
            m(name="Inputs/Flow", alias=12, datatype=sp.Double, double_value=418.25),
            m(name="Inputs/Run Hours", alias=13, datatype=sp.UInt32, int_value=81234),
            m(name="Motor", alias=14, datatype=sp.Template, template_value=template),
            m(name="Inputs/Fault Text", alias=15, datatype=sp.String, is_null=True)), "ok 5"),
        (dev.format("DDATA"), msg(2, m(alias=12, timestamp=T + 1000, double_value=420.5),
                                  m(alias=13, timestamp=T + 1000, int_value=81235)), "ok 2"),
        (dev.format("DDATA"), msg(3, m(alias=77, double_value=1.0)), "error unknown_alias"),
        (node.format("NDATA"), msg(9, m(alias=3, float_value=4.25)), "ok 1"),
        ((node + "/Pump 4").format("DDATA"), msg(10, m(alias=12, double_value=1.0)),
         "error data_before_birth"),
        ("spBv1.0/STATE/scada-primary", b'{"online":true,"timestamp":1700000000000}',
         "skip host_state"),
        (dev.format("DDATA"), msg(11, m(alias=12, double_value=9.0))[:-4],
         "error invalid_protobuf"),
        (node.format("NDEATH"), msg(None, m(name="bdSeq", datatype=sp.Int64, long_value=2)),
         "skip stale_death"),
        (node.format("NDEATH"), msg(None, m(name="bdSeq", datatype=sp.Int64, long_value=3)),
         "ok 0"),
        (dev.format("DDATA"), msg(12, m(alias=12, double_value=2.0)),
         "error data_before_birth"),
    ]
    OUT.mkdir(exist_ok=True)
    for old in OUT.glob("*"):
        old.unlink()
    for i, (topic, data, expect) in enumerate(cases, 1):
        stem = f"{i:02d}__{topic.replace('/', '~')}"
        (OUT / f"{stem}.bin").write_bytes(data)
        (OUT / f"{stem}.expect").write_text(expect + "\n")


if __name__ == "__main__":
    main()
