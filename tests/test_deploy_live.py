"""The live service over HTTP: every metric of the dashboard has samples, and the container health check script."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest

from carve3d_reward.model import MRCModel
from carve3d_reward.service.app import create_app
from carve3d_reward.service.settings import ServiceSettings

from .deploy.common import DASHBOARD, ROOT, SMALL_METRIC, mrc_local, png_bytes
from .serving import free_port, serve_app

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


@pytest.mark.slow
def test_container_healthcheck_script(live) -> None:
    assert _run_healthcheck(live, TOKEN) == 0
    assert _run_healthcheck(live, None) == 1  # open_health=False: 401 without the token
    assert _run_healthcheck(f"http://127.0.0.1:{free_port()}", TOKEN) == 1  # nothing listening
