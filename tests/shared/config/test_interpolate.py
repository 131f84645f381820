"""``${VAR}`` and ``${VAR:-default}`` in config string values (bridge.shared.config.interpolate):
resolved from the environment at load, an unset variable named with its file and key, and a
value from the environment never printed in an error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bridge.shared.config import load_agent
from bridge.shared.config.interpolate import expand, scrub
from bridge.shared.errors import ConfigError
from devkit import localrun
from tests.conftest import Cluster
from tests.test_cli import GOOD_AGENT, agent_config


def test_variables_and_defaults_resolve_in_nested_string_values_only() -> None:
    raw: dict[str, Any] = {"a": "${HOST}:${PORT:-6443}", "n": 5, "flag": True,
                           "t": {"list": ["x-${HOST}", {"deep": "${EMPTY:-fallback}"}]},
                           "lit": "$${HOST} costs $5", "${HOST}": "keys stay"}
    seen = expand(raw, {"HOST": "cloud-1", "EMPTY": ""})
    assert raw == {"a": "cloud-1:6443", "n": 5, "flag": True,
                   "t": {"list": ["x-cloud-1", {"deep": "fallback"}]},
                   "lit": "${HOST} costs $5", "${HOST}": "keys stay"}
    assert seen == {"cloud-1": "${HOST}"}


def test_a_value_from_the_environment_is_not_expanded_again() -> None:
    raw = {"password": "${SECRET}"}
    expand(raw, {"SECRET": "pa${HOST}ss", "HOST": "no"})
    assert raw == {"password": "pa${HOST}ss"}


@pytest.mark.parametrize(("value", "says"), [
    ("${MISSING}", "environment variable MISSING is not set"),
    ("x ${1BAD} y", "is not '${NAME}'"),
    ("${UNCLOSED", "is not '${NAME}'"),
])
def test_an_unresolvable_reference_names_its_key(value: str, says: str) -> None:
    with pytest.raises(ConfigError) as info:
        expand({"sources": [{"url": value}]}, {}, "agent.toml")
    assert (info.value.file, info.value.key) == ("agent.toml", "sources[0].url")
    assert says in info.value.message


def test_scrub_writes_each_environment_value_as_its_reference() -> None:
    assert scrub("got 'hunter2-long' and 'hunter2'",
                 {"hunter2": "${P}", "hunter2-long": "${Q}"}) == "got '${Q}' and '${P}'"


def test_an_agent_config_takes_its_values_from_the_environment(
        tmp_path: Path, pkis: localrun.Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    # (doubled braces: agent_config fills the TLS paths with str.format)
    text = GOOD_AGENT.replace('site_id = "site-a"', 'site_id = "${{BRIDGE_SITE}}"').replace(
        'target = "127.0.0.1:6443"', 'target = "${{CLOUD_HOST:-127.0.0.1}}:${{CLOUD_PORT}}"')
    path = agent_config(tmp_path, pkis, text)
    monkeypatch.setenv("BRIDGE_SITE", "site-a")
    monkeypatch.setenv("CLOUD_PORT", "7443")
    cfg = load_agent(path)
    assert cfg.site_id == "site-a"
    assert cfg.uplink.endpoints[0].target == "127.0.0.1:7443"
    monkeypatch.delenv("CLOUD_PORT")
    with pytest.raises(ConfigError) as info:
        load_agent(path)
    assert (info.value.file, info.value.key) == (str(path), "uplink.endpoints[0].target")
    assert "CLOUD_PORT is not set" in info.value.message


@pytest.mark.parametrize(("change", "key"), [
    # refused by the schema (a choice), and by the loader's own checks (a site id)
    (('topics = ["#"]', 'topics = ["#"]\ncodec = "${{CODEC}}"'), "sources[0].codec"),
    (('site_id = "site-a"', 'site_id = "${{CODEC}}"'), "site_id"),
])
def test_a_value_from_the_environment_never_appears_in_a_config_error(
        tmp_path: Path, pkis: localrun.Pki, change: tuple[str, str], key: str) -> None:
    path = agent_config(tmp_path, pkis, GOOD_AGENT.replace(*change))
    secret = "Hunter2-Secret"
    res = subprocess.run([sys.executable, "-m", "bridge", "agent", "--config", str(path),
                          "--check"], capture_output=True, text=True, timeout=60, check=False,
                         env={**os.environ, "CODEC": secret})
    assert res.returncode == 2
    assert res.stderr.startswith(f"error: {path}: {key}: "), res.stderr
    assert secret not in res.stderr + res.stdout and "${CODEC}" in res.stderr


def test_a_password_from_the_environment_may_sit_in_a_file_others_can_read(
        tmp_path: Path, pkis: localrun.Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BRIDGE_ALLOW_INSECURE_PERMISSIONS", raising=False)
    monkeypatch.setenv("MQTT_PASSWORD", "s3cr3t-value")
    creds = 'topics = ["#"]\nusername = "bridge"\npassword = "{}"'
    from_env = agent_config(tmp_path, pkis, GOOD_AGENT.replace(
        'topics = ["#"]', creds.format("${{MQTT_PASSWORD}}")))
    from_env.chmod(0o644)
    assert load_agent(from_env).sources[0].password == "s3cr3t-value"
    in_file = agent_config(tmp_path, pkis, GOOD_AGENT.replace(
        'topics = ["#"]', creds.format("in-the-${{MQTT_PASSWORD}}")))
    in_file.chmod(0o644)
    with pytest.raises(ConfigError,
                       match=r"sources\[0\]: \(source 'mqtt0'\) holds a password"):
        load_agent(in_file)


def test_a_secret_from_the_environment_never_reaches_status_metrics_or_the_log(
        cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "Zq8-env-only-secret"
    monkeypatch.setenv("MQTT_PASSWORD", secret)
    monkeypatch.setenv("PLANT_HOST", "127.0.0.1")
    cluster.ingest("aws")
    port = cluster.broker.port
    agent = cluster.agent(sources=(
        '[[sources]]\nname = "plant"\nurl = "mqtt://${PLANT_HOST}:' + str(port) + '"\n'
        'topics = ["#"]\nusername = "bridge"\npassword = "${MQTT_PASSWORD}"\n'))
    status = json.dumps(agent.status())
    assert "127.0.0.1" in status  # the interpolated host is there, the password is not
    assert secret not in status and secret not in agent.metrics()
    agent.proc.stop()
    assert secret not in agent.proc.log.read_text()
