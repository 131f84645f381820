"""An identity refusal (PERMISSION_DENIED) is permanent for the endpoint, never for the data:
shown with the server's reason, counted, retried slowly, nothing dropped. Real processes: an
ingest with a deny-list, an agent whose certificate gets revoked and then un-revoked."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

from devkit.localrun import bridge_argv
from tests.conftest import Cluster, Publisher, metric_value, wait_delivered, wait_for


def test_a_revoked_site_shows_refused_backs_off_and_loses_nothing(cluster: Cluster,
                                                                  tmp_path: Path):
    deny = tmp_path / "revoked.txt"
    deny.write_text("# nothing revoked yet\n")
    node = cluster.ingest("aws", extra=f'[revocation]\ndeny_list = "{deny}"\n')
    agent = cluster.agent(uplink_extra="refused_retry_s = 3.0\n")
    first = Publisher(cluster, count=100, rate=0).join()
    wait_delivered(cluster, agent, first)
    reloaded = '"event":"ingest.deny_list_reloaded"'
    before = node.proc.log.read_text().count(reloaded)  # before the change: any re-read counts
    subprocess.run(bridge_argv("pki", "revoke", "--deny-list", str(deny),
                               str(cluster.pki.site("site-a").cert)), check=True,
                   capture_output=True, timeout=30)
    # The ingest re-reads the list at most every 0.2 s, on a call; a SIGHUP re-reads it now,
    # so every batch published from here on meets the revocation.
    node.proc.signal(signal.SIGHUP)
    wait_for(lambda: node.proc.log.read_text().count(reloaded) > before,
             what="the ingest's deny-list re-read")
    # Published after the revocation: refused by the only cloud, kept in the spool.
    more = Publisher(cluster, count=200, rate=0).join()

    def aws() -> dict[str, object]:
        eps: list[dict[str, object]] = agent.status()["uplink"]["endpoints"]
        return eps[0]

    wait_for(lambda: aws()["state"] == "refused", what="the endpoint shown refused")
    assert "PERMISSION_DENIED" in str(aws()["last_error"])
    assert "is revoked" in str(aws()["last_error"])  # the server's own reason
    text = agent.metrics()
    assert metric_value(text, 'bridge_uplink_endpoint_refused{endpoint="aws"}') == 1
    # A slow retry, not a hammer: one retry period later, at most one round of the
    # in-flight calls more was refused.
    calls = metric_value(text, 'bridge_uplink_refused_total{code="PERMISSION_DENIED",'
                               'endpoint="aws"}')
    wait_for(lambda: metric_value(agent.metrics(), 'bridge_uplink_refused_total{'
                                  'code="PERMISSION_DENIED",endpoint="aws"}') > calls,
             timeout=15, what="the slow retry")
    after = metric_value(agent.metrics(), 'bridge_uplink_refused_total{'
                         'code="PERMISSION_DENIED",endpoint="aws"}')
    assert after - calls <= 4, (calls, after)  # the calls in flight when it was revoked
    # From then on one probe per retry period, however many batches wait.
    wait_for(lambda: metric_value(agent.metrics(), 'bridge_uplink_refused_total{'
                                  'code="PERMISSION_DENIED",endpoint="aws"}') > after,
             timeout=15, what="the next slow retry")
    probe = metric_value(agent.metrics(), 'bridge_uplink_refused_total{'
                         'code="PERMISSION_DENIED",endpoint="aws"}')
    assert probe - after == 1, (after, probe)
    assert agent.status()["spool"]["readings"] == more  # nothing dropped meanwhile
    status = subprocess.run(bridge_argv("status", "--config", str(agent.config)),
                            capture_output=True, text=True, timeout=30, check=True).stdout
    assert "refused" in status and "is revoked" in status
    # Un-revoked: the next slow retry goes through and every reading arrives once.
    deny.write_text("# un-revoked\n")
    wait_delivered(cluster, agent, first + more)
    stream, errors = cluster.consume()
    assert not errors
    seqs = [c.envelope.seq for c in stream]  # type: ignore[attr-defined]
    assert sorted(seqs) == list(range(1, first + more + 1))  # each reading once, none lost
    wait_for(lambda: metric_value(agent.metrics(),
                                  'bridge_uplink_endpoint_refused{endpoint="aws"}') == 0,
             what="the refusal cleared")
    assert aws()["state"] == "healthy"
    log = agent.proc.log.read_text()
    assert '"event":"uplink.refused"' in log and '"event":"uplink.refusal_cleared"' in log
