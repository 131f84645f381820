"""The plant side encrypted and bound: mqtts with client certificates against a real mosquitto
TLS listener, amqps with client certificates, and the OT interface binding failing closed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from bridge.shared import pki
from bridge.shared.config import load_agent
from bridge.shared.errors import ConfigError
from devkit import localrun
from tests.conftest import Cluster, Publisher, idle, metric_value, wait_for

SECRET = "s3cr3t-plant-password"


class TlsBroker:
    """mosquitto with a plaintext listener (for the simulator) and a TLS one that requires a
    client certificate signed by the test CA (for the agent)."""

    def __init__(self, workdir: Path, pkis: localrun.Pki) -> None:
        self.plain, self.tls = localrun.free_port(), localrun.free_port()
        server = pkis.server()
        conf = workdir / "mosquitto-tls.conf"
        # user root: started as root, mosquitto would drop to `mosquitto` and then fail to
        # read the 0600 server key ("Unable to load server key file").
        conf.write_text(
            f"user root\nlistener {self.plain} 127.0.0.1\nallow_anonymous true\n"
            f"listener {self.tls} 127.0.0.1\ncafile {pkis.ca}\ncertfile {server.cert}\n"
            f"keyfile {server.key}\nrequire_certificate true\nuse_identity_as_username true\n"
            "persistence false\nmax_queued_messages 0\nlog_dest stderr\nlog_type error\n"
            "log_type warning\nlog_type notice\n")
        self.proc = localrun.Proc(name="mosquitto-tls", log=workdir / "mosquitto-tls.log",
                                  argv=["mosquitto", "-c", str(conf)]).start()
        localrun.wait_port(self.plain)
        localrun.wait_port(self.tls)
        self.mosquitto = localrun.Mosquitto(workdir, port=self.plain, proc=self.proc)


class Recorder:
    """A TCP relay that keeps every byte the client sent: what the plant network would see."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.sent = bytearray()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            up = socket.create_connection(("127.0.0.1", self.upstream))
            threading.Thread(target=self._relay, args=(client, up), daemon=True).start()

    def _relay(self, client: socket.socket, up: socket.socket) -> None:
        ways = [threading.Thread(target=self._pipe, args=(client, up, True), daemon=True),
                threading.Thread(target=self._pipe, args=(up, client, False), daemon=True)]
        for t in ways:
            t.start()
        for t in ways:
            t.join()
        client.close()  # both directions are done: nothing else holds them
        up.close()

    def _pipe(self, src: socket.socket, dst: socket.socket, record: bool) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if record:
                    self.sent.extend(data)
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._sock.close()


@pytest.fixture
def tls_broker(tmp_path: Path, pkis: localrun.Pki) -> Iterator[TlsBroker]:
    b = TlsBroker(tmp_path, pkis)
    yield b
    b.proc.stop()


def _plant_cert(pkis: localrun.Pki, out: Path) -> tuple[Path, Path]:
    issued = pki.issue_site(pkis.dir, out, site_id="plant-gw", force=True)
    assert issued.key_path is not None
    return issued.cert_path, issued.key_path


def _source(url: str, *, tls: str = "", extra: str = "") -> str:
    return (f'[[sources]]\nname = "plant"\nurl = "{url}"\ntopics = ["#"]\n'
            f'username = "bridge"\npassword = "{SECRET}"\n{extra}{tls}')


def test_mqtts_with_a_client_certificate_delivers_and_the_password_never_crosses_in_clear(
        tmp_path: Path, pkis: localrun.Pki, tls_broker: TlsBroker,
        monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("BRIDGE_ALLOW_INSECURE_PERMISSIONS", "1")  # the config holds a password
    cert, key = _plant_cert(pkis, tmp_path)
    wire = Recorder(tls_broker.tls)
    cluster = Cluster(tmp_path, pkis, tls_broker.mosquitto)
    try:
        cluster.ingest("aws")
        agent = cluster.agent(sources=_source(
            f"mqtts://127.0.0.1:{wire.port}",
            tls=f'[sources.tls]\nca = "{pkis.ca}"\ncert = "{cert}"\nkey = "{key}"\n'))
        published = Publisher(cluster, count=500, rate=0).join()
        wait_for(lambda: idle(agent, published), what="delivery over mqtts")
        assert cluster.account(published) == (published, 0, 0)
        assert agent.status()["sources"][0]["broker"] == f"mqtts://127.0.0.1:{wire.port}"
        assert metric_value(agent.metrics(), 'bridge_cert_expiry_seconds{cert="source:plant",'
                            'subject="plant-gw"}') > 86400
        assert len(wire.sent) > 1000 and SECRET.encode() not in wire.sent
        log = agent.proc.log.read_text()
        assert "source.cleartext_credentials" not in log
        broker_log = tls_broker.proc.log.read_text()
        assert "as plant-gw" in broker_log or "u'plant-gw'" in broker_log, broker_log[-2000:]

        # The control: the same relay in front of the plaintext listener sees the password,
        # and the agent says it is sending one in clear.
        agent.proc.stop()
        clear = Recorder(tls_broker.plain)
        agent = cluster.agent(sources=_source(f"mqtt://127.0.0.1:{clear.port}"))
        assert SECRET.encode() in clear.sent
        assert '"event":"source.cleartext_credentials"' in agent.proc.log.read_text()
        clear.close()
    finally:
        wire.close()
        cluster.stop()


def test_a_renewed_plant_certificate_is_used_at_the_next_connection_without_a_restart(
        tmp_path: Path, pkis: localrun.Pki, tls_broker: TlsBroker,
        monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("BRIDGE_ALLOW_INSECURE_PERMISSIONS", "1")
    cert, key = _plant_cert(pkis, tmp_path)
    cluster = Cluster(tmp_path, pkis, tls_broker.mosquitto)
    try:
        cluster.ingest("aws")
        agent = cluster.agent(sources=_source(
            f"mqtts://127.0.0.1:{tls_broker.tls}",
            tls=f'[sources.tls]\nca = "{pkis.ca}"\ncert = "{cert}"\nkey = "{key}"\n'))
        pid = agent.proc.pid
        renewal = tmp_path / "renewal"
        renewal.mkdir()
        # Another CN only so that the broker's log tells the two certificates apart.
        new = pki.issue_site(pkis.dir, renewal, site_id="plant-gw-2")
        assert new.key_path is not None
        os.replace(new.key_path, key)
        os.replace(new.cert_path, cert)
        tls_broker.proc.stop()  # the connection drops; the agent reconnects by itself
        tls_broker.proc.start()
        wait_for(lambda: "u'plant-gw-2'" in tls_broker.proc.log.read_text(), timeout=60,
                 what="a connection under the renewed certificate")
        wait_for(lambda: agent.status()["sources"][0]["subscribed"], what="resubscribed")
        assert agent.proc.pid == pid
        assert '"event":"source.tls_reloaded"' in agent.proc.log.read_text()
        published = Publisher(cluster, count=200, rate=0).join()
        wait_for(lambda: idle(agent, published), what="delivery after the renewal")
        assert cluster.account(published) == (published, 0, 0)
    finally:
        cluster.stop()


def test_mqtts_without_the_client_certificate_the_broker_requires_is_a_named_refusal(
        tmp_path: Path, pkis: localrun.Pki, tls_broker: TlsBroker,
        monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("BRIDGE_ALLOW_INSECURE_PERMISSIONS", "1")
    cluster = Cluster(tmp_path, pkis, tls_broker.mosquitto)
    try:
        cluster.ingest("aws")
        agent = cluster.agent(start=False, sources=_source(
            f"mqtts://127.0.0.1:{tls_broker.tls}", tls=f'[sources.tls]\nca = "{pkis.ca}"\n'))
        agent.start()

        def failures() -> list[dict]:
            return [orjson.loads(line) for line in agent.proc.log.read_text().splitlines()
                    if '"event":"source.connect_failed"' in line]

        wait_for(lambda: len(failures()) >= 2, timeout=30, what="refused connects, retried")
        assert agent.proc.alive()
        assert "Traceback" not in agent.proc.log.read_text()
        assert any("CERTIFICATE_REQUIRED" in f["reason"]
                   for f in failures()), failures()
        assert metric_value(agent.metrics(), "bridge_source_connection_failures_total"
                            '{kind="connect_failed",source="plant"}') >= 2
    finally:
        cluster.stop()


def test_a_source_bound_to_a_missing_interface_fails_closed_and_one_bound_to_lo_works(
        cluster: Cluster):
    cluster.ingest("aws")
    port = cluster.broker.port
    agent = cluster.agent(start=False, sources=(
        f'[[sources]]\nname = "ot"\nurl = "mqtt://127.0.0.1:{port}"\ntopics = ["#"]\n'
        'interface = "lo"\n'
        f'[[sources]]\nname = "gone"\nurl = "mqtt://127.0.0.1:{port}"\ntopics = ["x/#"]\n'
        'interface = "nosuchot0"\n'))
    agent.start()

    def subscribed() -> bool:
        with contextlib.suppress(OSError):
            return bool(agent.status()["sources"][0]["subscribed"])
        return False

    wait_for(subscribed, what="the lo-bound source")
    published = Publisher(cluster, count=200, rate=0).join()
    wait_for(lambda: idle(agent, published), what="delivery through the bound source")
    assert cluster.account(published) == (published, 0, 0)
    gone = [orjson.loads(line) for line in agent.proc.log.read_text().splitlines()
            if '"event":"source.connect_failed"' in line and '"gone"' in line]
    assert gone and "interface 'nosuchot0' does not exist" in gone[0]["reason"]
    assert gone[0]["interface"] == "nosuchot0"
    assert not agent.status()["sources"][1]["subscribed"]


def test_amqps_speaks_amqp_only_inside_tls_with_the_client_certificate(
        tmp_path: Path, pkis: localrun.Pki, monkeypatch: pytest.MonkeyPatch):
    """No RabbitMQ here has a TLS listener (and the shared one is not ours to reconfigure):
    a TLS server that requires the client certificate stands in for its listener and reads
    what the source sends first. The AMQP header, then PLAIN credentials, only after the
    handshake, under the certificate configured."""
    monkeypatch.setenv("BRIDGE_ALLOW_INSECURE_PERMISSIONS", "1")
    cert, key = _plant_cert(pkis, tmp_path)
    server = pkis.server()
    seen: list[tuple[bytes, str]] = []

    async def scenario() -> None:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pkis.ca))
        ctx.load_cert_chain(str(server.cert), str(server.key))
        ctx.verify_mode = ssl.CERT_REQUIRED
        got = asyncio.Event()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            peer = writer.get_extra_info("peercert") or {}
            cn = next((v for rdn in peer.get("subject", ()) for k, v in rdn
                       if k == "commonName"), "")
            with contextlib.suppress(Exception):
                seen.append((await asyncio.wait_for(reader.readexactly(8), 5), cn))
            writer.close()
            got.set()

        srv = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
        port = srv.sockets[0].getsockname()[1]
        cfg = tmp_path / "amqps.toml"
        cfg.write_text(
            'site_id = "site-a"\n'
            f'[tls]\nca = "{pkis.ca}"\ncert = "{pkis.site("site-a").cert}"\n'
            f'key = "{pkis.site("site-a").key}"\n[spool]\npath = "{tmp_path / "s.db"}"\n'
            f'[[sources]]\ntype = "amqp"\nurl = "amqps://bridge:{SECRET}@localhost:{port}/"\n'
            f'queue = "q"\n[sources.tls]\nca = "{pkis.ca}"\ncert = "{cert}"\nkey = "{key}"\n'
            '[uplink]\n[[uplink.endpoints]]\nname = "a"\ntarget = "127.0.0.1:1"\n')
        config = load_agent(cfg)
        from bridge.edge.sources.amqp import AmqpSource
        from bridge.shared.telemetry import AgentMetrics
        source = AmqpSource(config=config.sources[0], metrics=AgentMetrics())  # type: ignore[arg-type]
        assert source.info.broker == f"amqps://localhost:{port}"
        task = asyncio.create_task(source.run())
        await asyncio.wait_for(got.wait(), 20)
        await source.stop()
        await asyncio.wait_for(task, 20)
        srv.close()

    asyncio.run(scenario())
    assert seen and seen[0] == (b"AMQP\x00\x00\x09\x01", "plant-gw")


@pytest.mark.parametrize(("source", "key", "message"), [
    ('url = "mqtt://h"\n[sources.tls]\nca = "CA"\n', "sources[0].tls",
     "TLS is configured but the url is mqtt://; use mqtts://"),
    ('url = "mqtts://h"\n[sources.tls]\ncert = "CA"\n', "sources[0].tls.key",
     "cert and key go together"),
    ('url = "mqtts://h"\n[sources.tls]\nca = "nope.pem"\n', "sources[0].tls.ca",
     "no such file"),
])
def test_bad_plant_tls_settings_are_one_clear_error(tmp_path: Path, pkis: localrun.Pki,
                                                    source: str, key: str, message: str):
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        f'site_id = "s"\n[tls]\nca = "a"\ncert = "b"\nkey = "c"\n[spool]\npath = "x"\n'
        f'[[sources]]\ntopics = ["#"]\n{source.replace("CA", str(pkis.ca))}'
        '[uplink]\n[[uplink.endpoints]]\nname = "a"\ntarget = "h:1"\n')
    with pytest.raises(ConfigError) as err:
        load_agent(cfg)
    assert err.value.key == key and message in str(err.value)


def test_mqtts_defaults_to_port_8883(tmp_path: Path, pkis: localrun.Pki):
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        'site_id = "s"\n[tls]\nca = "a"\ncert = "b"\nkey = "c"\n[spool]\npath = "x"\n'
        '[[sources]]\ntopics = ["#"]\nurl = "mqtts://broker.plant"\n'
        '[uplink]\n[[uplink.endpoints]]\nname = "a"\ntarget = "h:1"\n')
    src = load_agent(cfg).sources[0]
    assert (src.port, src.url, src.tls is not None) == (8883, "mqtts://broker.plant:8883", True)
