// Read a cloud's readings straight from JetStream with Node.js (docs/consuming.md).
//
// Nothing of the bridge's code: the npm NATS client (@nats-io/transport-node and
// @nats-io/jetstream) and protobufjs loading the bridge's published schema at run time.
// Prints one JSON line per reading, oldest first, the same lines as read_jetstream.py, and
// exits when it has read everything stored (or, with --follow, keeps going).
//
//   npm install @nats-io/transport-node@3.4.0 @nats-io/jetstream@3.4.0 protobufjs@8.8.1 long@5.3.2
//   node read_jetstream.mjs nats://nats-0:4222 --proto protos/bridge/v1/bridge.proto \
//       [--subject 'bridge.r.substation-7.>'] [--stream BRIDGE] [--follow] \
//       [--ca ca.crt --cert reader.crt --key reader.key]
//
// Run it from the directory where those packages are installed (Node resolves an ES module's
// imports from the script's own directory upwards).
//
// The traps this example avoids, each one silent:
// * 64-bit fields. epoch is a random fixed64 (up to 2^63-1), seq, last_seq, count and
//   source_seq are uint64, the times int64 nanoseconds: all exceed 2^53, so never turn them
//   into a Number. protobufjs decodes them as Long objects; toObject({longs: String}) gives
//   exact decimal strings, which become BigInt here.
// * Field names. protobufjs renames fields to camelCase unless the schema is loaded with
//   keepCase: true, which keeps the schema's (and this page's) snake_case names.
// * Presence. source_time_ns, source_seq and Value.source_time_ns are `optional`: absent is
//   not 0. toObject({defaults: false}) omits an absent field, so `in` tests presence.
// * Reading to the end. An ordered consumer with the client's default start (everything);
//   "read everything" is a message whose info.pending is 0, or a stream that holds nothing
//   on the subject when the read starts.
// * A lost first pull. Just after the consumer is made, a pull can reach a server that does
//   not yet know it (the cluster routes its interest a moment later); the client notices
//   only when two idle heartbeats are missed, and heartbeats follow `expires` (default 30 s,
//   so a 30 s stall now and then). With expires 5 s a lost pull costs about 8 s.

import { parseArgs } from "node:util";
import { connect } from "@nats-io/transport-node";
import { jetstream, jetstreamManager } from "@nats-io/jetstream";
import protobuf from "protobufjs";

const { values: opt, positionals: servers } = parseArgs({
  allowPositionals: true,
  options: {
    proto: { type: "string", default: "protos/bridge/v1/bridge.proto" },
    subject: { type: "string", default: "bridge.r.>" },
    stream: { type: "string", default: "BRIDGE" },
    follow: { type: "boolean", default: false },
    ca: { type: "string" },
    cert: { type: "string" },
    key: { type: "string" },
  },
});
if (servers.length === 0) {
  console.error("usage: node read_jetstream.mjs SERVER... [--proto FILE] [--subject S]");
  process.exit(2);
}

const root = new protobuf.Root();
root.loadSync(opt.proto, { keepCase: true });
const Envelope = root.lookupType("bridge.v1.Envelope");
const AS_OBJECT = { longs: String, enums: String, bytes: String, defaults: false, oneofs: true };

// JSON.stringify cannot write a BigInt; write it as a plain JSON number, exactly.
function toJson(value) {
  return JSON.stringify(value, (_, v) => (typeof v === "bigint" ? `@@big:${v}@@` : v))
    .replace(/"@@big:(-?\d+)@@"/g, "$1");
}

const big = (s) => (s === undefined ? null : BigInt(s));

function reading(msg) {
  const env = Envelope.toObject(Envelope.decode(msg.data), AS_OBJECT);
  const epoch = BigInt(env.epoch ?? 0).toString(16).padStart(16, "0");
  const header = msg.headers?.get("Bridge-Epoch");
  if (header !== epoch) throw new Error(`Bridge-Epoch ${header} but the envelope says ${epoch}`);
  const values = {};
  for (const v of env.values ?? []) {
    const kind = v.kind; // the oneof's set member, or undefined (a null value)
    values[v.signal] = kind === undefined ? null : kind === "integer" ? BigInt(v.integer) : v[kind];
  }
  const out = {
    site: msg.headers.get("Bridge-Site"),
    epoch,
    seq: BigInt(env.seq),
    stream_seq: msg.info.streamSequence,
    topic: env.source?.topic ?? "",
    source_time_ns: big(env.source_time_ns), // null when the payload had no timestamp
    gateway_time_ns: BigInt(env.gateway_time_ns ?? 0),
    source_seq: big(env.source_seq),
    values,
  };
  if ("dropped" in env) { // a tombstone: seq..last_seq (inclusive) were dropped at the site
    out.dropped = { last_seq: BigInt(env.dropped.last_seq ?? 0), reason: env.dropped.reason ?? "" };
  }
  return out;
}

let tls;
if (opt.ca || opt.cert) {
  tls = { caFile: opt.ca, certFile: opt.cert, keyFile: opt.key };
}
const nc = await connect({ servers, tls });
try {
  const jsm = await jetstreamManager(nc);
  const info = await jsm.streams.info(opt.stream, { subjects_filter: opt.subject });
  const stored = Object.values(info.state.subjects ?? {}).reduce((a, b) => a + b, 0);
  if (stored > 0 || opt.follow) {
    const consumer = await jetstream(nc).consumers.get(opt.stream, {
      filter_subjects: [opt.subject],
    });
    for await (const msg of await consumer.consume({ expires: 5000 })) {
      console.log(toJson(reading(msg)));
      if (!opt.follow && msg.info.pending === 0) break;
    }
  }
} finally {
  await nc.close();
}
