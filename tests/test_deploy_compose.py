"""docker-compose.yml: the compose spec's schema, the services, their health checks, profiles and settings."""

from __future__ import annotations

import re
import subprocess

import pytest
import yaml

from carve3d_reward.service.settings import ServiceSettings
from carve3d_reward.settings import MetricSettings

from .deploy.common import ROOT, TRITON_MODEL_REPOSITORY, compose, tool


@pytest.mark.slow
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
