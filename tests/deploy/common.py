"""Paths, the validators of the dev extra, and small readers shared by the deployment tests."""

from __future__ import annotations

import importlib.util
import io
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image

from carve3d_reward.settings import MetricSettings

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
K8S = ROOT / "k8s"
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
    from carve3d_reward.tools.synthetic import make_grids

    buf = io.BytesIO()
    Image.fromarray(to_uint8_image(make_grids(1, seed=3, view_size=size)[0])).save(buf, format="PNG")
    return buf.getvalue()


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())
