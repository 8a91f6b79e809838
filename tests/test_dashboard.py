"""The Grafana dashboard is valid JSON whose every query names a metric the fleet exports,
and docs/OBSERVABILITY.md explains every metric the fleet exports."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

from prometheus_client import CollectorRegistry

from app.metrics import ApiMetrics, BacklogCollector
from workers.metrics import WorkerMetrics

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "docs" / "grafana" / "fleet.json"
GUIDE = ROOT / "docs" / "OBSERVABILITY.md"

#: The sample names each kind of metric family exposes.
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def exported() -> dict[str, set[str]]:
    """Family name -> the sample names it exposes, over the API's and a worker's metrics."""
    svc = SimpleNamespace(registry=SimpleNamespace(job_queues=["q"]), store=SimpleNamespace(backlog=lambda q: {}))
    backlog = CollectorRegistry()
    backlog.register(BacklogCollector(svc))
    families = {}
    for registry in (WorkerMetrics().registry, ApiMetrics().registry, backlog):
        for family in registry.collect():
            families[family.name] = {family.name + suffix for suffix in SUFFIXES[family.type]}
    return families


def queries(dashboard: dict) -> list[str]:
    def walk(panels):
        for panel in panels:
            yield panel
            yield from walk(panel.get("panels", []))

    return [target["expr"] for panel in walk(dashboard["panels"]) for target in panel.get("targets", [])]


def test_the_dashboard_queries_only_metrics_the_fleet_exports():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"]
    exprs = queries(dashboard)
    assert exprs, "the dashboard has queries"
    samples = set().union(*exported().values())
    used = {name for expr in exprs for name in re.findall(r"\bfleet_[a-z0-9_]+", expr)}
    assert used - samples == set(), "queried but never exported"
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert all(p["title"] and p["targets"] and p["gridPos"]["w"] <= 24 for p in panels)
    titles = {p["title"] for p in panels}
    assert {"Images per second", "p95 by stage", "Batch size distribution", "Backlog against workers"} <= titles


def test_every_metric_is_explained_in_the_guide():
    guide = GUIDE.read_text()
    missing = [name for name in exported() if f"`{name}" not in guide]
    assert missing == []
