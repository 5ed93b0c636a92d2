"""Monitoring: the Prometheus adapter rules behind the HPA, Prometheus' scrape config, Grafana's provisioning and
the MRC dashboard's queries."""

from __future__ import annotations

import json
import re

import yaml

from carve3d_reward.service.metrics import ServiceMetrics

from .deploy.common import DASHBOARD, ROOT, compose, mrc_local
from .deploy.kustomize import VARIANTS, resource


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
