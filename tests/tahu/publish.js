// A Sparkplug B edge node built on Eclipse Tahu's own JavaScript client (npm sparkplug-client),
// the witness for tests/tahu/test_tahu.py: it publishes NBIRTH, a DBIRTH and N rounds of NDATA and
// DDATA, a third of each uncompressed, a third DEFLATE (Tahu's default) and a third GZIP, then
// prints one JSON line per published message (what the test expects back) and exits.
// Usage: node publish.js MQTT_PORT ROUNDS
"use strict";
const sparkplug = require("sparkplug-client");

const port = Number(process.argv[2]);
const rounds = Number(process.argv[3] || 30);
const t0 = 1767225600000; // 2026-01-01T00:00:00Z, in ms: payload timestamps are deterministic

const client = sparkplug.newClient({
  serverUrl: `tcp://127.0.0.1:${port}`, username: "", password: "", groupId: "Tahu",
  edgeNode: "Edge1", clientId: "tahu-witness", version: "spBv1.0", publishDeath: false,
});

function compression(i) {
  return [undefined, { compress: true }, { compress: true, algorithm: "GZIP" }][i % 3];
}

function node(i) {
  return [
    { name: "temp", type: "Double", value: 20 + i * 0.25 },
    { name: "count", type: "Int64", value: i * 1000 },
    { name: "ok", type: "Boolean", value: i % 2 === 0 },
    { name: "label", type: "String", value: `round-${i}` },
  ];
}

function device(i) {
  return [
    { name: "rpm", type: "Float", value: 1500.5 + i },
    { name: "level", type: "Int32", value: -i },
  ];
}

const out = [];
function record(type, dev, metrics, options) {
  out.push({ type, device: dev, compressed: options ? (options.algorithm || "DEFLATE") : null,
             metrics: metrics.map((m) => [m.name, m.value]) });
}

client.on("birth", () => {
  const birth = node(0);
  client.publishNodeBirth({ timestamp: t0, metrics: birth.slice() }, compression(1));
  record("NBIRTH", null, birth, compression(1));
  client.publishDeviceBirth("Pump1", { timestamp: t0, metrics: device(0) }, compression(2));
  record("DBIRTH", "Pump1", device(0), compression(2));
  for (let i = 1; i <= rounds; i++) {
    client.publishNodeData({ timestamp: t0 + i, metrics: node(i) }, compression(i));
    record("NDATA", null, node(i), compression(i));
    client.publishDeviceData("Pump1", { timestamp: t0 + i, metrics: device(i) },
                             compression(i + 1));
    record("DDATA", "Pump1", device(i), compression(i + 1));
  }
  client.client.end(false, {}, () => {
    for (const line of out) console.log(JSON.stringify(line));
    process.exit(0);
  });
});
client.on("error", (err) => { console.error(String(err)); process.exit(2); });
