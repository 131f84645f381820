"""deploy/kubernetes: every overlay renders, validates against the Kubernetes 1.28 schemas
(kubernetes-validate, offline), and says what the ingest tier needs: probes, autoscaling,
disruption budgets, network policy, monitoring, a durable NATS cluster."""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from bridge.shared.config import load_ingest
from bridge.shared.telemetry import IngestMetrics
from devkit.jscluster import nats_server
from tests.deploy import kustomize
from tests.deploy.test_nats import make_pki
from tools import gen_prometheusrule

K8S = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
CLOUDS = ["aws", "azure", "gcp"]
OVERLAYS = [*CLOUDS, "small"]
VERSIONS = ["1.28.0", "1.33.0"]
CUSTOM = {"ServiceMonitor": "monitoring.coreos.com/v1",
          "PrometheusRule": "monitoring.coreos.com/v1",
          "Certificate": "cert-manager.io/v1", "Issuer": "cert-manager.io/v1"}
Obj = dict[str, Any]


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[Obj]]:
    return request.param, kustomize.render(K8S / "overlays" / request.param)


def one(objs: list[Obj], kind: str, name: str) -> Obj:
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, (kind, name, [(o["kind"], o["metadata"]["name"]) for o in objs])
    return found[0]


def workloads(objs: list[Obj]) -> list[Obj]:
    return [o for o in objs if o["kind"] in {"Deployment", "StatefulSet"}]


def test_every_object_of_every_overlay_validates_against_the_kubernetes_schemas(
        overlay: tuple[str, list[Obj]]) -> None:
    name, objs = overlay
    assert objs
    for obj in objs:
        if obj["kind"] in CUSTOM:  # custom resources: checked structurally below
            assert obj["apiVersion"] == CUSTOM[obj["kind"]]
            continue
        for version in VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)
    keys = [(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in objs]
    assert len(keys) == len(set(keys)), f"{name}: an object rendered twice"


def test_a_wrong_manifest_fails_validation() -> None:
    """The validator can fail: an unknown field in strict mode and a wrong type."""
    bad = kustomize.render(K8S / "overlays" / "aws")
    deployment = one(bad, "Deployment", "bridge-ingest")
    deployment["spec"]["replicaz"] = 3
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, "1.28.0", strict=True)
    del deployment["spec"]["replicaz"]
    deployment["spec"]["replicas"] = "three"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, "1.28.0", strict=True)


def test_each_cloud_runs_stateless_ingest_replicas_in_front_of_a_3_node_jetstream(
        tmp_path: Path) -> None:
    for cloud in CLOUDS:
        objs = kustomize.render(K8S / "overlays" / cloud)
        ingest = one(objs, "Deployment", "bridge-ingest")
        assert ingest["spec"]["replicas"] >= 3
        assert ingest["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
        nats = one(objs, "StatefulSet", "nats")
        assert nats["spec"]["replicas"] == 3
        claim = nats["spec"]["volumeClaimTemplates"][0]["spec"]
        assert claim["storageClassName"], cloud
        cfg = _ingest_config(objs, tmp_path / cloud)
        assert cfg.node == cloud and cfg.jetstream is not None
        assert cfg.jetstream.replicas == 3
        svc = one(objs, "Service", nats["spec"]["serviceName"])
        ns = nats["metadata"]["namespace"]
        assert svc["spec"]["clusterIP"] == "None"
        assert list(cfg.jetstream.servers) == [
            f"tls://nats-{i}.{svc['metadata']['name']}.{ns}.svc:4222" for i in range(3)]
        conf = one(objs, "ConfigMap", "nats")["data"]["nats.conf"]
        assert re.search(r"^\s*sync_interval: always$", conf, re.M), "durable JetStream"
        routes = re.findall(r"nats://(nats-\d)\.nats\.bridge\.svc:6222", conf)
        assert routes == [f"nats-{i}" for i in range(3)]
        assert one(objs, "Service", "bridge-ingest")["metadata"]["annotations"], cloud


def test_the_nats_config_is_accepted_by_nats_server(tmp_path: Path) -> None:
    exe = nats_server()  # the pinned 2.15 binary, the version the manifests run
    conf = one(kustomize.render(K8S / "overlays" / "aws"), "ConfigMap", "nats")["data"]
    path = tmp_path / "nats.conf"
    make_pki(tmp_path / "pki")  # the Secret nats-tls, as files
    text = conf["nats.conf"].replace("/data", str(tmp_path / "js")) \
        .replace("/var/run/nats", str(tmp_path))
    for name, file in (("tls.crt", "server.crt"), ("tls.key", "server.key"), ("ca.crt", "ca.crt")):
        text = text.replace(f"/etc/nats-tls/{name}", str(tmp_path / "pki" / file))
    path.write_text(text)
    r = subprocess.run([exe, "-t", "-c", str(path)], capture_output=True, text=True,
                       timeout=30, check=False, env={"POD_NAME": "nats-0", "PATH": "/usr/bin"})
    assert r.returncode == 0, r.stdout + r.stderr
    path.write_text("jetstream { sync_interval: sometimes }\n")
    r = subprocess.run([exe, "-t", "-c", str(path)], capture_output=True, text=True,
                       timeout=30, check=False)
    assert r.returncode != 0, "nats-server -t rejects a bad config (the check can fail)"


def _ingest_config(objs: list[Obj], where: Path) -> Any:
    """The rendered ingest.toml loaded by the ingest's own loader, TLS paths made local."""
    where.mkdir(parents=True, exist_ok=True)
    text = one(objs, "ConfigMap", "bridge-ingest")["data"]["ingest.toml"]
    for name in ("ca.crt", "tls.crt", "tls.key"):
        (where / name).write_text("")
        (where / name).chmod(0o600)
        text = text.replace(f"/etc/bridge/tls/{name}", str(where / name))
    (where / "client-ca.crt").write_text("")
    text = text.replace("/etc/bridge/client-ca/ca.crt", str(where / "client-ca.crt"))
    for name in ("ca.crt", "tls.crt", "tls.key"):  # the NATS client certificate
        (where / f"nats-{name}").write_text("")
        (where / f"nats-{name}").chmod(0o600)
        text = text.replace(f"/etc/bridge/nats/{name}", str(where / f"nats-{name}"))
    text = text.replace("/var/lib/bridge/", f"{where}/")
    revoked = one(objs, "ConfigMap", "bridge-ingest-revoked")["data"]["revoked.txt"]
    (where / "revoked.txt").write_text(revoked)
    text = text.replace("/etc/bridge/revoked/revoked.txt", str(where / "revoked.txt"))
    path = where / "ingest.toml"
    path.write_text(text)
    path.chmod(0o600)
    return load_ingest(path)


def test_the_ingest_config_loads_and_its_ports_match_the_pod_and_the_probes(
        overlay: tuple[str, list[Obj]], tmp_path: Path) -> None:
    name, objs = overlay
    cfg = _ingest_config(objs, tmp_path)
    (pod,) = [w for w in workloads(objs) if w["metadata"]["name"] == "bridge-ingest"]
    (c,) = pod["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert cfg.listen.endswith(f":{ports['grpc']}") and ports["grpc"] == 6443
    assert cfg.metrics_listen.endswith(f":{ports['metrics']}")
    assert cfg.health_listen.endswith(f":{ports['health']}")
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["image"] == "registry.example.com/edge/bridge:0.1.0"
    assert c["args"] == ["ingest", "--config", "/etc/bridge/ingest.toml"]
    if name == "small":
        assert pod["kind"] == "StatefulSet" and pod["spec"]["replicas"] == 1
        assert cfg.jetstream is None and cfg.store_path is not None
        assert not [o for o in objs if o["kind"] == "HorizontalPodAutoscaler"]
    secret = next(v for v in pod["spec"]["template"]["spec"]["volumes"] if "secret" in v)
    cert = one(list(yaml.safe_load_all((K8S / "cert-manager" / "certificate.yaml").read_text())),
               "Certificate", "bridge-ingest-tls")
    assert secret["secret"]["secretName"] == cert["spec"]["secretName"]


def test_the_deny_list_is_mounted_as_a_directory_so_an_edit_reaches_running_pods(
        overlay: tuple[str, list[Obj]], tmp_path: Path) -> None:
    from bridge.cloud.ingest.denylist import parse

    _, objs = overlay
    cfg = _ingest_config(objs, tmp_path)
    assert cfg.deny_list == tmp_path / "revoked.txt"
    revoked = one(objs, "ConfigMap", "bridge-ingest-revoked")["data"]["revoked.txt"]
    assert len(parse(revoked, source="revoked.txt")) == 0  # it parses, and revokes nothing
    (pod,) = [w for w in workloads(objs) if w["metadata"]["name"] == "bridge-ingest"]
    spec = pod["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == "revoked"]
    assert mount["mountPath"] == "/etc/bridge/revoked" and "subPath" not in mount, \
        "a subPath mount never sees ConfigMap updates"
    (vol,) = [v for v in spec["volumes"] if v["name"] == "revoked"]
    assert vol["configMap"]["name"] == "bridge-ingest-revoked"


def test_every_pod_runs_non_root_read_only_without_capabilities_and_with_limits(
        overlay: tuple[str, list[Obj]]) -> None:
    _, objs = overlay
    for w in workloads(objs):
        spec = w["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert spec["automountServiceAccountToken"] is False
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, c["name"]
            assert sc["allowPrivilegeEscalation"] is False, c["name"]
            assert sc["capabilities"] == {"drop": ["ALL"]}, c["name"]
            for kind in ("requests", "limits"):
                assert set(c["resources"][kind]) == {"cpu", "memory"}, (c["name"], kind)


def test_the_autoscaler_scales_at_65_percent_cpu_or_500_requests_per_second_per_pod() -> None:
    for cloud in CLOUDS:
        objs = kustomize.render(K8S / "overlays" / cloud)
        hpa = one(objs, "HorizontalPodAutoscaler", "bridge-ingest")
        assert hpa["apiVersion"] == "autoscaling/v2"
        ref = hpa["spec"]["scaleTargetRef"]
        one(objs, ref["kind"], ref["name"])
        assert hpa["spec"]["minReplicas"] >= 3 > 0
        by_type = {m["type"]: m for m in hpa["spec"]["metrics"]}
        assert set(by_type) == {"Resource", "Pods"}
        cpu = by_type["Resource"]["resource"]
        assert cpu["name"] == "cpu"
        assert cpu["target"] == {"type": "Utilization", "averageUtilization": 65}
        pods = by_type["Pods"]["pods"]
        assert pods["target"] == {"type": "AverageValue", "averageValue": "500"}
        down = hpa["spec"]["behavior"]["scaleDown"]
        assert down["stabilizationWindowSeconds"] >= 300
        assert hpa["spec"]["behavior"]["scaleUp"]["stabilizationWindowSeconds"] == 0
    # The adapter's rule turns the counter the ingest exports into the metric the HPA reads.
    values = yaml.safe_load((K8S / "monitoring" / "prometheus-adapter-values.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    series = rule["seriesQuery"].split("{", 1)[0]
    exported = {m.name + "_total" for m in IngestMetrics().registry.collect()
                if m.type == "counter"}
    assert series in exported
    renamed = re.sub(rule["name"]["matches"], rule["name"]["as"].replace("${1}", r"\1"), series)
    assert renamed == pods["metric"]["name"] == "bridge_ingest_requests_per_second"
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    assert "rate(<<.Series>>" in rule["metricsQuery"]


def test_disruption_budgets_take_one_pod_at_a_time() -> None:
    objs = kustomize.render(K8S / "overlays" / "aws")
    for name in ("bridge-ingest", "nats"):
        pdb = one(objs, "PodDisruptionBudget", name)
        assert pdb["spec"]["maxUnavailable"] == 1
        labels = one(objs, "Deployment" if name == "bridge-ingest" else "StatefulSet",
                     name)["spec"]["template"]["metadata"]["labels"]
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_the_ingest_may_receive_on_6443_and_send_only_to_nats_and_dns(
        overlay: tuple[str, list[Obj]]) -> None:
    _, objs = overlay
    pol = one(objs, "NetworkPolicy", "bridge-ingest")
    assert set(pol["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    grpc_in = [r for r in pol["spec"]["ingress"] if r["ports"][0]["port"] == 6443]
    assert grpc_in and "from" not in grpc_in[0]  # agents arrive from anywhere
    egress = pol["spec"]["egress"]
    assert len(egress) == 2
    (nats,) = [r for r in egress if r["ports"] == [{"port": 4222, "protocol": "TCP"}]]
    assert nats["to"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "nats"}}}]
    (dns,) = [r for r in egress if r is not nats]
    assert {p["port"] for p in dns["ports"]} == {53}


def test_the_service_monitor_scrapes_the_metrics_port_of_the_ingest_pods(
        overlay: tuple[str, list[Obj]]) -> None:
    _, objs = overlay
    sm = one(objs, "ServiceMonitor", "bridge-ingest")
    sel = sm["spec"]["selector"]["matchLabels"]
    (svc,) = [o for o in objs if o["kind"] == "Service"
              and sel.items() <= o["metadata"].get("labels", {}).items()]
    assert [e["port"] for e in sm["spec"]["endpoints"]] == [p["name"] for p in svc["spec"]["ports"]]
    assert svc["spec"]["ports"][0]["targetPort"] == "metrics"
    assert sm["spec"]["namespaceSelector"]["matchNames"] == [svc["metadata"]["namespace"]]
    rule = one(objs, "PrometheusRule", "bridge")
    assert rule["spec"]["groups"]


def test_the_prometheusrule_is_generated_from_the_rule_file() -> None:
    assert (K8S / "monitoring" / "prometheusrule.yaml").read_text() == gen_prometheusrule.render()


def test_every_cloud_overlay_changes_only_the_node_name_of_the_base_config() -> None:
    base = one(kustomize.render_lite(K8S / "base"), "ConfigMap", "bridge-ingest")
    want = tomllib.loads(base["data"]["ingest.toml"])
    for cloud in CLOUDS:
        got = tomllib.loads(one(kustomize.render(K8S / "overlays" / cloud), "ConfigMap",
                                "bridge-ingest")["data"]["ingest.toml"])
        assert got == {**want, "node": cloud}


def test_the_cert_manager_example_can_mint_server_certificates_only_in_its_namespace(
        ) -> None:
    """No ClusterIssuer (any namespace could request OU=bridge-site with any CN), and the
    issuer's CA is not the CA the ingest verifies clients against, so nothing it signs can
    act as a site or a consumer."""
    docs = list(yaml.safe_load_all((K8S / "cert-manager" / "certificate.yaml").read_text()))
    assert not [d for d in docs if d["kind"] == "ClusterIssuer"]
    issuer = one(docs, "Issuer", "bridge-server-ca")
    cert = one(docs, "Certificate", "bridge-ingest-tls")
    for d in (issuer, cert):
        assert d["apiVersion"] == CUSTOM[d["kind"]]
        assert d["metadata"]["namespace"] == "bridge"
    assert cert["spec"]["issuerRef"] == {"kind": "Issuer", "name": "bridge-server-ca"}
    assert cert["spec"]["usages"] == ["server auth", "digital signature"]
    assert cert["spec"]["dnsNames"]


def test_the_ingest_verifies_clients_against_the_client_ca_not_the_secret_s_issuer(
        overlay: tuple[str, list[Obj]], tmp_path: Path) -> None:
    _, objs = overlay
    cfg = _ingest_config(objs, tmp_path)
    assert cfg.tls.ca == tmp_path / "client-ca.crt"  # /etc/bridge/client-ca/ca.crt
    (pod,) = [w for w in workloads(objs) if w["metadata"]["name"] == "bridge-ingest"]
    spec = pod["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts["client-ca"] == "/etc/bridge/client-ca"
    (vol,) = [v for v in spec["volumes"] if v["name"] == "client-ca"]
    assert vol == {"name": "client-ca", "configMap": {"name": "bridge-client-ca"}}


@pytest.mark.skipif(kustomize.kubectl() is None,
                    reason="kubectl with kustomize >= v4 not installed: renders used the "
                           "subset renderer, which this test would compare against it")
@pytest.mark.parametrize("name", ["base", *[f"overlays/{o}" for o in OVERLAYS]])
def test_the_subset_renderer_agrees_with_kustomize(name: str) -> None:
    def key(o: Obj) -> tuple[str, str, str]:
        return o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"]

    real = {key(o): o for o in kustomize.render_real(K8S / name)}
    lite = {key(o): o for o in kustomize.render_lite(K8S / name)}
    assert real == lite


def test_the_ingest_can_read_its_key_without_switching_the_permission_check_off(
        overlay: tuple[str, list[Obj]]) -> None:
    """kubelet makes a secret volume's files root:<fsGroup>, mode defaultMode | 0440 (under
    fsGroup): the process must read them through its uid or its groups, and our check must
    accept that mode as it is, never with BRIDGE_ALLOW_INSECURE_PERMISSIONS."""
    _, objs = overlay
    for w in workloads(objs):
        spec = w["spec"]["template"]["spec"]
        sc = spec["securityContext"]
        uid, gid, fs = sc.get("runAsUser"), sc.get("runAsGroup"), sc.get("fsGroup")
        secrets = {v["name"]: v["secret"] for v in spec["volumes"] if "secret" in v}
        for c in spec["containers"]:
            assert all(e["name"] != "BRIDGE_ALLOW_INSECURE_PERMISSIONS"
                       for e in c.get("env", [])), (w["metadata"]["name"], c["name"])
            for m in c.get("volumeMounts", []):
                secret = secrets.get(m["name"])
                if secret is None:
                    continue
                mode = secret.get("defaultMode", 0o644)
                owner_gid = 0
                if fs is not None:
                    mode, owner_gid = mode | 0o440, fs
                readable = (uid == 0 and mode & 0o400) or \
                    (owner_gid in {gid, fs} and mode & 0o040) or mode & 0o004
                assert readable, (w["metadata"]["name"], m["name"], oct(mode))
                assert not mode & 0o007, "others may read the key"
                assert owner_gid == gid, "the key's group must be the process's own"


def test_the_nats_monitoring_port_is_open_to_the_monitoring_namespace_only(
        overlay: tuple[str, list[Obj]]) -> None:
    name, objs = overlay
    if name == "small":  # no NATS in the small overlay
        return
    pol = one(objs, "NetworkPolicy", "nats")
    (rule,) = [r for r in pol["spec"]["ingress"] if r["ports"][0]["port"] == 8222]
    assert rule["from"] == [{"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": "monitoring"}}}]
