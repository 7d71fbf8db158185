"""Prometheus metrics, read from the engine's tables at scrape time.

Every attempt, lease and model call is a row whatever process made it, so one collector in the
web process covers the workers on every host too, with nothing to aggregate across processes.
Labels are the workflow, stage, queue, outcome, error code and model: names from the
declaration and the price table, never anything a visit contains.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

from django.db.models import Count, DurationField, ExpressionWrapper, F, Min, Q, Sum
from django.utils import timezone
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from pipeline.core.models import Attempt, LLMCall, Stage
from pipeline.core.states import AttemptStatus, StageStatus
from pipeline.core.store import stages_lease_expired
from pipeline.core.workflow import workflow_get
from pipeline.llm.budgets import daily_budget
from pipeline.ops.health import cluster_unseen_seconds

# Stage attempts last from milliseconds (a memoized model call) to an hour (a long recording).
DURATION_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
DEFAULT_QUEUE = "default"


def _queue(workflow: str, stage: str) -> str:
    try:
        return workflow_get(workflow).stage(stage).queue or DEFAULT_QUEUE
    except LookupError:  # a workflow no longer declared; its rows stay
        return DEFAULT_QUEUE


class PipelineCollector(Collector):
    """Counters and histograms of the engine's history, gauges of its present."""

    def collect(self) -> Iterator[Metric]:
        yield from self._attempts()
        yield self._durations()
        yield from self._queues()
        yield from self._llm()
        yield from self._budget()
        yield from self._cluster()

    def _attempts(self) -> Iterator[Metric]:
        attempts = CounterMetricFamily(
            "pipeline_stage_attempts",
            "Stage attempts by outcome and error code.",
            labels=["workflow", "stage", "outcome", "error_code"],
        )
        audio = CounterMetricFamily(
            "pipeline_audio_seconds", "Seconds of audio transcribed.", labels=["workflow", "stage"]
        )
        rows = (
            Attempt.objects.order_by()
            .values(
                "status",
                "error_code",
                workflow=F("stage__run__workflow"),
                stage_name=F("stage__name"),
            )
            .annotate(count=Count("id"), audio=Sum("audio_seconds"))
        )
        audio_by_stage: dict[tuple[str, str], float] = {}
        lost = 0
        for row in rows:
            key = (row["workflow"], row["stage_name"])
            attempts.add_metric([*key, row["status"], row["error_code"]], row["count"])
            audio_by_stage[key] = audio_by_stage.get(key, 0.0) + float(row["audio"] or 0.0)
            lost += row["count"] if row["status"] == AttemptStatus.LOST else 0
        for key, seconds in audio_by_stage.items():
            if seconds:
                audio.add_metric(list(key), seconds)
        yield attempts
        yield audio
        # A lost attempt is a lease that expired (a worker died or stalled) and that the sweep
        # took back; the stages that still succeeded afterwards are its recoveries.
        yield CounterMetricFamily(
            "pipeline_lease_expiries", "Attempts whose lease expired and was taken back.", lost
        )
        recovered = (
            Stage.objects.filter(status=StageStatus.SUCCEEDED, attempts__status=AttemptStatus.LOST)
            .distinct()
            .count()
        )
        yield CounterMetricFamily(
            "pipeline_sweep_recoveries",
            "Stages that succeeded after one of their attempts lost its lease.",
            recovered,
        )

    def _durations(self) -> Metric:
        histogram = HistogramMetricFamily(
            "pipeline_stage_duration_seconds",
            "Duration of succeeded stage attempts.",
            labels=["workflow", "stage"],
        )
        duration = ExpressionWrapper(
            F("finished_at") - F("started_at"), output_field=DurationField()
        )
        buckets = {
            f"le_{i}": Count("id", filter=Q(took__lte=timedelta(seconds=bound)))
            for i, bound in enumerate(DURATION_BUCKETS)
        }
        rows = (
            Attempt.objects.filter(status=AttemptStatus.SUCCEEDED, finished_at__isnull=False)
            .order_by()
            .annotate(took=duration)
            .values(workflow=F("stage__run__workflow"), stage_name=F("stage__name"))
            .annotate(count=Count("id"), total=Sum("took"), **buckets)
        )
        for row in rows:
            cumulative = [(str(bound), row[f"le_{i}"]) for i, bound in enumerate(DURATION_BUCKETS)]
            total = row["total"]
            histogram.add_metric(
                [row["workflow"], row["stage_name"]],
                [*cumulative, ("+Inf", row["count"])],
                sum_value=total.total_seconds() if total else 0.0,
            )
        return histogram

    def _queues(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily(
            "pipeline_queue_ready_stages", "Stages ready to run now.", labels=["queue"]
        )
        oldest = GaugeMetricFamily(
            "pipeline_queue_oldest_ready_age_seconds",
            "How long the longest-waiting ready stage has waited.",
            labels=["queue"],
        )
        now = timezone.now()
        rows = (
            Stage.objects.filter(status=StageStatus.READY, next_attempt_at__lte=now)
            .order_by()
            .values("name", workflow=F("run__workflow"))
            .annotate(count=Count("id"), since=Min("next_attempt_at"))
        )
        counts: dict[str, int] = {}
        ages: dict[str, float] = {}
        for row in rows:
            queue = _queue(row["workflow"], row["name"])
            counts[queue] = counts.get(queue, 0) + row["count"]
            ages[queue] = max(ages.get(queue, 0.0), (now - row["since"]).total_seconds())
        for queue, count in sorted(counts.items()):
            depth.add_metric([queue], count)
            oldest.add_metric([queue], ages[queue])
        yield depth
        yield oldest
        # The sweep takes an expired lease back within a minute, and only then does it count
        # as a lease expiry; a stage still held by a dead worker shows only here.
        stuck = GaugeMetricFamily(
            "pipeline_queue_stuck_stages",
            "Running stages whose lease expired and that the sweep has not taken back yet.",
            labels=["queue"],
        )
        stuck_counts: dict[str, int] = {}
        for expired in stages_lease_expired():
            queue = _queue(expired.workflow, expired.stage_name)
            stuck_counts[queue] = stuck_counts.get(queue, 0) + 1
        for queue, count in sorted(stuck_counts.items()):
            stuck.add_metric([queue], count)
        yield stuck

    def _llm(self) -> Iterator[Metric]:
        tokens = CounterMetricFamily(
            "pipeline_llm_tokens",
            "Tokens the provider billed, by direction.",
            labels=["workflow", "stage", "model", "direction"],
        )
        dollars = CounterMetricFamily(
            "pipeline_llm_cost_usd",
            "Dollars the provider billed, at the price table's rates.",
            labels=["workflow", "stage", "model"],
        )
        rows = (
            LLMCall.objects.order_by()
            .values("model", workflow=F("stage__run__workflow"), stage_name=F("stage__name"))
            .annotate(input=Sum("input_tokens"), output=Sum("output_tokens"), cost=Sum("cost_usd"))
        )
        for row in rows:
            key = [row["workflow"], row["stage_name"], row["model"]]
            tokens.add_metric([*key, "input"], row["input"] or 0)
            tokens.add_metric([*key, "output"], row["output"] or 0)
            dollars.add_metric(key, float(row["cost"] or 0))
        yield tokens
        yield dollars

    def _budget(self) -> Iterator[Metric]:
        today = daily_budget()
        yield GaugeMetricFamily(
            "pipeline_llm_daily_budget_usd", "The day's LLM budget (0: no limit).", today.limit_usd
        )
        yield GaugeMetricFamily(
            "pipeline_llm_daily_budget_spent_usd", "LLM dollars spent today (UTC).", today.spent_usd
        )
        yield GaugeMetricFamily(
            "pipeline_llm_daily_budget_left_usd",
            "LLM dollars left today (0 when spent or when there is no limit).",
            today.left_usd,
        )

    def _cluster(self) -> Iterator[Metric]:
        # Absent, not a number, when the sweep schedule is missing: /readyz fails then too, and
        # an alert on absence says so without a made-up age.
        unseen = cluster_unseen_seconds()
        if unseen is not None:
            yield GaugeMetricFamily(
                "pipeline_cluster_last_seen_age_seconds",
                "How long no worker cluster has moved the sweep schedule (0 while one does).",
                unseen,
            )
