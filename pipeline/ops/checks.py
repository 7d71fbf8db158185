"""System checks for configuration mistakes that would break the durable contract."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core import checks
from django.utils import timezone

from pipeline.core.dispatch import BACKENDS, task_timeout_seconds
from pipeline.core.workflow import workflows_all
from pipeline.llm import prices


@checks.register(checks.Tags.compatibility)
def check_queue_settings(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    errors: list[checks.CheckMessage] = []
    cluster = getattr(settings, "Q_CLUSTER", {})
    retry = cluster.get("retry")
    longest = max(
        (
            (task_timeout_seconds(workflow, stage.name), f"{workflow.name}.{stage.name}")
            for workflow in workflows_all()
            for stage in workflow.stages
        ),
        default=(0, ""),
    )
    if retry is not None and retry <= longest[0]:
        errors.append(
            checks.Error(
                f"Q_CLUSTER['retry'] ({retry}s) is not above the longest task timeout "
                f"({longest[0]}s, {longest[1]}): django-q2 would deliver that task twice while "
                "it still runs.",
                hint="Raise Q_RETRY_SECONDS or shorten the stage's timeout or attempts.",
                id="pipeline.E001",
            )
        )
    if cluster.get("max_attempts") != 1:
        errors.append(
            checks.Error(
                "Q_CLUSTER['max_attempts'] must be 1: the engine owns retries.",
                hint="Set max_attempts=1 and ack_failures=True in Q_CLUSTER.",
                id="pipeline.E002",
            )
        )
    if not cluster.get("ack_failures"):
        errors.append(
            checks.Error(
                "Q_CLUSTER['ack_failures'] must be True, or django-q2 redelivers failed tasks "
                "behind the engine's back.",
                hint="Set ack_failures=True in Q_CLUSTER.",
                id="pipeline.E003",
            )
        )
    if settings.PIPELINE_BACKEND not in BACKENDS:
        errors.append(
            checks.Error(
                f"PIPELINE_BACKEND is {settings.PIPELINE_BACKEND!r}: it must be one of "
                f"{', '.join(repr(name) for name in BACKENDS)}.",
                id="pipeline.E007",
            )
        )
    lease = settings.PIPELINE_LEASE_SECONDS
    if lease <= 0 or settings.PIPELINE_SWEEP_SECONDS <= 0:
        errors.append(
            checks.Error(
                "PIPELINE_LEASE_SECONDS and PIPELINE_SWEEP_SECONDS must be positive.",
                id="pipeline.E004",
            )
        )
    return errors


@checks.register()
def check_stage_outputs(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    return [
        checks.Error(
            f"Stage {stage.name!r} of workflow {workflow.name!r} declares no output model.",
            hint="Give its StageSpec output=<a pydantic model>: the engine validates what the "
            "stage returns against it, and readers get that model back.",
            obj=f"{workflow.name}.{stage.name}",
            id="pipeline.E005",
        )
        for workflow in workflows_all()
        for stage in workflow.stages
        if stage.output is None
    ]


@checks.register()
def check_default_model_priced(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """With a model configured, LLM_MODEL must have a price today: refused at start-up rather
    than at the first call, and never recorded at $0."""
    if not settings.OPENAI_API_KEY:
        return []  # the offline engine answers; nothing is billed
    today = timezone.now().date()
    if prices.price_for(settings.LLM_MODEL, today) is not None:
        return []
    return [
        checks.Error(
            f"LLM_MODEL {settings.LLM_MODEL!r} has no price in {settings.LLM_PRICE_TABLE} on "
            f"{today}: its calls would be recorded at $0.",
            hint="Add the model's row (input and output USD per million tokens) to the price "
            "table, or choose a priced model.",
            id="pipeline.E006",
        )
    ]
