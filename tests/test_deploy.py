"""Deployment artefacts: docker-compose.yml, k8s/, the Dockerfiles, Prometheus/Grafana config, `make up`/`make down`.

Everything runs offline with the dev extra's validators: ``check-jsonschema`` (the vendored compose spec),
``kubernetes-validate --strict`` (vendored Kubernetes schemas), ``dockerfile-parse``. The Kubernetes overlays
are rendered by the small kustomize subset below (resources, strategic-merge patches, images, namespace) and,
where a ``kustomize`` or ``kubectl`` binary is installed, compared with its rendering. Nothing here builds or
runs a container image: there is no Docker engine on CI's machines.
"""

from __future__ import annotations

import copy
import importlib.util
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import yaml
from PIL import Image

from carve3d_reward.model import MRCModel
from carve3d_reward.service.app import create_app
from carve3d_reward.service.metrics import ServiceMetrics
from carve3d_reward.service.settings import ServiceSettings
from carve3d_reward.settings import MetricSettings

from .serving import free_port, serve_app

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
K8S = ROOT / "k8s"
VARIANTS = {
    "base": K8S / "base",
    "cpu": K8S / "overlays" / "cpu",
    "gpu": K8S / "overlays" / "gpu",
    "triton": K8S / "overlays" / "triton",
}
DOCKERFILES = {
    "reward": ROOT / "docker" / "reward.Dockerfile",
    "reward-cpu": ROOT / "docker" / "reward-cpu.Dockerfile",
    "trainer": ROOT / "docker" / "trainer.Dockerfile",
}
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "mrc.json"
SERVICEMONITOR_SCHEMA = K8S / "schemas" / "servicemonitor-monitoring.coreos.com-v1.json"
TRITON_MODEL_REPOSITORY = "services/reward/triton/model_repository"
#: Kubernetes versions the manifests must validate against: 1.29 is the first with native sidecars on by default.
K8S_VERSIONS = ("1.29.0", "1.37.0")
SMALL_METRIC = MetricSettings(view_size=64, carve_resolution=32, carve_samples=64)


def _load_module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


mrc_local = _load_module("mrc_local", ROOT / "deploy" / "local" / "mrc_local.py")


def tool(name: str) -> str:
    """A console script of the venv (the dev extra installs the validators); missing = a failed test, not a skip."""
    path = BIN / name
    if not path.exists():
        pytest.fail(f"{path} is missing: install the dev extra (pip install -e 'services/reward[dev]')")
    return str(path)


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def png_bytes(size: int = 64) -> bytes:
    from carve3d_reward.grid import to_uint8_image
    from carve3d_reward.synthetic import make_grids

    buf = io.BytesIO()
    Image.fromarray(to_uint8_image(make_grids(1, seed=3, view_size=size)[0])).save(buf, format="PNG")
    return buf.getvalue()


# =====================================================================================================================
# A kustomize subset: enough for k8s/ (and it refuses anything else rather than rendering it wrongly)
# =====================================================================================================================
class UnsupportedKustomization(Exception):
    pass


_KUSTOMIZATION_KEYS = {"apiVersion", "kind", "namespace", "resources", "patches", "images"}
_CLUSTER_SCOPED = {"Namespace", "PersistentVolume", "StorageClass", "ClusterRole", "ClusterRoleBinding",
                   "CustomResourceDefinition", "PriorityClass", "IngressClass"}  # fmt: skip
_BUILTIN_API_VERSIONS = {"v1", "apps/v1", "batch/v1", "autoscaling/v2", "policy/v1", "networking.k8s.io/v1"}
#: Strategic-merge keys of the built-in lists k8s/ patches (from the Kubernetes API's patchMergeKey); every
#: other list is replaced whole, as it is for lists without a merge key and for custom resources.
_MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "imagePullSecrets": "name",
}


def _merge_key(kind: str, path: tuple[str, ...], key: str) -> str | None:
    if key == "ports":
        if kind == "Service" and path == ("spec",):
            return "port"
        if path and path[-1] in ("containers", "initContainers"):
            return "containerPort"
    return _MERGE_KEYS.get(key)


def _strategic_merge(dst: Any, patch: Any, kind: str, builtin: bool, path: tuple[str, ...] = ()) -> Any:
    if isinstance(patch, dict):
        if any(k.startswith("$") for k in patch):
            raise UnsupportedKustomization(f"patch directive {sorted(k for k in patch if k.startswith('$'))}")
        if not isinstance(dst, dict):
            return copy.deepcopy(patch)
        out = dict(dst)
        for key, value in patch.items():
            if value is None:
                out.pop(key, None)
                continue
            if isinstance(value, list) and isinstance(out.get(key), list):
                mkey = _merge_key(kind, path, key) if builtin else None
                out[key] = (
                    _merge_list(out[key], value, mkey, kind, builtin, (*path, key)) if mkey else copy.deepcopy(value)
                )
            else:
                out[key] = _strategic_merge(out.get(key), value, kind, builtin, (*path, key))
        return out
    return copy.deepcopy(patch)


def _merge_list(dst: list, patch: list, mkey: str, kind: str, builtin: bool, path: tuple[str, ...]) -> list:
    """Items of ``patch`` merged into the ``dst`` items with the same key; new items come first, in patch order
    (what kustomize does)."""
    out = [copy.deepcopy(x) for x in dst]
    new = []
    for item in patch:
        if not isinstance(item, dict) or mkey not in item:
            raise UnsupportedKustomization(f"list item without merge key {mkey!r} at {'.'.join(path)}")
        for i, existing in enumerate(out):
            if isinstance(existing, dict) and existing.get(mkey) == item[mkey]:
                out[i] = _strategic_merge(existing, item, kind, builtin, (*path, str(i)))
                break
        else:
            new.append(copy.deepcopy(item))
    return new + out


def _pod_specs(resource: dict) -> list[dict]:
    spec = resource.get("spec", {})
    if resource.get("kind") == "Pod":
        return [spec]
    if "jobTemplate" in spec:
        return [spec["jobTemplate"].get("spec", {}).get("template", {}).get("spec", {})]
    if "template" in spec and isinstance(spec["template"].get("spec"), dict):
        return [spec["template"]["spec"]]
    return []


def _split_image(image: str) -> tuple[str, str, str]:
    """(name, tag, digest) of an image reference."""
    name, _, digest = image.partition("@")
    tag = ""
    if ":" in name.rsplit("/", 1)[-1]:
        name, tag = name.rsplit(":", 1)
    return name, tag, digest


def _set_images(resources: list[dict], images: list[dict]) -> None:
    for res in resources:
        for pod in _pod_specs(res):
            for field in ("initContainers", "containers"):
                for c in pod.get(field, []):
                    name, tag, digest = _split_image(c["image"])
                    for entry in images:
                        if entry["name"] != name:
                            continue
                        name = entry.get("newName", name)
                        if "digest" in entry:
                            tag, digest = "", entry["digest"]
                        elif "newTag" in entry:
                            tag, digest = str(entry["newTag"]), ""
                        c["image"] = name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")


def render_kustomization(directory: Path) -> list[dict]:
    """Build ``directory``'s kustomization (the subset above) into a list of resources."""
    kfile = directory / "kustomization.yaml"
    kustomization = yaml.safe_load(kfile.read_text())
    unknown = set(kustomization) - _KUSTOMIZATION_KEYS
    if unknown:
        raise UnsupportedKustomization(f"{kfile}: {sorted(unknown)} (supported: {sorted(_KUSTOMIZATION_KEYS)})")
    resources: list[dict] = []
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        resources.extend(render_kustomization(path) if path.is_dir() else load_yaml_docs(path))
    for entry in kustomization.get("patches", []):
        if set(entry) != {"path"}:
            raise UnsupportedKustomization(f"{kfile}: patch {entry} (only 'path' to a strategic-merge patch)")
        patch = yaml.safe_load((directory / entry["path"]).read_text())
        if not isinstance(patch, dict) or "kind" not in patch:
            raise UnsupportedKustomization(f"{kfile}: {entry['path']} is not a strategic-merge patch")
        targets = [
            i
            for i, r in enumerate(resources)
            if r["kind"] == patch["kind"]
            and r["metadata"]["name"] == patch["metadata"]["name"]
            and r["apiVersion"].split("/")[0] == patch["apiVersion"].split("/")[0]
        ]
        assert len(targets) == 1, f"{entry['path']} matches {len(targets)} resources"
        target = resources[targets[0]]
        builtin = target["apiVersion"] in _BUILTIN_API_VERSIONS
        resources[targets[0]] = _strategic_merge(target, patch, target["kind"], builtin)
    _set_images(resources, kustomization.get("images", []))
    if "namespace" in kustomization:
        for r in resources:
            if r["kind"] not in _CLUSTER_SCOPED:
                r["metadata"]["namespace"] = kustomization["namespace"]
    return resources


@cache
def rendered(variant: str) -> tuple[dict, ...]:
    return tuple(render_kustomization(VARIANTS[variant]))


def resource(variant: str, kind: str, name: str | None = None) -> dict:
    found = [r for r in rendered(variant) if r["kind"] == kind and (name is None or r["metadata"]["name"] == name)]
    assert len(found) == 1, f"{variant}: {len(found)} {kind} resources named {name}"
    return copy.deepcopy(found[0])


def containers(variant: str) -> dict[str, dict]:
    spec = resource(variant, "Deployment")["spec"]["template"]["spec"]
    return {c["name"]: c for c in spec.get("initContainers", []) + spec["containers"]}


def _external_kustomize() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        probe = subprocess.run(["kubectl", "kustomize", "--help"], capture_output=True, timeout=60)
        if probe.returncode == 0:
            return ["kubectl", "kustomize"]
    return None


def test_kustomize_subset_refuses_what_it_does_not_implement(tmp_path) -> None:
    (tmp_path / "kustomization.yaml").write_text("configMapGenerator:\n  - name: x\n    literals: [a=b]\n")
    with pytest.raises(UnsupportedKustomization, match="configMapGenerator"):
        render_kustomization(tmp_path)
    (tmp_path / "kustomization.yaml").write_text("patches:\n  - path: p.yaml\n    target: {kind: Deployment}\n")
    with pytest.raises(UnsupportedKustomization, match="only 'path'"):
        render_kustomization(tmp_path)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_subset_rendering_matches_a_real_kustomize(variant) -> None:
    command = _external_kustomize()
    if command is None:
        pytest.skip("no kustomize or kubectl binary here: the overlays were rendered by the Python subset only")
    out = subprocess.run([*command, str(VARIANTS[variant])], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr

    def key(r: dict) -> tuple[str, str, str]:
        return r["kind"], r["metadata"].get("namespace", ""), r["metadata"]["name"]

    theirs = {key(r): r for r in yaml.safe_load_all(out.stdout) if r}
    ours = {key(r): r for r in rendered(variant)}
    assert sorted(theirs) == sorted(ours)
    for k, r in ours.items():
        assert r == theirs[k], f"{variant}: {k} differs from `{' '.join(command)}`"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_manifests_pass_kubernetes_validate_strict(variant, tmp_path) -> None:
    docs = [r for r in rendered(variant) if r["apiVersion"] in _BUILTIN_API_VERSIONS]
    crds = [r for r in rendered(variant) if r["apiVersion"] not in _BUILTIN_API_VERSIONS]
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


def test_prometheus_adapter_serves_the_hpa_metric() -> None:
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus-adapter-rules.yaml").read_text())["rules"]
    served = {r["name"]["as"] for r in rules}
    for variant in VARIANTS:
        hpa = resource(variant, "HorizontalPodAutoscaler")["spec"]
        assert {m["pods"]["metric"]["name"] for m in hpa["metrics"]} <= served
    declared, _ = mrc_local.exported_names(_metrics_text(ServiceMetrics()))
    for rule in rules:
        series = re.match(r"([a-zA-Z_:][\w:]*)\{", rule["seriesQuery"]).group(1)
        assert series in declared, f"{series} is not a metric of the service"
        assert re.fullmatch(rule["name"]["matches"], series)
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
        assert "<<.Series>>" in rule["metricsQuery"] and "<<.LabelMatchers>>" in rule["metricsQuery"]
    assert "deploy/prometheus-adapter-rules.yaml" in (ROOT / "docs" / "deploy.md").read_text()


def _metrics_text(metrics: ServiceMetrics) -> str:
    from prometheus_client import generate_latest

    return generate_latest(metrics.registry).decode()


# =====================================================================================================================
# docker-compose.yml, Prometheus, Grafana
# =====================================================================================================================
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_passes_the_compose_spec_schema(tmp_path) -> None:
    check = [tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec"]
    out = subprocess.run([*check, str(ROOT / "docker-compose.yml")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    bad = compose()  # a negative control: an unknown key must fail
    bad["services"]["reward"]["healthcheck"]["startperiod"] = "5s"
    (tmp_path / "bad.yml").write_text(yaml.safe_dump(bad))
    out = subprocess.run([*check, str(tmp_path / "bad.yml")], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0, "check-jsonschema accepted an unknown key"


def test_compose_services() -> None:
    c = compose()
    services = c["services"]
    assert {"reward", "reward-cpu", "trainer", "triton", "prometheus", "grafana"} <= set(services)
    gpu, cpu = services["reward"], services["reward-cpu"]
    # GPU reservation on the GPU service only; profiles keep `--profile cpu` from starting a GPU container
    device = gpu["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert "deploy" not in cpu and "gpus" not in cpu
    assert gpu["profiles"] == ["gpu"] and cpu["profiles"] == ["cpu"] and services["trainer"]["profiles"] == ["trainer"]
    assert "profiles" not in services["prometheus"] and "profiles" not in services["grafana"]
    for name, svc in (("reward", gpu), ("reward-cpu", cpu)):
        assert (ROOT / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file()
        assert "mrc-healthcheck" in " ".join(svc["healthcheck"]["test"]), name
        assert "mrc-cache:/cache" in svc["volumes"]
        assert svc["networks"]["default"]["aliases"] == ["reward"]
        env = svc["environment"]
        assert env["MRC_HOST"] == "0.0.0.0" and env["MRC_DEVICE"] == ("cuda" if name == "reward" else "cpu")
        fields = set(ServiceSettings.model_fields) | set(MetricSettings.model_fields)
        assert {k[4:].lower() for k in env if k.startswith("MRC_")} <= fields
        assert _seconds(svc["stop_grace_period"]) > float(env["MRC_DRAIN_TIMEOUT_S"])
        assert all(p.startswith("127.0.0.1:") for p in svc["ports"])
    assert "/readyz" in (ROOT / "docker" / "healthcheck.py").read_text()
    trainer = services["trainer"]
    assert trainer["environment"]["MRC_URL"] == "http://reward:8080" and "MRC_AUTH_TOKEN" in trainer["environment"]
    for dep in ("reward", "reward-cpu"):
        assert trainer["depends_on"][dep] == {"condition": "service_healthy", "required": False}
    # bind-mounted config exists (the Triton model repository is written with the Triton engine)
    for svc in services.values():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./") and TRITON_MODEL_REPOSITORY not in source:
                assert (ROOT / source).exists(), source


def _seconds(duration: str) -> float:
    m = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", duration)
    assert m, duration
    return int(m.group(1) or 0) * 60 + int(m.group(2) or 0)


def test_prometheus_scrapes_the_service_and_triton() -> None:
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    targets = {j: [t for sc in job["static_configs"] for t in sc["targets"]] for j, job in jobs.items()}
    assert targets["mrc-reward"] == ["reward:8080"] and jobs["mrc-reward"]["metrics_path"] == "/metrics"
    assert targets["triton"] == ["triton:8002", "reward:8002"]
    services = compose()["services"]
    assert "--metrics-port=8002" in (ROOT / "docker" / "triton.Dockerfile").read_text()  # the image's CMD
    mount = next(v for v in services["prometheus"]["volumes"] if v.startswith("./deploy/prometheus/prometheus.yml:"))
    assert mount.split(":")[1] in services["prometheus"]["command"][0]


def test_grafana_provisioning_points_at_the_dashboard() -> None:
    prov = ROOT / "deploy" / "grafana" / "provisioning"
    datasource = yaml.safe_load((prov / "datasources" / "prometheus.yaml").read_text())["datasources"][0]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((prov / "dashboards" / "mrc.yaml").read_text())["providers"][0]
    volumes = compose()["services"]["grafana"]["volumes"]
    assert f"./deploy/grafana/dashboards:{provider['options']['path']}:ro" in volumes
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in volumes
    dashboard = json.loads(DASHBOARD.read_text())
    ds_var = next(v for v in dashboard["templating"]["list"] if v["type"] == "datasource")
    assert ds_var["query"] == "prometheus" and ds_var["current"]["value"] == datasource["uid"]


def test_dashboard_panels() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    exprs = mrc_local.dashboard_queries(dashboard)
    text = "\n".join(exprs)
    for p in panels:
        assert p["targets"] and all(t["expr"] and t["datasource"]["uid"] == "${datasource}" for t in p["targets"])
        assert {"x", "y", "w", "h"} <= set(p["gridPos"])
    assert re.search(r"histogram_quantile\(0\.99, sum by \(le\) \(rate\(mrc_request_duration_seconds_bucket", text)
    assert "sum by (code) (rate(mrc_requests_total" in text
    assert "sum by (status) (rate(mrc_grids_scored_total" in text
    assert "mrc_batch_size_bucket" in text and "mrc_queue_depth" in text
    names = mrc_local.dashboard_metric_names(DASHBOARD)
    assert names and all(n.startswith("mrc_") for n in names), names


def test_promql_name_extraction() -> None:
    f = mrc_local.promql_metric_names
    assert f('histogram_quantile(0.9, sum by (le) (rate(a_bucket{x="y",job=~"$job"}[$__rate_interval])))') == {
        "a_bucket"
    }
    joined = "sum(rate(b_total[5m] offset 1h)) / on(instance) group_left(v) c_info or vector(0)"
    assert f(joined) == {"b_total", "c_info"}
    assert f("label_values(mrc_build_info, job)") == {"mrc_build_info"}
    assert f('count(d{le="+Inf"}) > 1e3') == {"d"}


# =====================================================================================================================
# The live service: the dashboard's metrics, the container health check
# =====================================================================================================================
TOKEN = "deploy-test-token"


@pytest.fixture(scope="module")
def live() -> str:
    """The real app over HTTP with a small metric, a token required on health (not on /metrics)."""
    settings = ServiceSettings(metric=SMALL_METRIC, auth_token=TOKEN, open_health=False, max_delay_ms=1)
    with serve_app(create_app(settings, model=MRCModel(SMALL_METRIC))) as url:
        yield url


def test_every_dashboard_metric_is_in_live_metrics(live) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    r = httpx.post(live + "/mrc", content=png_bytes(), headers={"content-type": "image/png", **auth}, timeout=120)
    assert r.status_code == 200 and r.json()["status"] == "ok", r.text
    text = httpx.get(live + "/metrics", timeout=30).text
    _, sampled = mrc_local.exported_names(text)  # prometheus_client's parser of the text format
    wanted = mrc_local.dashboard_metric_names(DASHBOARD)
    assert wanted - sampled == set(), f"dashboard metrics without samples in /metrics: {sorted(wanted - sampled)}"
    assert mrc_local.scrape_check(live, DASHBOARD, declared_only=False) == 0


def _run_healthcheck(url: str, token: str | None) -> int:
    env = {k: v for k, v in os.environ.items() if k != "MRC_AUTH_TOKEN"}
    env["HEALTHCHECK_URL"] = url + "/readyz"
    if token:
        env["MRC_AUTH_TOKEN"] = token
    script = ROOT / "docker" / "healthcheck.py"
    return subprocess.run([sys.executable, str(script)], env=env, capture_output=True, timeout=30).returncode


def test_container_healthcheck_script(live) -> None:
    assert _run_healthcheck(live, TOKEN) == 0
    assert _run_healthcheck(live, None) == 1  # open_health=False: 401 without the token
    assert _run_healthcheck(f"http://127.0.0.1:{free_port()}", TOKEN) == 1  # nothing listening


# =====================================================================================================================
# Dockerfiles
# =====================================================================================================================
def dockerfile(name: str) -> list[dict]:
    from dockerfile_parse import DockerfileParser

    return [i for i in DockerfileParser(path=str(DOCKERFILES[name])).structure if i["instruction"] != "COMMENT"]


def instructions(name: str, kind: str) -> list[str]:
    return [i["value"] for i in dockerfile(name) if i["instruction"] == kind]


def makefile_torch_pin() -> str:
    m = re.search(r"^TORCH\s*\??=\s*(.+?)\s*$", (ROOT / "Makefile").read_text(), re.M)
    assert m, "the Makefile has no TORCH pin"
    return m.group(1)


def dockerignored(path: str) -> bool:
    """Does .dockerignore exclude ``path`` (relative to the context)? Docker's rules for the patterns used here."""
    excluded = False
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        rx = re.escape(pattern).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        rx = rx.replace(r"\?", "[^/]").replace(r"\[cod\]", "[cod]")
        parts = path.strip("/").split("/")
        if any(re.fullmatch(rx, "/".join(parts[: i + 1])) for i in range(len(parts))):
            excluded = not negate
    return excluded


@pytest.mark.parametrize("name", list(DOCKERFILES))
def test_dockerfile_basics(name) -> None:
    froms = instructions(name, "FROM")
    assert len(froms) == 1
    image = froms[0].split()[0]
    ref, _, digest = image.partition("@")
    tag = ref.rsplit(":", 1)[1] if ":" in ref.rsplit("/", 1)[-1] else ""
    assert tag and tag != "latest" and re.match(r"\d+\.\d+\.\d+", tag), f"base not pinned to an exact version: {image}"
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest), f"base not pinned by digest: {image}"
    user = instructions(name, "USER")[-1].split(":")[0]
    assert user not in ("root", "0") and user.isdigit(), f"runs as {user!r}"
    # the user comes after everything that needs root
    kinds = [i["instruction"] for i in dockerfile(name)]
    assert "RUN" not in kinds[kinds.index("USER") :]
    args = dict(a.split("=", 1) for a in instructions(name, "ARG"))
    assert args["TORCH"].strip('"') == makefile_torch_pin(), "keep the torch pin equal to the Makefile's"
    env = " ".join(instructions(name, "ENV"))
    assert "TORCH_HOME=/cache/torch" in env and "HF_HOME=/cache/hf" in env
    # every COPY source is in the repository and inside the build context
    for value in instructions(name, "COPY"):
        sources = [w for w in value.split() if not w.startswith("--")][:-1]
        for src in sources:
            assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
            assert not dockerignored(src), f"COPY {src}: excluded by .dockerignore"


@pytest.mark.parametrize("name", ["reward", "reward-cpu"])
def test_reward_dockerfiles(name) -> None:
    health = instructions(name, "HEALTHCHECK")
    assert len(health) == 1 and "mrc-healthcheck" in health[0] and "--start-period=" in health[0]
    assert instructions(name, "EXPOSE") == ["8080"]
    assert json.loads(instructions(name, "CMD")[-1]) == ["mrc", "serve", "--host", "0.0.0.0"]
    assert json.loads(instructions(name, "ENTRYPOINT")[-1]) == ["/usr/local/bin/mrc-entrypoint"]
    assert json.loads(instructions(name, "VOLUME")[-1]) == ["/cache"]
    args = dict(a.split("=", 1) for a in instructions(name, "ARG"))
    assert args["FETCH_WEIGHTS"] == '""', "weights are baked only when asked for with --build-arg FETCH_WEIGHTS"
    run = "\n".join(instructions(name, "RUN"))
    assert 'if [ -n "$FETCH_WEIGHTS" ]' in run and "useradd --uid 10001" in run
    if name == "reward-cpu":
        assert "python:3.11" in instructions(name, "FROM")[0] and "whl/cpu" in args["TORCH_INDEX_URL"]
    else:
        assert instructions(name, "FROM")[0].startswith("nvidia/cuda:13.0.")  # torch 2.14.1 is built for CUDA 13.0


def test_trainer_dockerfile_installs_the_trainer_when_present() -> None:
    run = "\n".join(instructions("trainer", "RUN"))
    assert "if [ -f /opt/mrc/src/services/trainer/pyproject.toml ]" in run
    assert "pip install /opt/mrc/src/services/reward" in run
    assert json.loads(instructions("trainer", "CMD")[-1])[:2] == ["carve3d-train", "train"]


def test_dockerignore_keeps_local_state_out() -> None:
    for path in (".venv", ".git", "out/demo/x.png", "services/reward/carve3d_reward/__pycache__/a.pyc",
                 "services/reward/carve3d_reward.egg-info", ".pytest_cache", ".ruff_cache"):  # fmt: skip
        assert dockerignored(path), path
    for path in ("services/reward/pyproject.toml", "services/reward/carve3d_reward/cli.py", "docker/entrypoint.sh"):
        assert not dockerignored(path), path


def test_the_image_install_step_builds_the_package(tmp_path) -> None:
    """Stage services/reward as the Dockerfile's COPY does (.dockerignore applied, no README.md beside it) and
    build it the way `pip install` in the image does, minus the network (no dependencies, no build isolation)."""
    src = tmp_path / "opt" / "mrc" / "src" / "services" / "reward"
    for path in (ROOT / "services" / "reward").rglob("*"):
        rel = path.relative_to(ROOT).as_posix()
        if path.is_file() and not dockerignored(rel):
            dest = src / path.relative_to(ROOT / "services" / "reward")
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest)
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    out = subprocess.run(
        [*pip_wheel, "-w", str(tmp_path / "w"), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    (wheel,) = (tmp_path / "w").glob("carve3d_reward-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "carve3d_reward/service/app.py" in names and "carve3d_reward/cli.py" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "mrc = carve3d_reward.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


# -- the entrypoint: what it fetches, decided without a network ------------------------------------------------------
@pytest.fixture
def fake_mrc(tmp_path) -> tuple[Path, dict[str, str]]:
    """A PATH whose `mrc` records its arguments instead of downloading."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "mrc.log"
    (bindir / "mrc").write_text(f'#!/bin/sh\necho "$*" >> {log}\n')
    (bindir / "mrc").chmod(0o755)
    env = {
        "PATH": f"{bindir}:/usr/bin:/bin",
        "TORCH_HOME": str(tmp_path / "cache" / "torch"),
        "MRC_BAKED_WEIGHTS": str(tmp_path / "baked"),
    }
    return log, env


def _entrypoint(env: dict[str, str], *command: str) -> subprocess.CompletedProcess:
    script = ROOT / "docker" / "entrypoint.sh"
    return subprocess.run(["sh", str(script), *command], env=env, capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize(
    ("extra", "fetched"),
    [
        ({}, []),
        ({"MRC_DISTANCE": "ssim"}, []),
        ({"MRC_DISTANCE": "lpips-alex"}, ["weights fetch --lpips alex"]),
        ({"MRC_DISTANCE": "lpips-vgg", "FETCH_WEIGHTS": "auto"}, ["weights fetch --lpips vgg"]),
        ({"MRC_DISTANCE": "lpips-alex", "MRC_LPIPS_TRUNK_PATH": "/w/alex.pth"}, []),
        ({"MRC_DISTANCE": "lpips-alex", "FETCH_WEIGHTS": "none"}, []),
        ({"FETCH_WEIGHTS": "lpips-alex,lpips-vgg"}, ["weights fetch --lpips alex", "weights fetch --lpips vgg"]),
        (
            {"MRC_RECONSTRUCTOR": "lrm", "MRC_DISTANCE": "lpips-alex"},
            ["weights fetch --lpips alex", "weights fetch --lrm instant-nerf-large"],
        ),
        (
            {"MRC_RECONSTRUCTOR": "lrm", "MRC_LRM_PRESET": "instant-nerf-base"},
            ["weights fetch --lrm instant-nerf-base"],
        ),
        ({"MRC_RECONSTRUCTOR": "lrm", "MRC_LRM_CHECKPOINT": "/w/lrm.ckpt"}, []),
    ],
)
def test_entrypoint_fetches_what_the_metric_needs(fake_mrc, extra, fetched) -> None:
    log, env = fake_mrc
    out = _entrypoint({**env, **extra}, "mrc", "serve", "--host", "0.0.0.0")
    assert out.returncode == 0, out.stderr
    assert log.read_text().splitlines() == [*fetched, "serve --host 0.0.0.0"]  # then execs the command


def test_entrypoint_rejects_unknown_weights_and_seeds_baked_ones(fake_mrc, tmp_path) -> None:
    _, env = fake_mrc
    out = _entrypoint({**env, "FETCH_WEIGHTS": "bogus"}, "true")
    assert out.returncode == 2 and "unknown entry 'bogus'" in out.stderr
    baked = tmp_path / "baked" / "hub" / "checkpoints"
    baked.mkdir(parents=True)
    (baked / "alexnet-owt-7be5be79.pth").write_bytes(b"weights")
    out = _entrypoint(env, "true")
    assert out.returncode == 0, out.stderr
    seeded = tmp_path / "cache" / "torch" / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    assert seeded.read_bytes() == b"weights"


def test_trainer_entrypoint_without_the_trainer(tmp_path) -> None:
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "MRC_URL": "http://reward:8080"}
    script = ROOT / "docker" / "trainer-entrypoint.sh"
    out = subprocess.run(["sh", str(script), "carve3d-train"], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 78 and "not installed" in out.stderr


# =====================================================================================================================
# make up / make down (no Docker)
# =====================================================================================================================
def _pgid_members(pgid: int) -> list[int]:
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def _cmdlines_with(needle: str) -> list[str]:
    found = []
    for path in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            cmd = path.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if needle in cmd and str(os.getpid()) != path.parent.name:
            found.append(f"{path.parent.name}: {cmd}")
    return found


@pytest.mark.skipif(not Path("/proc").is_dir() or shutil.which("make") is None, reason="needs Linux /proc and make")
@pytest.mark.timeout(420)
def test_make_up_score_make_down_leaves_nothing_behind(tmp_path) -> None:
    port = free_port()
    out_dir = tmp_path / "out"
    started = tmp_path / "trainer-started"
    trainer = tmp_path / "carve3d-train"
    # A stand-in trainer with a child process: `make down` must stop the whole process group.
    trainer.write_text(f'#!/usr/bin/env bash\necho "$MRC_URL $*" > {started}\nsleep 300 &\nwait\n')
    trainer.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MRC_")}
    env |= {
        "MRC_PORT": str(port),
        "MRC_VIEW_SIZE": "64",
        "MRC_CARVE_RESOLUTION": "32",
        "MRC_CARVE_SAMPLES": "64",
        "TRAINER": "on",
        "TRAINER_BIN": str(trainer),
        "TRAINER_ARGS": "--steps 1",
        "READY_TIMEOUT": "180",
        "STOP_TIMEOUT": "20",
    }
    # -o: never (re)build the venv from inside the test; VENV_BIN: the interpreter running the tests
    make = ["make", "-s", "-o", ".venv/.installed", f"OUT={out_dir}", f"BIN={BIN}"]
    pids: list[int] = []
    try:
        up = subprocess.run([*make, "up"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        assert f"curl --data-binary @{out_dir}/local/grid.png -H 'content-type: image/png'" in up.stdout
        assert f"http://127.0.0.1:{port}/mrc" in up.stdout and "scrape check: /metrics parses" in up.stdout
        pids = [int((out_dir / "local" / f"{n}.pid").read_text().split()[0]) for n in ("reward", "trainer")]
        # score a grid through it: the example grid `make up` printed, and one of ours
        url = f"http://127.0.0.1:{port}/mrc"
        for body in ((out_dir / "local" / "grid.png").read_bytes(), png_bytes()):
            r = httpx.post(url, content=body, headers={"content-type": "image/png"}, timeout=120)
            assert r.status_code == 200 and r.json()["status"] == "ok", r.text
        deadline = time.monotonic() + 10
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert started.read_text().split() == [f"http://127.0.0.1:{port}", "--steps", "1"]
        assert len(_pgid_members(pids[1])) >= 2, "the stand-in trainer and its child"
        down = subprocess.run([*make, "down"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert down.returncode == 0, down.stdout + down.stderr
        assert "reward: stopped" in down.stdout and "trainer: stopped" in down.stdout
        for pid in pids:
            assert _pgid_members(pid) == [], f"process group {pid} still has processes"
        assert _cmdlines_with(f"--port {port}") == []
        assert not list((out_dir / "local").glob("*.pid"))
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, "something still listens on the port"
        again = subprocess.run([*make, "down"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert again.returncode == 0
    finally:  # never leave a server behind, even when an assertion failed
        subprocess.run([*make, "down"], cwd=ROOT, env=env, capture_output=True, timeout=120)
        for pid in pids:
            for member in _pgid_members(pid):
                os.kill(member, signal.SIGKILL)


def test_triton_image_carries_our_package_and_model_repository() -> None:
    """The stock tritonserver image lacks torch and carve3d_reward: compose and k8s use our own on top of it."""
    from dockerfile_parse import DockerfileParser

    parsed = [i for i in DockerfileParser(path=str(ROOT / "docker" / "triton.Dockerfile")).structure]

    def values(kind: str) -> list[str]:
        return [i["value"] for i in parsed if i["instruction"] == kind]

    base = values("FROM")[0]
    assert base.startswith("nvcr.io/nvidia/tritonserver:") and re.search(r":\d{2}\.\d{2}-py3$", base)
    args = dict(a.split("=", 1) for a in values("ARG"))
    assert args["TORCH"].strip('"') == makefile_torch_pin()
    run = "\n".join(values("RUN"))
    assert "pip install /opt/mrc/src/services/reward" in run and "import carve3d_reward.model" in run
    assert any("services/reward/triton/model_repository /models" in v for v in values("COPY"))
    kinds = [i["instruction"] for i in parsed if i["instruction"] != "COMMENT"]
    assert values("USER")[-1].split(":")[0] == "10001" and "RUN" not in kinds[kinds.index("USER") :]
    assert "/v2/health/ready" in values("HEALTHCHECK")[0]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert compose["services"]["triton"]["build"]["dockerfile"] == "docker/triton.Dockerfile"
    overlay = (ROOT / "k8s" / "overlays" / "triton" / "deployment.yaml").read_text()
    assert "carve3d/mrc-triton:0.1.0" in overlay and "nvcr.io/nvidia/tritonserver" not in overlay
