"""Read a cloud's readings straight from JetStream with a plain NATS client (docs/consuming.md).

Nothing of the bridge's code: only nats-py and the protobuf module generated from the bridge's
published schema (`protoc -I protos/bridge/v1 --python_out=. protos/bridge/v1/bridge.proto`
gives `bridge_pb2.py`). Prints one JSON line per reading, oldest first, and exits when it has
read everything stored (or, with --follow, keeps going).

    python read_jetstream.py nats://nats-0:4222 [--subject 'bridge.r.substation-7.>'] [--follow]

A cluster deployed from deploy/kubernetes requires TLS and a client certificate: give the
reader user's (CN=nats-reader,OU=bridge-nats) with --ca, --cert and --key and tls:// servers.
"""

import argparse
import asyncio
import json
import ssl
from typing import Any

import bridge_pb2  # generated from the schema, see above
import nats
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy


def reading(msg: Msg) -> dict[str, Any]:
    """One reading as a JSON-ready dict: the same line as read_jetstream.mjs prints."""
    env = bridge_pb2.Envelope.FromString(msg.data)
    headers = msg.headers or {}
    epoch = f"{env.epoch:016x}"  # a fixed64: as the subject and Bridge-Epoch write it
    if headers.get("Bridge-Epoch") != epoch:
        raise ValueError(f"Bridge-Epoch {headers.get('Bridge-Epoch')} but the envelope "
                         f"says {epoch}")
    out: dict[str, Any] = {
        "site": headers["Bridge-Site"], "epoch": epoch, "seq": env.seq,
        "stream_seq": msg.metadata.sequence.stream, "topic": env.source.topic,
        # optional fields: absent is not 0 (HasField tells)
        "source_time_ns": env.source_time_ns if env.HasField("source_time_ns") else None,
        "gateway_time_ns": env.gateway_time_ns,
        "source_seq": env.source_seq if env.HasField("source_seq") else None,
        "values": {v.signal: getattr(v, v.WhichOneof("kind")) if v.WhichOneof("kind")
                   else None for v in env.values}}
    if env.HasField("dropped"):  # a tombstone: seq..last_seq (inclusive) were dropped
        out["dropped"] = {"last_seq": env.dropped.last_seq, "reason": env.dropped.reason}
    return out


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("servers", nargs="+")
    ap.add_argument("--subject", default="bridge.r.>")
    ap.add_argument("--follow", action="store_true")
    ap.add_argument("--ca", help="the cluster's CA (tls:// servers)")
    ap.add_argument("--cert", help="a client certificate: the reader user's")
    ap.add_argument("--key", help="its private key")
    args = ap.parse_args()
    tls = None
    if args.ca or args.cert:
        tls = ssl.create_default_context(cafile=args.ca)
        if args.cert:
            tls.load_cert_chain(args.cert, args.key)
    nc = await nats.connect(servers=args.servers, tls=tls)
    js = nc.jetstream()
    sub = await js.subscribe(args.subject, ordered_consumer=True,
                             config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL))
    while True:
        try:
            msg = await sub.next_msg(timeout=5)
        except nats.errors.TimeoutError:
            if args.follow:
                continue
            break
        print(json.dumps(reading(msg)), flush=True)
        if not args.follow and msg.metadata.num_pending == 0:
            break
    await nc.close()


if __name__ == "__main__":
    asyncio.run(main())
