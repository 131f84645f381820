"""User mistakes: one clear line naming file and key, exit status 2, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from devkit import localrun

GOOD_AGENT = """
site_id = "site-a"
[tls]
ca = "{ca}"
cert = "{cert}"
key = "{key}"
[spool]
path = "spool.db"
[[sources]]
url = "mqtt://127.0.0.1:1883"
topics = ["#"]
[uplink]
[[uplink.endpoints]]
name = "aws"
target = "127.0.0.1:6443"
"""


def run_bridge(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bridge", *args], capture_output=True,
                          text=True, timeout=60, check=False)


def agent_config(tmp_path: Path, pkis: localrun.Pki, text: str = GOOD_AGENT) -> Path:
    tls = pkis.site("site-a")
    path = tmp_path / "agent.toml"
    path.write_text(text.format(ca=tls.ca, cert=tls.cert, key=tls.key))
    return path


def test_a_good_agent_config_passes_check(tmp_path: Path, pkis: localrun.Pki):
    res = run_bridge("agent", "--config", str(agent_config(tmp_path, pkis)), "--check")
    assert res.returncode == 0, res.stderr
    assert "OK" in res.stdout


@pytest.mark.parametrize(("change", "key", "message"), [
    (('target = "127.0.0.1:6443"', 'target = "not a target"'), "uplink.endpoints[0].target",
     "host:port"),
    (('topics = ["#"]', "topics = []"), "sources[0].topics", "at least one"),
    (('path = "spool.db"', 'path = "spool.db"\nmax_bytes = "big"'), "spool.max_bytes",
     "expected an integer"),
    (('site_id = "site-a"', 'site_id = "Site A"'), "site_id", "DNS-style"),
    (("[uplink]", "[uplink]\nmax_in_flght = 3"), "uplink.max_in_flght", "unknown key"),
    (('name = "aws"\ntarget = "127.0.0.1:6443"',
      'name = "aws"\ntarget = "127.0.0.1:6443"\n[[uplink.endpoints]]\nname = "aws"\n'
      'target = "127.0.0.1:7443"'), "uplink.endpoints[1].name", "duplicate"),
    (("[[uplink.endpoints]]\nname = \"aws\"\ntarget = \"127.0.0.1:6443\"\n", ""),
     "uplink.endpoints", "at least one"),
    (('url = "mqtt://127.0.0.1:1883"', 'url = "amqp://x"'), "sources[0].url", "mqtt://"),
    (('url = "mqtt://127.0.0.1:1883"\ntopics = ["#"]',
      'type = "amqp"\nurl = "mqtt://x"\nqueue = "q"'), "sources[0].url", "amqp://"),
    (('url = "mqtt://127.0.0.1:1883"', 'type = "amqp"\nurl = "amqp://h/"\nqueue = "q"'),
     "sources[0].topics", "unknown key"),  # an MQTT key on an AMQP source
    (('url = "mqtt://127.0.0.1:1883"\ntopics = ["#"]', 'type = "amqp"\nurl = "amqp://h/"'),
     "sources[0].queue", "required key is missing"),
    (('url = "mqtt://127.0.0.1:1883"\ntopics = ["#"]',
      'type = "amqp"\nurl = "amqp://h/"\nqueue = "q"\nbindings = ["a.#"]'),
     "sources[0].bindings", "needs an exchange"),
    (('topics = ["#"]', 'topics = ["#"]\ncodec = "xml"'), "sources[0].codec", "must be one of"),
    (('topics = ["#"]', 'topics = ["#"]\n[[sources.mappings]]\ntopic = "a/{{x}}"\nvalue = "a..b"'),
     "sources[0].mappings[0].value", "cannot read path"),
    (('topics = ["#"]', 'topics = ["#"]\n[[sources.mappings]]\ntopic = "a/#/b"\nvalue = "v"'),
     "sources[0].mappings[0].topic", "must be the last level"),
    (('topics = ["#"]', 'topics = ["#"]\n[[sources.mappings]]\ntopic = "a"\nvalue = "v"\n'
      'timestmap = "t"'), "sources[0].mappings[0].timestmap", "unknown key"),
    (('topics = ["#"]', 'topics = ["#"]\n[sources.sparkplug]\nhost_id = "h"'),
     "sources[0].sparkplug", "applies only to codec"),
    (('topics = ["#"]', 'codec = "sparkplug"\n[sources.sparkplug]\nhost_id = "a/b"'),
     "sources[0].sparkplug.host_id", "must not contain"),
    (('topics = ["#"]', 'topics = ["#"]\nmax_payload_bytes = 10'),
     "sources[0].max_payload_bytes", "must be >= 64"),
])
def test_config_errors_name_the_file_and_key_path_and_exit_2(
        tmp_path: Path, pkis: localrun.Pki, change: tuple[str, str], key: str, message: str):
    text = GOOD_AGENT.replace(*change)
    assert text != GOOD_AGENT
    path = agent_config(tmp_path, pkis, text)
    res = run_bridge("agent", "--config", str(path))
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert res.stderr.startswith(f"error: {path}: {key}: "), res.stderr
    assert message in res.stderr


def test_invalid_toml_and_missing_files_are_clear_errors(tmp_path: Path, pkis: localrun.Pki):
    bad = tmp_path / "bad.toml"
    bad.write_text("site_id = [")
    res = run_bridge("agent", "--config", str(bad))
    assert res.returncode == 2 and "invalid TOML" in res.stderr and "Traceback" not in res.stderr
    res = run_bridge("agent", "--config", str(tmp_path / "nope.toml"))
    assert res.returncode == 2 and "file not found" in res.stderr
    text = GOOD_AGENT.replace('cert = "{cert}"', f'cert = "{tmp_path / "missing.pem"}"')
    res = run_bridge("agent", "--config", str(agent_config(tmp_path, pkis, text)), "--check")
    assert res.returncode == 2 and "tls.cert" in res.stderr and "missing.pem" in res.stderr


def test_pki_commands_print_subject_and_expiry_and_refuse_to_overwrite(tmp_path: Path):
    ca = tmp_path / "ca"
    res = run_bridge("pki", "ca", "--dir", str(ca))
    assert res.returncode == 0 and "expires" in res.stdout and "CN=bridge CA" in res.stdout
    res = run_bridge("pki", "site", "--dir", str(ca), "--site", "plant-3")
    assert res.returncode == 0 and "CN=plant-3" in res.stdout
    res = run_bridge("pki", "site", "--dir", str(ca), "--site", "plant-3")
    assert res.returncode == 2 and "--force" in res.stderr and "Traceback" not in res.stderr


def test_consume_without_a_certificate_is_a_usage_error():
    res = run_bridge("consume", "--from", "127.0.0.1:6443")
    assert res.returncode == 2 and "consumer certificate" in res.stderr


def test_the_example_configs_in_the_docs_parse(monkeypatch: pytest.MonkeyPatch):
    from bridge.shared.config import load_agent, load_consumer, load_ingest
    from bridge.shared.errors import ConfigError
    from bridge.shared.files import INSECURE_ENV

    (Path(__file__).resolve().parent.parent / "examples" / "agent-amqp.toml").chmod(0o644)

    examples = Path(__file__).resolve().parent.parent / "examples"
    agent = load_agent(examples / "agent.toml")
    assert [e.name for e in agent.uplink.endpoints] == ["aws", "azure", "gcp"]
    assert load_ingest(examples / "ingest.toml").listen == "0.0.0.0:6443"
    assert load_ingest(examples / "ingest-jetstream.toml").health_listen == "0.0.0.0:8086"
    assert len(load_consumer(examples / "consumer.toml").targets) == 3
    spb = load_agent(examples / "agent-sparkplug.toml").sources[0]
    assert spb.decode.sparkplug is not None and spb.decode.sparkplug.host_id == "bridge-site-7"
    # It holds a password and a checkout leaves it 0644: refused, unless the override is set.
    with pytest.raises(ConfigError, match=r"holds a password, and .*mode 0644.*chmod 600"):
        load_agent(examples / "agent-amqp.toml")
    monkeypatch.setenv(INSECURE_ENV, "1")
    amqp = load_agent(examples / "agent-amqp.toml").sources
    assert [s.protocol for s in amqp] == ["amqp", "mqtt"]
    assert len(amqp[0].decode.mappings) == 1 and len(amqp[1].decode.mappings) == 2


def test_a_private_key_others_can_read_is_refused_at_start_with_the_fix(tmp_path: Path,
                                                                      pkis: localrun.Pki):
    import shutil

    from bridge.shared.config import TlsConfig
    from bridge.shared.errors import ConfigError

    tls = pkis.site("site-a")
    key = tmp_path / "site.key"
    shutil.copy(tls.key, key)
    key.chmod(0o640)
    exposed = TlsConfig(ca=tls.ca, cert=tls.cert, key=key, file="agent.toml")
    with pytest.raises(ConfigError, match=r"tls.key: private key .*mode 0640.*chmod 600"):
        exposed.read()
    key.chmod(0o600)
    assert exposed.read()[2] == tls.key.read_bytes()


def test_the_jetstream_example_checks_with_its_paths_resolved_next_to_it(tmp_path: Path):
    import shutil

    examples = Path(__file__).resolve().parent.parent / "examples"
    cfg = tmp_path / "ingest-jetstream.toml"
    shutil.copy(examples / "ingest-jetstream.toml", cfg)
    # Exactly what the example's header says to run next to it.
    assert run_bridge("pki", "ca", "--dir", str(tmp_path / "pki")).returncode == 0
    assert run_bridge("pki", "server", "--dir", str(tmp_path / "pki"), "--name", "ingest",
                      "--dns", "ingest.aws.example").returncode == 0
    res = run_bridge("ingest", "--config", str(cfg), "--check")
    assert res.returncode == 0, res.stderr
    assert "store JetStream stream BRIDGE on nats://nats-0.nats:4222" in res.stdout


@pytest.mark.parametrize(("store", "key", "message"), [
    ('kind = "jetstream"', "store.servers", "needs the NATS servers"),
    ('kind = "jetstream"\nservers = ["http://x:1"]', "store.servers[0]", "nats://HOST:PORT"),
    ('kind = "jetstream"\nservers = ["nats://x:1"]\nstream = "a.b"', "store.stream", "letters"),
    ('kind = "jetstream"\nservers = ["nats://x:1"]\nsubject_prefix = "a.*"',
     "store.subject_prefix", "wildcards"),
    ('kind = "jetstream"\nservers = ["nats://x:1"]\ncreds = "missing.creds"', "store.creds",
     "no such file"),
    ('kind = "jetstream"\nservers = ["nats://x:1"]\npath = "x.db"', "store.path", ""),
    ('kind = "kafka"', "store.kind", ""),
])
def test_jetstream_store_keys_are_checked_with_the_key_path(tmp_path: Path, pkis: localrun.Pki,
                                                            store: str, key: str,
                                                            message: str):
    tls = pkis.server()
    cfg = tmp_path / "ingest.toml"
    cfg.write_text(f'node = "aws"\n[tls]\nca = "{tls.ca}"\ncert = "{tls.cert}"\n'
                   f'key = "{tls.key}"\n[store]\n{store}\n')
    res = run_bridge("ingest", "--config", str(cfg), "--check")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert f"{cfg}: {key}" in res.stderr and message in res.stderr, res.stderr


@pytest.mark.parametrize("target", ["nats://", "nats://h:1,", "nats://h:1,http://x:2",
                                    "nats://h"])
def test_a_malformed_jetstream_consume_target_is_one_clear_error(target: str,
                                                                 pkis: localrun.Pki):
    tls = pkis.consumer()
    res = run_bridge("consume", "--from", target, "--ca", str(tls.ca), "--cert",
                     str(tls.cert), "--key", str(tls.key))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "--from: expected nats://HOST:PORT" in res.stderr, res.stderr


@pytest.mark.parametrize("url", ["amqp://bridge:S3cret@127.0.0.1:99999/plant",
                                 "amqp://bridge:S3cret@/plant"])
def test_a_password_never_appears_in_an_error(tmp_path: Path, pkis: localrun.Pki, url: str):
    text = GOOD_AGENT.replace('url = "mqtt://127.0.0.1:1883"\ntopics = ["#"]',
                              f'type = "amqp"\nurl = "{url}"\nqueue = "q"')
    path = agent_config(tmp_path, pkis, text)
    path.chmod(0o600)
    res = run_bridge("agent", "--config", str(path), "--check")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert "sources[0].url" in res.stderr
    assert "S3cret" not in res.stderr
    assert "bridge:***@" in res.stderr


def test_credentials_in_an_mqtt_url_are_refused_naming_the_keys_to_use(tmp_path: Path,
                                                                      pkis: localrun.Pki):
    text = GOOD_AGENT.replace("mqtt://127.0.0.1:1883", "mqtt://plant:S3cret@127.0.0.1:1883")
    path = agent_config(tmp_path, pkis, text)
    res = run_bridge("agent", "--config", str(path), "--check")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert "sources[0].url: credentials in an mqtt:// url are not used; set " \
           "sources[0].username and sources[0].password" in res.stderr
    assert "S3cret" not in res.stderr


@pytest.mark.parametrize("key", ["creds", "tls_key"])
def test_jetstream_secrets_others_can_read_are_refused(tmp_path: Path, pkis: localrun.Pki,
                                                      key: str):
    secret = tmp_path / "nats.secret"
    secret.write_text("-----BEGIN NATS USER JWT-----\n")
    secret.chmod(0o644)
    tls = pkis.server()
    extra = f'tls_cert = "{tls.cert}"\n' if key == "tls_key" else ""
    cfg = tmp_path / "ingest.toml"
    cfg.write_text(f'node = "aws"\n[tls]\nca = "{tls.ca}"\ncert = "{tls.cert}"\n'
                   f'key = "{tls.key}"\n[store]\nkind = "jetstream"\n'
                   f'servers = ["nats://127.0.0.1:4222"]\n{key} = "{secret}"\n{extra}')
    res = run_bridge("ingest", "--config", str(cfg), "--check")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert f"store.{key}:" in res.stderr and "mode 0644" in res.stderr, res.stderr
    secret.chmod(0o600)
    assert run_bridge("ingest", "--config", str(cfg), "--check").returncode == 0


def test_a_logged_url_never_carries_its_password():
    import logging

    from bridge.shared.telemetry import JsonFormatter

    record = logging.LogRecord("bridge", logging.ERROR, __file__, 1, "x", None, None)
    record.event = "source.connect_failed"
    record.fields = {"reason": "cannot connect to amqp://bridge:S3cret@10.0.0.1:5672/plant"}
    line = JsonFormatter().format(record)
    assert "S3cret" not in line and "amqp://bridge:***@10.0.0.1:5672/plant" in line


def test_a_key_readable_only_by_the_process_own_group_is_accepted(tmp_path: Path):
    """kubelet's fsGroup makes a secret root:<fsGroup> 0440: no other account can read it."""
    import os

    from bridge.shared.files import exposure

    gid = next(g for g in range(42420, 42520) if not _group_used(g))
    key = tmp_path / "tls.key"
    key.write_text("-----BEGIN PRIVATE KEY-----\n")
    os.chown(key, 0, gid)
    key.chmod(0o440)
    assert exposure(key, euid=10001, egid=gid) is None
    assert exposure(key, euid=10001, egid=gid + 1) is not None  # someone else's group
    assert exposure(key, euid=0, egid=gid) is not None  # root gets no such exception
    key.chmod(0o444)
    assert exposure(key, euid=10001, egid=gid) is not None  # others may read it


def _group_used(gid: int) -> bool:
    import grp
    import pwd

    try:
        grp.getgrgid(gid)
        return True
    except KeyError:
        return any(p.pw_gid == gid for p in pwd.getpwall())


def test_every_option_of_every_command_has_help_text():
    import argparse

    from bridge.cli import build_parser

    missing = []

    def walk(parser: argparse.ArgumentParser, path: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{path} {name}")
            elif not isinstance(action, (argparse._HelpAction, argparse._VersionAction)) \
                    and not action.help:
                missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")

    walk(build_parser(), "bridge")
    assert missing == []


def test_status_keeps_its_columns_aligned_for_long_names_and_targets():
    from bridge.cli import _aligned

    lines = _aligned([
        ["source ", " plant", "mqtt://127.0.0.1:1883", "subscribed", ""],
        ["uplink ", "*aws", "ingest-primary.eu-central-1.example.com:6443", "healthy",
         "breaker closed"],
        ["uplink ", " a-much-longer-endpoint-name", "10.0.0.9:6443", "unhealthy",
         "breaker open  last error: UNAVAILABLE"]])
    starts = [[line.index(cell) for cell in cells] for line, cells in zip(lines, [
        ["plant", "mqtt://", "subscribed"], ["aws", "ingest-primary", "healthy", "breaker"],
        ["a-much", "10.0.0.9", "unhealthy", "breaker"]], strict=True)]
    assert starts[0][:3] == starts[1][:3] == starts[2][:3]
    assert starts[1][3] == starts[2][3]
    assert lines[0].endswith("subscribed")  # no trailing blanks


@pytest.mark.parametrize(("level", "core_lines"), [("info", False), ("debug", True)])
def test_grpc_cores_own_log_lines_reach_standard_error_only_at_debug(
        tmp_path: Path, pkis: localrun.Pki, level: str, core_lines: bool):
    import contextlib
    import socket
    import ssl

    import orjson

    node = localrun.ingest(tmp_path, pkis, "aws", extra=f'[log]\nlevel = "{level}"\n').start()
    try:
        localrun.wait_healthy(node.target, pkis.consumer())
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        with socket.create_connection(("127.0.0.1", node.port), timeout=10) as raw, \
                contextlib.suppress(ssl.SSLError, OSError), ctx.wrap_socket(raw) as tls:
            tls.sendall(b"x")  # no client certificate: the node ends the handshake
            assert tls.recv(10) == b""
    finally:
        node.proc.stop()
    lines = [x for x in node.proc.log.read_text().splitlines() if x.strip()]
    foreign = [x for x in lines if not x.startswith("{")]
    assert all(isinstance(orjson.loads(x), dict) for x in lines if x.startswith("{"))
    if core_lines:
        assert any("Handshake failed" in x for x in foreign), lines[-5:]
    else:
        assert foreign == []
