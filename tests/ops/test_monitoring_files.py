"""The alert rules and the Grafana dashboard in ops/: promtool checks the rules and runs their
unit tests, and every metric they name is one /metrics exports after a real visit, so a
renamed metric cannot leave an alert silently watching nothing."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from django.conf import settings
from django.urls import reverse
from django.utils import timezone
from django_q.models import Schedule
from prometheus_client.parser import text_string_to_metric_families

from pipeline.backends.djangoq import SWEEP_SCHEDULE_NAME
from pipeline.core import store
from pipeline.core.models import Stage
from tests.conftest import SHORT_VISIT
from visits.services import visit_create, visit_start

ROOT = Path(settings.BASE_DIR)
RULES = ROOT / "ops" / "prometheus" / "alerts.yml"
RULE_TESTS = ROOT / "ops" / "prometheus" / "alerts.test.yml"
DASHBOARD = ROOT / "ops" / "grafana" / "visit-pipeline.json"

PROMTOOL = shutil.which("promtool")
requires_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool is not on PATH (Debian's `prometheus` package has it; .ci/run installs it)",
)

# What a PromQL expression names besides metrics: quoted strings, label matchers, range and
# subquery durations, grouping label lists, function names (followed by a parenthesis), numbers
# and keywords. Whatever identifier is left is a metric name.
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^}]*\}")
_DURATIONS = re.compile(r"\[[^\]]*\]")
_GROUPINGS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIERS = re.compile(r"(?<![\w.])[A-Za-z_:][\w:]*\b(?!\s*\()")
_KEYWORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring"}
    | {"group_left", "group_right", "inf", "nan"}
)


def metric_names(expr: str) -> set[str]:
    for pattern in (_STRINGS, _MATCHERS, _DURATIONS, _GROUPINGS):
        expr = pattern.sub(" ", expr)
    return {name for name in _IDENTIFIERS.findall(expr) if name.lower() not in _KEYWORDS}


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def dashboard_queries() -> list[tuple[str, str]]:
    return [
        (panel["title"], target["expr"])
        for panel in dashboard()["panels"]
        for target in panel.get("targets", [])
    ]


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )


@requires_promtool
def test_promtool_accepts_the_rules():
    result = promtool("check", "rules", str(RULES.relative_to(ROOT)))
    assert result.returncode == 0, result.stdout + result.stderr


@requires_promtool
def test_the_rules_pass_their_unit_tests():
    result = promtool("test", "rules", str(RULE_TESTS.relative_to(ROOT)))
    assert result.returncode == 0, result.stdout + result.stderr


@requires_promtool
def test_the_dashboards_queries_are_valid_promql(tmp_path):
    # promtool parses rule expressions only, so each query goes in as a recording rule.
    rules = [
        {"record": f"dashboard:query_{i}", "expr": expr}
        for i, (_, expr) in enumerate(dashboard_queries())
    ]
    path = tmp_path / "dashboard_queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_metric_names_are_found_in_promql_and_nothing_else():
    expr = (
        'histogram_quantile(0.95, sum by (stage, le) (rate(a_bucket{outcome=~"x|y{1}"}[5m:1m])))'
        " / on (job) group_left b_total > 0.8 * max without (instance) (c offset 1h)"
        ' and absent(d{queue="default"}) unless bool e'
    )
    assert metric_names(expr) == {"a_bucket", "b_total", "c", "d", "e"}


def test_every_alert_has_a_for_a_severity_and_says_what_to_do():
    rules = alert_rules()
    assert {rule["alert"] for rule in rules} >= {
        "PipelineStageWaitingTooLong",
        "PipelineStagesStuck",
        "PipelineLeasesExpiring",
        "PipelineStageFailureRateHigh",
        "PipelineLLMBudgetNearlySpent",
        "PipelineLLMBudgetSpent",
        "PipelineNoWorkerCluster",
        "PipelineClusterHeartbeatMissing",
    }
    for rule in rules:
        assert rule.get("for"), rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_the_dashboard_loads_and_every_panel_has_a_datasource_and_a_query():
    board = dashboard()
    assert board["schemaVersion"] >= 39
    assert [i["name"] for i in board["__inputs"]] == ["DS_PROMETHEUS"]
    assert "DS_PROMETHEUS" in {v["name"] for v in board["templating"]["list"]}
    assert board["panels"]
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, panel
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            assert target.get("datasource", panel["datasource"]) == panel["datasource"]


def exported_after_a_real_visit(client, clinician) -> dict[str, dict[tuple[Any, ...], float]]:
    """Every sample /metrics serves once a visit went through, another waits, and a third's
    worker died holding its lease: name -> {labels: value}."""
    visit_start(visit=visit_create(clinician=clinician, recording=SHORT_VISIT), inline=True)
    visit_create(clinician=clinician, recording=SHORT_VISIT)  # waits on the default queue
    dead = visit_create(clinician=clinician, recording=SHORT_VISIT)
    ingest = Stage.objects.get(run=dead.current_run, name="ingest")
    assert store.stage_claim(stage_id=ingest.id, worker="dead-host:1") is not None
    Stage.objects.filter(id=ingest.id).update(
        lease_expires_at=timezone.now() - timedelta(minutes=2)
    )

    response = client.get(reverse("metrics"))

    assert response.status_code == 200
    exported: dict[str, dict[tuple[Any, ...], float]] = {}
    for family in text_string_to_metric_families(response.content.decode()):
        for sample in family.samples:
            labels = tuple(sorted(sample.labels.items()))
            exported.setdefault(sample.name, {})[labels] = sample.value
    return exported


@pytest.mark.django_db(transaction=True)  # the pipeline runs inline: its heartbeat commits
def test_every_metric_the_alerts_and_the_dashboard_name_is_exported(
    client, clinician, llm_server, settings
):
    settings.LLM_DAILY_BUDGET_USD = 5.0
    exported = exported_after_a_real_visit(client, clinician)

    queries = [(f"alert {rule['alert']}", rule["expr"]) for rule in alert_rules()]
    queries += [(f"panel {title!r}", expr) for title, expr in dashboard_queries()]
    missing = []
    for where, expr in queries:
        names = metric_names(expr)
        assert names, f"{where} names no metric: {expr}"
        missing += [f"{where}: {name}" for name in sorted(names - exported.keys())]
    assert not missing, f"not exported by /metrics: {missing}; exported: {sorted(exported)}"
    # The two gauges the alerts added, with the values they should have here.
    assert exported["pipeline_queue_stuck_stages"] == {(("queue", "default"),): 1}
    assert 0 <= exported["pipeline_cluster_last_seen_age_seconds"][()] < 60


@pytest.mark.django_db
def test_the_cluster_age_is_how_late_the_sweep_schedule_is_and_absent_without_it(client):
    url = reverse("metrics")

    def cluster_age() -> list[float]:
        families = text_string_to_metric_families(client.get(url).content.decode())
        return [
            sample.value
            for family in families
            for sample in family.samples
            if sample.name == "pipeline_cluster_last_seen_age_seconds"
        ]

    # As a cluster's scheduler leaves it after firing, then 10 minutes with no cluster.
    Schedule.objects.filter(name=SWEEP_SCHEDULE_NAME).update(
        next_run=timezone.now() + timedelta(seconds=40)
    )
    assert cluster_age() == [0.0]
    Schedule.objects.filter(name=SWEEP_SCHEDULE_NAME).update(
        next_run=timezone.now() - timedelta(minutes=10)
    )
    [age] = cluster_age()
    assert 600 <= age < 660
    # Absent, so that PipelineClusterHeartbeatMissing fires, as /readyz fails.
    Schedule.objects.filter(name=SWEEP_SCHEDULE_NAME).delete()
    assert cluster_age() == []
