"""Which model a stage asks, and who may change that.

A stage asks the model its run names (`reprocess --model`), or else its policy's default, or,
with no policy, `LLM_MODEL`. It is refused, permanently and before anything is sent, when its
policy does not allow that model, or when the price table has no row for it: a call recorded
at $0 would make every cost figure a lie. The same rules refuse a bad policy when it is
published and a bad configuration at start-up (`pipeline.ops.checks`).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import date
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Max

from pipeline.core.errors import ModelNotAllowed, ModelUnpriced, OperationRefused
from pipeline.core.workflow import workflow_get
from pipeline.llm import prices
from pipeline.llm.models import ModelPolicy


def policy_current(workflow: str, stage: str) -> ModelPolicy | None:
    """The policy in force for a stage: its newest version, if it has any."""
    return ModelPolicy.objects.filter(workflow=workflow, stage=stage).order_by("-version").first()


def model_for_stage(*, workflow: str, stage: str, asked: str | None, on: date) -> str:
    """The model the stage asks: `asked` (the run's own choice), or its policy's default, or
    LLM_MODEL; refused if the policy forbids it or it has no price."""
    policy = policy_current(workflow, stage)
    model = asked or (policy.default_model if policy else str(settings.LLM_MODEL))
    if policy is not None and model not in policy.allowed_models:
        raise ModelNotAllowed(
            f"the model policy of {workflow}.{stage} (version {policy.version}) allows "
            f"{', '.join(policy.allowed_models)}, not {model}; ask an allowed model, or "
            "publish a policy that allows it"
        )
    try:
        prices.price_required(model, on)
    except OperationRefused as exc:  # the same words, as a stage's permanent failure
        raise ModelUnpriced(str(exc)) from None
    return model


def models_check(workflow: str, stages: Iterable[str], model: str, on: date) -> None:
    """Refuse, before a run is made, a `model` that one of `stages` would refuse."""
    for stage in stages:
        try:
            model_for_stage(workflow=workflow, stage=stage, asked=model, on=on)
        except (ModelNotAllowed, ModelUnpriced) as exc:
            raise OperationRefused(str(exc)) from exc


def policy_check(
    *, workflow: str, stage: str, allowed: list[str], default: str, reason: str, on: date
) -> list[str]:
    """Refuse a policy that could not be kept (an unknown stage, a default it does not allow,
    an unpriced model, no reason); return its allowed models, cleaned, in the order given."""
    try:
        names = workflow_get(workflow).stage_names
    except KeyError:
        raise OperationRefused(f"There is no workflow {workflow}.") from None
    if stage not in names:
        raise OperationRefused(f"{workflow} has no stage {stage}; its stages: {', '.join(names)}")
    allowed = list(dict.fromkeys(name.strip() for name in allowed if name.strip()))
    if not allowed:
        raise OperationRefused("Name at least one allowed model.")
    if default not in allowed:
        raise OperationRefused(f"The default model {default} must be one of the allowed models.")
    for model in allowed:
        prices.price_required(model, on)
    if not reason.strip():
        raise OperationRefused("Say why: a reason is required for the policy's history.")
    return allowed


def policy_publish(
    *,
    workflow: str,
    stage: str,
    allowed: list[str],
    default: str,
    reason: str,
    user: Any,
    on: date,
) -> ModelPolicy:
    """Put a new version of a stage's policy in force (the earlier ones stay, as history)."""
    allowed = policy_check(
        workflow=workflow, stage=stage, allowed=allowed, default=default, reason=reason, on=on
    )
    with transaction.atomic():
        latest = ModelPolicy.objects.filter(workflow=workflow, stage=stage).aggregate(
            latest=Max("version")
        )["latest"]
        try:
            with transaction.atomic():
                return ModelPolicy.objects.create(
                    workflow=workflow,
                    stage=stage,
                    version=(latest or 0) + 1,
                    allowed_models=allowed,
                    default_model=default,
                    created_by=user,
                    created_by_label=user.get_username() if user else "cli",
                    reason=reason.strip()[:300],
                )
        except IntegrityError:
            raise OperationRefused(
                f"Someone published a policy for {workflow}.{stage} at the same moment; "
                "look at it, then publish again."
            ) from None
