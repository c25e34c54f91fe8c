"""deploy/k8s: every built-in resource validates strictly (kubernetes-validate --strict, which
rejects unknown fields) against the Kubernetes schemas; the PodMonitor, a CRD whose schema
kubernetes-validate does not ship, against a hand-written subset of the prometheus-operator
schema; and the manifests agree with each other and with the server (names, labels, ports,
probes, the drain, the autoscaling metric)."""

from __future__ import annotations

import re
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
DRAIN_TIMEOUT_S = 30          # the server's default SIGTERM drain (server CLI)
K8S_VERSION = "1.30.0"        # lifecycle.preStop.sleep needs >= 1.30; validate at the floor


def resources() -> dict[str, dict]:
    """kind -> resource, for every manifest listed in kustomization.yaml."""
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    out = {}
    for name in kust["resources"]:
        for doc in yaml.safe_load_all((K8S / name).read_text()):
            assert doc["kind"] not in out, f"two {doc['kind']}s"
            out[doc["kind"]] = doc
    return out


def test_kustomization_lists_every_manifest():
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kust["resources"]) == on_disk


BUILTIN = ["Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler", "ConfigMap"]


@pytest.mark.parametrize("kind", BUILTIN)
@pytest.mark.parametrize("version", [K8S_VERSION, kubernetes_validate.latest_version()])
def test_builtin_resources_validate_strictly(kind, version):
    kubernetes_validate.validate(resources()[kind], version, strict=True)


# The fields of monitoring.coreos.com/v1 PodMonitor that these manifests use, with the CRD's
# types and required keys; additionalProperties=false catches typos as --strict does.
PODMONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PodMonitor"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object", "additionalProperties": False,
            "required": ["selector", "podMetricsEndpoints"],
            "properties": {
                "selector": {"type": "object", "additionalProperties": False, "properties": {
                    "matchLabels": {"type": "object",
                                    "additionalProperties": {"type": "string"}}}},
                "namespaceSelector": {"type": "object"},
                "jobLabel": {"type": "string"},
                "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False,
                    "properties": {
                        "port": {"type": "string"}, "path": {"type": "string"},
                        "scheme": {"enum": ["http", "https"]},
                        "interval": {"type": "string", "pattern": r"^(\d+(ms|s|m|h))+$"},
                        "scrapeTimeout": {"type": "string"},
                        "relabelings": {"type": "array"},
                        "metricRelabelings": {"type": "array"}}}}}}},
}


def test_podmonitor_structure():
    jsonschema.validate(resources()["PodMonitor"], PODMONITOR_SCHEMA)


def pod_labels(res) -> dict:
    return res["Deployment"]["spec"]["template"]["metadata"]["labels"]


def test_selectors_match_the_pods():
    res = resources()
    labels = pod_labels(res)
    for kind, selector in [
        ("Deployment", res["Deployment"]["spec"]["selector"]["matchLabels"]),
        ("Service", res["Service"]["spec"]["selector"]),
        ("PodDisruptionBudget", res["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"]),
        ("PodMonitor", res["PodMonitor"]["spec"]["selector"]["matchLabels"]),
    ]:
        assert selector.items() <= labels.items(), f"{kind} selects {selector}, pods are {labels}"


def container(res) -> dict:
    (c,) = res["Deployment"]["spec"]["template"]["spec"]["containers"]
    return c


def test_gpu_ports_and_probes():
    res = resources()
    c = container(res)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    port_names = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert port_names == {"http": 8000}
    assert "--port=8000" in c["args"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    assert res["Service"]["spec"]["ports"][0]["targetPort"] == "http"
    endpoint = res["PodMonitor"]["spec"]["podMetricsEndpoints"][0]
    assert (endpoint["port"], endpoint["path"]) == ("http", "/metrics")


def test_termination_grace_covers_prestop_and_drain():
    res = resources()
    pre_stop = container(res)["lifecycle"]["preStop"]["sleep"]["seconds"]
    grace = res["Deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    # The grace period starts with preStop; SIGTERM (and the drain) only after it.
    assert grace >= pre_stop + DRAIN_TIMEOUT_S
    assert grace <= pre_stop + DRAIN_TIMEOUT_S + 15, "needlessly slow rollouts"


def test_pdb_leaves_capacity():
    res = resources()
    assert res["PodDisruptionBudget"]["spec"]["maxUnavailable"] < res["HorizontalPodAutoscaler"][
        "spec"]["minReplicas"]


def documented_metrics() -> set[str]:
    return set(re.findall(r"`(itt_[a-z0-9_]+)`", (REPO / "docs" / "metrics.md").read_text()))


def test_hpa_metric_is_served_by_the_adapter_rule():
    res = resources()
    hpa = res["HorizontalPodAutoscaler"]["spec"]
    target = hpa["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", res["Deployment"]["metadata"]["name"])
    (metric,) = hpa["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    assert name in documented_metrics()
    rules = yaml.safe_load(res["ConfigMap"]["data"]["config.yaml"])["rules"]
    exposed = {}
    for rule in rules:
        series = re.match(r"[a-z_:]+", rule["seriesQuery"]).group(0)
        assert series in documented_metrics()
        assert re.fullmatch(rule["name"]["matches"].strip("^$"), series)
        assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
        assert {"<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"} <= set(
            re.findall(r"<<\.\w+>>", rule["metricsQuery"]))
        exposed[rule["name"]["as"]] = series
    assert name in exposed
