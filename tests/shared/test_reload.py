"""SIGHUP reloads, as every peer an operator knows does: the agent and the ingest stay up,
apply what can change (log level, certificates, deny-list), and name the keys that need a
restart. Real processes, real config files."""

from __future__ import annotations

import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import orjson

from bridge.shared import pki
from devkit.localrun import AgentProc, IngestProc, Proc, bridge_argv
from tests.conftest import Cluster, Publisher, metric_value, wait_delivered, wait_for


def events(proc: Proc, name: str) -> list[dict[str, Any]]:
    out = []
    for line in proc.log.read_text(errors="replace").splitlines():
        if line.startswith("{") and f'"event":"{name}"' in line:
            out.append(orjson.loads(line))
    return out


def hup(proc: Proc, name: str) -> dict[str, Any]:
    """SIGHUP, then the event the reload logged."""
    before = len(events(proc, name))
    proc.signal(signal.SIGHUP)
    wait_for(lambda: len(events(proc, name)) > before or not proc.alive(),
             what=f"{name} after SIGHUP")
    assert proc.alive(), proc.tail()
    return events(proc, name)[-1]


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, (old, text)
    path.write_text(text.replace(old, new, 1))


def live_credentials(cluster: Cluster, tmp_path: Path) -> Path:
    """The site's certificate and key copied where a renewal can replace them."""
    live = tmp_path / "live"
    live.mkdir()
    tls = cluster.pki.site("site-a")
    shutil.copy(tls.cert, live / "site.pem")
    shutil.copy(tls.key, live / "site.key")
    return live


def test_sighup_reloads_the_agent_instead_of_killing_it(cluster: Cluster, tmp_path: Path):
    cluster.ingest("aws")
    live = live_credentials(cluster, tmp_path)
    tls = cluster.pki.site("site-a")
    a: AgentProc = cluster.agent(start=False, tls_extra="check_s = 3600.0\n")
    edit(a.config, f'cert = "{tls.cert}"', f'cert = "{live / "site.pem"}"')
    edit(a.config, f'key = "{tls.key}"', f'key = "{live / "site.key"}"')
    a.start()
    a.wait_subscribed()

    # A reloadable key and one that needs a restart.
    edit(a.config, "[spool]\n", "[spool]\nmax_bytes = 500000000\n")
    a.config.write_text(a.config.read_text() + '[log]\nlevel = "warning"\n')
    done = hup(a.proc, "agent.reloaded")
    assert done["applied"] == ["log.level"]
    assert done["restart_needed"] == ["spool.max_bytes"]
    assert "restart the agent to apply: spool.max_bytes" in done["action"]
    text = a.metrics()
    assert metric_value(text, 'bridge_config_reloads_total{outcome="restart_needed"}') == 1
    # log.level = "warning" took effect: INFO events (uplink.batch) are no longer written.
    published = Publisher(cluster, count=200, rate=0).join()
    wait_delivered(cluster, a, published)
    assert not [e for e in events(a.proc, "uplink.batch") if e["ts"] > done["ts"]]

    # A renewed certificate is re-read on SIGHUP (its check interval is an hour here).
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    issued = pki.issue_site(cluster.pki.dir, fresh, site_id="site-a")
    assert issued.key_path is not None
    shutil.copy(issued.key_path, live / "site.key")
    shutil.copy(issued.cert_path, live / "site.pem")
    done = hup(a.proc, "agent.reloaded")
    assert "tls (certificate files)" in done["applied"]
    assert done["restart_needed"] == ["spool.max_bytes"]  # still named until a restart

    # A config the loader refuses changes nothing and is said.
    a.config.write_text(a.config.read_text() + "[uplink]\nmax_in_flght = 3\n")
    failed = hup(a.proc, "agent.reload_failed")
    assert "uplink" in failed["reason"]
    more = Publisher(cluster, count=100, rate=0).join()
    wait_delivered(cluster, a, published + more)
    stream, errors = cluster.consume()
    assert not errors and len({c.envelope.seq for c in stream}) == published + more  # type: ignore[attr-defined]
    assert metric_value(a.metrics(), 'bridge_config_reloads_total{outcome="failed"}') == 1


def test_sighup_rereads_the_ingest_deny_list_and_names_what_needs_a_restart(
        cluster: Cluster, tmp_path: Path):
    deny = tmp_path / "revoked.txt"
    deny.write_text("# nothing revoked\n")
    node: IngestProc = cluster.ingest("aws", extra=f'[revocation]\ndeny_list = "{deny}"\n')
    edit(node.config, "[revocation]", '[rate_limit]\nreadings_per_s = 5000.0\n[log]\n'
         'level = "debug"\n[revocation]')
    subprocess.run(bridge_argv("pki", "revoke", "--deny-list", str(deny),
                               str(cluster.pki.site("site-b").cert)),
                   check=True, capture_output=True, timeout=30)
    done = hup(node.proc, "ingest.reloaded")
    assert done["applied"] == ["log.level", "revocation.deny_list (re-read)"]
    # The burst defaults to twice the rate, so it changed with it.
    assert done["restart_needed"] == ["rate_limit.readings_per_s", "rate_limit.burst"]
    assert events(node.proc, "ingest.deny_list_reloaded")[-1]["entries"] == 2

