"""A kustomize subset: enough for k8s/ (and it refuses anything else rather than rendering it wrongly).

Resources, strategic-merge patches (by ``path``), ``images`` and ``namespace``; ``test_deploy_kustomize.py``
compares its rendering with a real ``kustomize``/``kubectl kustomize`` where one is installed.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from .common import K8S, load_yaml_docs

VARIANTS = {
    "base": K8S / "base",
    "cpu": K8S / "overlays" / "cpu",
    "gpu": K8S / "overlays" / "gpu",
    "triton": K8S / "overlays" / "triton",
}


class UnsupportedKustomization(Exception):
    pass


_KUSTOMIZATION_KEYS = {"apiVersion", "kind", "namespace", "resources", "patches", "images"}
_CLUSTER_SCOPED = {"Namespace", "PersistentVolume", "StorageClass", "ClusterRole", "ClusterRoleBinding",
                   "CustomResourceDefinition", "PriorityClass", "IngressClass"}  # fmt: skip
BUILTIN_API_VERSIONS = {"v1", "apps/v1", "batch/v1", "autoscaling/v2", "policy/v1", "networking.k8s.io/v1"}
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
        builtin = target["apiVersion"] in BUILTIN_API_VERSIONS
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


def external_kustomize() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        probe = subprocess.run(["kubectl", "kustomize", "--help"], capture_output=True, timeout=60)
        if probe.returncode == 0:
            return ["kubectl", "kustomize"]
    return None
