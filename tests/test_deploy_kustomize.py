"""The kustomize subset of tests/deploy/kustomize.py: what it refuses, and that it renders k8s/ as kustomize does."""

from __future__ import annotations

import subprocess

import pytest
import yaml

from .deploy.kustomize import VARIANTS, UnsupportedKustomization, external_kustomize, render_kustomization, rendered


def test_kustomize_subset_refuses_what_it_does_not_implement(tmp_path) -> None:
    (tmp_path / "kustomization.yaml").write_text("configMapGenerator:\n  - name: x\n    literals: [a=b]\n")
    with pytest.raises(UnsupportedKustomization, match="configMapGenerator"):
        render_kustomization(tmp_path)
    (tmp_path / "kustomization.yaml").write_text("patches:\n  - path: p.yaml\n    target: {kind: Deployment}\n")
    with pytest.raises(UnsupportedKustomization, match="only 'path'"):
        render_kustomization(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_subset_rendering_matches_a_real_kustomize(variant) -> None:
    command = external_kustomize()
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
