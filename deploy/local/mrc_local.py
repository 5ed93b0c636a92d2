"""Helpers of ``make up`` (deploy/local/up.sh): wait for readiness, score a grid, check the metrics scrape.

    python deploy/local/mrc_local.py wait-ready URL --timeout 300 [--pid PID] [--log FILE]
    python deploy/local/mrc_local.py example-grid out/local/grid.png
    python deploy/local/mrc_local.py score URL out/local/grid.png
    python deploy/local/mrc_local.py scrape-check URL [--dashboard deploy/grafana/dashboards/mrc.json] [--declared-only]

``scrape-check`` does what Prometheus does with ``/metrics``: it fetches it and parses it with
``prometheus_client.parser.text_string_to_metric_families`` (the Prometheus text format), then asserts
that every metric name the Grafana dashboard queries is there. ``MRC_AUTH_TOKEN``, when set, is sent as
a bearer token on every request. Exit status: 0 ok, 1 failed (with a one-line reason).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "mrc.json"

# -- PromQL: which metric names does an expression read? ---------------------------------------------------------
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_OFFSET = re.compile(r"\boffset\s+-?\w+")
_GRAFANA_VAR = re.compile(r"\$\{[^}]*\}|\$\w+")
_NUMBER = re.compile(r"(?<![\w:])\d+(?:\.\d+)?(?:[eE][+-]?\d+)?")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "and", "or", "unless"}
    | {"inf", "nan", "atan2", "start", "end"}
)
_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*([A-Za-z_:][A-Za-z0-9_:]*)")


def promql_metric_names(expr: str) -> set[str]:
    """The metric names an instant/range PromQL expression selects (not functions, labels or keywords)."""
    m = _LABEL_VALUES.match(expr)  # Grafana's label_values(metric, label) templating query
    if m:
        return {m.group(1)}
    text = _GRAFANA_VAR.sub(" ", _STRING.sub(" ", expr))
    for pattern in (_MATCHERS, _RANGE, _GROUPING, _OFFSET):
        previous = None
        while previous != text:  # nested parentheses in groupings are not a thing; braces may repeat
            previous, text = text, pattern.sub(" ", text)
    text = _NUMBER.sub(" ", text)
    names = set()
    for m in _IDENT.finditer(text):
        rest = text[m.end() :].lstrip()
        if rest.startswith("(") or m.group(0) in _KEYWORDS:
            continue  # a function or an aggregation, or a keyword
        names.add(m.group(0))
    return names


def dashboard_queries(dashboard: dict) -> list[str]:
    """Every PromQL expression of a Grafana dashboard: panel targets (rows included) and templating queries."""
    exprs: list[str] = []

    def panels(items: Iterable[dict]) -> Iterable[dict]:
        for p in items:
            yield p
            yield from panels(p.get("panels", []))

    for panel in panels(dashboard.get("panels", [])):
        exprs.extend(t["expr"] for t in panel.get("targets", []) if t.get("expr"))
    for var in dashboard.get("templating", {}).get("list", []):
        query = var.get("query")
        if var.get("type") == "query" and query:
            exprs.append(query["query"] if isinstance(query, dict) else str(query))
    return exprs


def dashboard_metric_names(path: Path = DASHBOARD) -> set[str]:
    names: set[str] = set()
    for expr in dashboard_queries(json.loads(path.read_text())):
        names |= promql_metric_names(expr)
    return names


# -- /metrics: which names does the service export? -------------------------------------------------------------
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "gaugehistogram": ("_bucket", "_gcount", "_gsum"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
    "stateset": ("",),
    "gauge": ("",),
    "unknown": ("",),
}


def exported_names(text: str) -> tuple[set[str], set[str]]:
    """(names declared by a ``# TYPE`` line, names that have at least one sample) in a Prometheus text scrape."""
    from prometheus_client.parser import text_string_to_metric_families

    declared: set[str] = set()
    sampled: set[str] = set()
    for family in text_string_to_metric_families(text):
        declared |= {family.name + s for s in _SUFFIXES.get(family.type, ("",))}
        declared.add(family.name)
        sampled |= {s.name for s in family.samples}
    return declared | sampled, sampled


# -- HTTP --------------------------------------------------------------------------------------------------------
def _headers() -> dict[str, str]:
    token = os.environ.get("MRC_AUTH_TOKEN", "")
    return {"Authorization": f"Bearer {token}"} if token else {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    if stat.exists():  # a zombie has exited already
        try:
            return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (OSError, IndexError):
            return True
    return True


def wait_ready(url: str, timeout: float, pid: int | None = None, log: Path | None = None) -> int:
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while time.monotonic() < deadline:
        if pid is not None and not _alive(pid):
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:]) if log and log.exists() else ""
            print(f"the service (pid {pid}) exited before it was ready; last lines of {log}:\n{tail}", file=sys.stderr)
            return 1
        try:
            r = httpx.get(url.rstrip("/") + "/readyz", timeout=2.0, headers=_headers())
            if r.status_code == 200:
                print(f"ready: {r.json().get('metric', '')}")
                return 0
            last = f"HTTP {r.status_code}"
        except httpx.HTTPError as exc:
            last = f"{type(exc).__name__}"
        time.sleep(0.25)
    print(f"not ready after {timeout:g} s ({last})", file=sys.stderr)
    return 1


def example_grid(path: Path) -> int:
    from carve3d_reward.tools.sheets import save_grid_png
    from carve3d_reward.tools.synthetic import make_grids

    save_grid_png(make_grids(1, seed=0, view_size=128)[0], path)
    print(f"example grid: {path}")
    return 0


def score(url: str, path: Path) -> int:
    r = httpx.post(
        url.rstrip("/") + "/mrc",
        content=path.read_bytes(),
        headers={"content-type": "image/png", **_headers()},
        timeout=120.0,
    )
    if r.status_code != 200:
        print(f"scoring {path} failed: HTTP {r.status_code}: {r.text[:300]}", file=sys.stderr)
        return 1
    body = r.json()
    print(f"scored {path.name}: mrc={body['mrc']:.4f} reward={body['reward']:.4f} status={body['status']}")
    return 0


def scrape_check(url: str, dashboard: Path, declared_only: bool) -> int:
    r = httpx.get(url.rstrip("/") + "/metrics", timeout=10.0, headers=_headers())
    if r.status_code != 200:
        print(f"/metrics answered HTTP {r.status_code}", file=sys.stderr)
        return 1
    try:
        declared, sampled = exported_names(r.text)
    except ValueError as exc:
        print(f"/metrics is not valid Prometheus text format: {exc}", file=sys.stderr)
        return 1
    wanted = dashboard_metric_names(dashboard)
    have = declared if declared_only else sampled
    missing = sorted(wanted - have)
    if missing:
        what = "exported" if declared_only else "exported with samples"
        print(f"scrape check failed: dashboard metrics not {what} by {url}/metrics: {missing}", file=sys.stderr)
        return 1
    print(f"scrape check: /metrics parses; all {len(wanted)} metrics the dashboard queries are there")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("wait-ready")
    p.add_argument("url")
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--pid", type=int)
    p.add_argument("--log", type=Path)
    p = sub.add_parser("example-grid")
    p.add_argument("path", type=Path)
    p = sub.add_parser("score")
    p.add_argument("url")
    p.add_argument("path", type=Path)
    p = sub.add_parser("scrape-check")
    p.add_argument("url")
    p.add_argument("--dashboard", type=Path, default=DASHBOARD)
    p.add_argument("--declared-only", action="store_true", help="accept metrics declared without samples")
    args = parser.parse_args(argv)
    if args.cmd == "wait-ready":
        return wait_ready(args.url, args.timeout, args.pid, args.log)
    if args.cmd == "example-grid":
        return example_grid(args.path)
    if args.cmd == "score":
        return score(args.url, args.path)
    return scrape_check(args.url, args.dashboard, args.declared_only)


if __name__ == "__main__":
    sys.exit(main())
