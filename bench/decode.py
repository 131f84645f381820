"""What one Sparkplug DDATA of 50 metrics costs the agent, stage by stage, in one process.

``python -m bench.decode [--n N]`` times (``timeit``, microseconds per message) the protobuf
parse alone, ``SparkplugDecoder.decode`` (parse, aliases, typing), the wire-range check, the
envelope built from the decoded values and its serialisation with an identity: the agent's
own functions on a message like the bench's simulators publish (aliases after a birth,
doubles and ints, a timestamp per metric). The figure a change to the per-metric path is
measured by, back to back with the commit before it.

``envelope parse`` is protobuf's C runtime reading back the sealed envelope: with ``parse
only`` and ``seal``, the order of what a decoder that never made a Python object per metric
would still cost (the floor a native decoder could approach; docs/performance.md).
"""

from __future__ import annotations

import argparse
import timeit

from bridge.edge.codecs.sparkplug import SparkplugDecoder
from bridge.edge.envelope import SourceInfo, _check_wire, _fill, seal
from bridge.shared._pb import bridge_pb2 as pb
from bridge.shared._pb import sparkplug_b_pb2 as sp

METRICS = 50
TOPIC = "spBv1.0/g/DDATA/n/dev"


def _payload(seq: int, *, birth: bool) -> bytes:
    p = sp.Payload(timestamp=1_765_000_000_000, seq=seq)
    for i in range(METRICS):
        m = p.metrics.add(alias=i, timestamp=1_765_000_000_000,
                          datatype=sp.Double if i % 3 else sp.Int32)
        if birth:
            m.name = f"metric-{i:03d}"
        if i % 3:
            m.double_value = i * 1.5
        else:
            m.int_value = i
    return p.SerializeToString()


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.decode")
    ap.add_argument("--n", type=int, default=2000, help="messages per stage")
    n = ap.parse_args().n
    d = SparkplugDecoder(rebirth=False)
    birth = sp.Payload(timestamp=1_765_000_000_000, seq=0)
    birth.metrics.add(name="bdSeq", datatype=sp.Int64, long_value=0)
    d.decode("spBv1.0/g/NBIRTH/n", birth.SerializeToString())
    d.decode("spBv1.0/g/DBIRTH/n/dev", _payload(1, birth=True))
    data = _payload(2, birth=False)
    node = d.nodes[("g", "n")]

    def decode() -> object:
        node.last_seq = 1  # every run is the next message in sequence
        return d.decode(TOPIC, data)

    decoded = d.decode(TOPIC, data)
    info = SourceInfo(name="plant", protocol="mqtt", broker="mqtt://127.0.0.1")

    def fill() -> object:
        return _fill(site_id="s", source=info, topic=TOPIC, decoded=decoded,
                     codec="sparkplug", gateway_time_ns=1, clock_synced=True)

    env = fill()
    sealed = seal(env, 1, 5)  # type: ignore[arg-type]
    stages = {"parse only": lambda: sp.Payload.FromString(data), "decode": decode,
              "check_wire": lambda: _check_wire(decoded), "envelope": fill,
              "seal": lambda: seal(env, 1, 5),  # type: ignore[arg-type]
              "envelope parse": lambda: pb.Envelope.FromString(sealed)}
    for name, fn in stages.items():
        print(f"{name:<15} {timeit.timeit(fn, number=n) / n * 1e6:7.1f} us/message")


if __name__ == "__main__":
    main()
