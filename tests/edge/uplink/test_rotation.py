"""A certificate renewed under load is picked up without a restart: 0 lost, 0 doubled, and the
old certificate, revoked right after, is no longer needed."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from bridge.shared import pki
from devkit import localrun
from tests.conftest import Cluster, Publisher, idle, metric_value, wait_for

RELOADED = 'bridge_tls_reloads_total{outcome="ok"}'


def test_a_renewed_certificate_is_used_without_a_restart_and_the_old_one_can_be_revoked(
        tmp_path: Path, broker: localrun.Mosquitto):
    own = localrun.Pki(tmp_path / "pki", ["site-a"])  # this test replaces site-a's files
    deny = tmp_path / "revoked.txt"
    deny.write_text("")
    cluster = Cluster(tmp_path, own, broker)
    try:
        cluster.ingest("aws", extra=f'[revocation]\ndeny_list = "{deny}"\n')
        agent = cluster.agent(tls_extra="check_s = 0.2\n")
        pid = agent.proc.pid
        tls = own.site("site-a")
        old = tls.cert.with_suffix(".old.pem")
        os.link(tls.cert, old)  # kept to revoke once the new one is in use
        pub = Publisher(cluster, count=6000, rate=1000)
        wait_for(lambda: pub.progress.acked >= 1500, what="publishing under way")

        renewal = tmp_path / "renewal"
        renewal.mkdir()
        pki.issue_site(own.dir, renewal, site_id="site-a")
        os.replace(renewal / "site-site-a.key", tls.key)  # the order an installer might use:
        os.replace(renewal / "site-site-a.pem", tls.cert)  # the key, then its certificate
        wait_for(lambda: metric_value(agent.metrics(), RELOADED) >= 1, timeout=10,
                 what="the agent to load the renewed certificate")
        subprocess.run(localrun.bridge_argv("pki", "revoke", "--deny-list", str(deny),
                                            str(old)), check=True, capture_output=True,
                       timeout=60)
        assert pub.progress.acked < 6000, "the revocation must land while readings still flow"

        published = pub.join()
        wait_for(lambda: idle(agent, published), timeout=60, what="the spool to drain")
        committed, lost, dups = cluster.account(published)
        assert (committed, lost, dups) == (published, 0, 0)
        assert agent.proc.pid == pid and agent.proc.alive(), "no restart"
        assert metric_value(agent.metrics(), RELOADED) == 1
        log = agent.proc.log.read_text()
        assert '"event":"tls.reloaded"' in log
        assert '"event":"uplink.channels_rebuilt"' in log
    finally:
        cluster.stop()
