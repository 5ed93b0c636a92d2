"""The Kubernetes manifests (k8s/base and its overlays), rendered by the kustomize subset: schemas, probes, drain,
security, settings, the GPU and Triton overlays, NetworkPolicy/HPA/PDB."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess

import jsonschema
import pytest
import yaml

from carve3d_reward.service.settings import ServiceSettings
from carve3d_reward.settings import MetricSettings

from .deploy.common import K8S_VERSIONS, ROOT, SERVICEMONITOR_SCHEMA, TRITON_MODEL_REPOSITORY, tool
from .deploy.kustomize import BUILTIN_API_VERSIONS, VARIANTS, containers, rendered, resource


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_manifests_pass_kubernetes_validate_strict(variant, tmp_path) -> None:
    docs = [r for r in rendered(variant) if r["apiVersion"] in BUILTIN_API_VERSIONS]
    crds = [r for r in rendered(variant) if r["apiVersion"] not in BUILTIN_API_VERSIONS]
    assert {r["kind"] for r in crds} == {"ServiceMonitor"}, "a custom resource without a vendored schema"
    path = tmp_path / f"{variant}.yaml"
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    for version in K8S_VERSIONS:
        out = subprocess.run(
            [tool("kubernetes-validate"), "--strict", "--quiet", "-k", version, str(path)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0 and "ERROR" not in out.stdout + out.stderr, out.stdout + out.stderr


@pytest.mark.slow
def test_kubernetes_validate_strict_catches_a_bad_field(tmp_path) -> None:
    """A negative control: the strict schemas reject an unknown field, so the test above can fail."""
    deployment = resource("gpu", "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {"httpGet": {"path": "/healthz"}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(deployment))
    out = subprocess.run([tool("kubernetes-validate"), "--strict", str(path)], capture_output=True, text=True)
    assert out.returncode != 0 and "livenesProbe" in out.stdout + out.stderr


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_servicemonitor_matches_the_vendored_schema(variant) -> None:
    schema = json.loads(SERVICEMONITOR_SCHEMA.read_text())
    validator = jsonschema.Draft202012Validator(schema)
    monitor = resource(variant, "ServiceMonitor")
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(monitor)]
    assert not errors, errors
    bad = copy.deepcopy(monitor)
    bad["spec"]["endpoints"][0]["intervall"] = "15s"
    assert not validator.is_valid(bad)
    # it scrapes the Service's named ports
    ports = {p["name"] for p in resource(variant, "Service")["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= ports
    service_labels = resource(variant, "Service")["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service_labels.items()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_deployment_probes_drain_and_security(variant) -> None:
    deployment = resource(variant, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    reward = containers(variant)["reward"]
    config = resource(variant, "ConfigMap", "mrc-config")["data"]
    assert reward["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert reward["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert reward["livenessProbe"]["httpGet"]["path"] == "/healthz"
    startup = reward["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "a slow model load needs >= 10 min"
    assert reward["ports"][0]["containerPort"] == int(config["MRC_PORT"])
    assert reward["args"] == ["mrc", "serve", "--host", "0.0.0.0"]
    # SIGTERM comes after the preStop sleep; the drain must finish before the grace period ends
    pre_stop = reward["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] > float(config["MRC_DRAIN_TIMEOUT_S"]) + float(pre_stop[1])
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert reward["securityContext"]["allowPrivilegeEscalation"] is False
    # settings from the ConfigMap, the token from the Secret
    assert {"configMapRef": {"name": "mrc-config"}} in reward["envFrom"]
    token = next(e for e in reward["env"] if e["name"] == "MRC_AUTH_TOKEN")
    assert token["valueFrom"]["secretKeyRef"] == {"name": "mrc-auth", "key": "MRC_AUTH_TOKEN"}
    assert "MRC_AUTH_TOKEN" in resource(variant, "Secret", "mrc-auth")["stringData"]
    # weights: the init container fetches into the PVC, the server reads it
    fetch = containers(variant)["fetch-weights"]
    assert {"name": "FETCH_WEIGHTS", "value": "auto"} in fetch["env"]
    assert fetch["image"] == reward["image"]
    claim = next(v for v in pod["volumes"] if v["name"] == "weights")["persistentVolumeClaim"]["claimName"]
    assert resource(variant, "PersistentVolumeClaim", claim)
    assert {"name": "weights", "mountPath": "/cache", "readOnly": True} in reward["volumeMounts"]
    assert config["TORCH_HOME"] == "/cache/torch" and config["HF_HOME"] == "/cache/hf"
    for c in containers(variant).values():
        assert ":latest" not in c["image"] and re.search(r":\d[\w.-]*$|@sha256:", c["image"]), c["image"]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_configmap_keys_are_service_settings(variant, monkeypatch) -> None:
    """Every MRC_* key is a ServiceSettings / MetricSettings field, and the values parse."""
    data = resource(variant, "ConfigMap", "mrc-config")["data"]
    fields = set(ServiceSettings.model_fields) | set(MetricSettings.model_fields)
    keys = {k for k in data if k.startswith("MRC_")}
    assert {k[4:].lower() for k in keys} <= fields, sorted(k for k in keys if k[4:].lower() not in fields)
    assert set(data) - keys <= {"TORCH_HOME", "HF_HOME"}
    for name in list(os.environ):
        if name.startswith("MRC_"):
            monkeypatch.delenv(name)
    for k, v in data.items():
        monkeypatch.setenv(k, v)
    settings = ServiceSettings()
    assert settings.port == int(data["MRC_PORT"]) and settings.drain_timeout_s == float(data["MRC_DRAIN_TIMEOUT_S"])
    assert settings.metric.device == data["MRC_DEVICE"]
    assert settings.engine == ("triton" if variant == "triton" else "inprocess")


def test_gpu_overlay_takes_a_gpu() -> None:
    pod = resource("gpu", "Deployment")["spec"]["template"]["spec"]
    reward = containers("gpu")["reward"]
    assert reward["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert resource("gpu", "ConfigMap")["data"]["MRC_DEVICE"] == "cuda"
    assert not reward["image"].endswith("-cpu")
    for variant in ("base", "cpu"):
        assert "nvidia.com/gpu" not in json.dumps(resource(variant, "Deployment"))
        assert resource(variant, "ConfigMap")["data"]["MRC_DEVICE"] == "cpu"


def test_triton_overlay_runs_tritonserver_next_to_the_gateway() -> None:
    cs = containers("triton")
    triton = cs["triton"]
    assert triton["image"].startswith("carve3d/mrc-triton:") and triton["restartPolicy"] == "Always"
    assert "--model-repository=/models" in triton["args"] and "--metrics-port=8002" in triton["args"]
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert TRITON_MODEL_REPOSITORY in " ".join(cs["copy-model-repository"]["args"])
    spec = resource("triton", "Deployment")["spec"]["template"]["spec"]
    names = [c["name"] for c in spec["initContainers"]]
    assert names.index("copy-model-repository") < names.index("triton"), "the repository is copied first"
    assert names.index("triton") < names.index("fetch-weights"), "the sidecar is up before the gateway starts"
    assert "nvidia.com/gpu" not in json.dumps(cs["reward"]["resources"]), "the gateway needs no GPU"
    data = resource("triton", "ConfigMap")["data"]
    assert data["MRC_ENGINE"] == "triton" and data["MRC_TRITON_URL"] == "127.0.0.1:8001"
    service_ports = {p["name"]: p["port"] for p in resource("triton", "Service")["spec"]["ports"]}
    assert service_ports == {"http": 8080, "triton-metrics": 8002}
    assert {e["port"] for e in resource("triton", "ServiceMonitor")["spec"]["endpoints"]} == {"http", "triton-metrics"}
    monitoring = resource("triton", "NetworkPolicy")["spec"]["ingress"][1]
    assert {p["port"] for p in monitoring["ports"]} == {8080, 8002}
    # Compose runs the same image with the same repository
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert compose["services"]["triton"]["image"] == triton["image"]
    assert f"COPY {TRITON_MODEL_REPOSITORY} /models" in (ROOT / "docker" / "triton.Dockerfile").read_text()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_networkpolicy_hpa_pdb(variant) -> None:
    labels = resource(variant, "Deployment")["spec"]["template"]["metadata"]["labels"]
    port = int(resource(variant, "ConfigMap")["data"]["MRC_PORT"])
    policy = resource(variant, "NetworkPolicy")["spec"]
    assert policy["policyTypes"] == ["Ingress"] and policy["podSelector"]["matchLabels"].items() <= labels.items()
    clients, monitoring = policy["ingress"]
    assert clients["from"] == [{"podSelector": {"matchLabels": {"carve3d.io/mrc-client": "true"}}}]
    assert clients["ports"] == [{"port": port, "protocol": "TCP"}]
    assert monitoring["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    assert {"port": port, "protocol": "TCP"} in monitoring["ports"]
    hpa = resource(variant, "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "mrc-reward"}
    assert [m["pods"]["metric"]["name"] for m in hpa["metrics"] if m["type"] == "Pods"] == ["mrc_queue_depth"]
    assert 1 <= hpa["minReplicas"] <= hpa["maxReplicas"]
    pdb = resource(variant, "PodDisruptionBudget")["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items() and "maxUnavailable" in pdb
