"""Model policy per stage: a run asks only a model its stage allows, never an unpriced one,
and a policy changes only by publishing a new version that says who and why."""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.utils import timezone

from pipeline.core.errors import OperationRefused
from pipeline.core.models import LLMCall, RunStatus, Stage, StageStatus
from pipeline.core.operations import Operator, run_rerun_from
from pipeline.llm.gateway import MODEL_INPUT
from pipeline.llm.models import ModelPolicy, ModelPrice
from pipeline.llm.policies import policy_current, policy_publish
from tests.conftest import SHORT_VISIT
from visits.models import Visit
from visits.services import visit_create, visit_rerun_from, visit_start

# Inline runs: their heartbeat needs committed rows.
pytestmark = pytest.mark.django_db(transaction=True)


def publish(stage: str, allowed: list[str], default: str, **extra) -> ModelPolicy:
    return policy_publish(
        workflow="visit",
        stage=stage,
        allowed=allowed,
        default=default,
        reason=extra.pop("reason", "cost review"),
        user=extra.pop("user", None),
        on=timezone.now().date(),
    )


def run_visit(clinician) -> Visit:
    visit = visit_create(clinician=clinician, recording=SHORT_VISIT)
    visit_start(visit=visit, inline=True)
    visit.refresh_from_db()
    return visit


def stage_of(visit: Visit, name: str) -> Stage:
    return Stage.objects.get(run_id=visit.current_run_id, name=name)


def test_a_stage_asks_its_policys_default(clinician, llm_server):
    publish("summarize", ["gpt-4o-mini", "gpt-4o"], "gpt-4o")

    visit = run_visit(clinician)

    assert visit.current_run.status == RunStatus.SUCCEEDED
    # summarize asked the policy's default; note, with no policy, LLM_MODEL.
    assert [r.model for r in llm_server.requests] == ["gpt-4o", "gpt-4o-mini"]


def test_a_re_run_under_a_model_its_stages_do_not_allow_is_refused_before_it_starts(
    clinician, llm_server
):
    visit = run_visit(clinician)
    publish("note", ["gpt-4o-mini"], "gpt-4o-mini")

    with pytest.raises(OperationRefused, match="allows gpt-4o-mini, not gpt-4o"):
        visit_rerun_from(
            visit=visit, stage="summarize", actor=None, reason="try 4o", model="gpt-4o"
        )

    assert Visit.objects.get(pk=visit.pk).current_run_id == visit.current_run_id
    assert len(llm_server.requests) == 2


def test_a_run_naming_a_model_its_stage_does_not_allow_fails_permanently_unsent(
    clinician, llm_server
):
    visit = run_visit(clinician)
    # The re-run was made when gpt-4o was allowed; the policy changed before it ran.
    fork = run_rerun_from(
        run=visit.current_run,
        stage_name="summarize",
        operator=Operator.command_line(),
        reason="try 4o",
        start=False,
        input_changes={MODEL_INPUT: "gpt-4o"},
    )
    publish("summarize", ["gpt-4o-mini"], "gpt-4o-mini", reason="4o is too dear")
    Visit.objects.filter(pk=visit.pk).update(current_run=fork)
    visit.refresh_from_db()

    visit_start(visit=visit, inline=True)

    summarize = stage_of(visit, "summarize")
    assert (summarize.status, summarize.error_code) == (StageStatus.FAILED, "model_not_allowed")
    assert summarize.attempt_count == 1
    assert "(version 1) allows gpt-4o-mini, not gpt-4o" in summarize.error_message
    assert len(llm_server.requests) == 2  # the first run's; nothing for the fork


def test_an_unpriced_model_is_never_asked_and_never_recorded_at_zero(
    clinician, llm_server, settings
):
    settings.LLM_MODEL = "mystery-model"

    visit = run_visit(clinician)

    summarize = stage_of(visit, "summarize")
    assert (summarize.status, summarize.error_code) == (StageStatus.FAILED, "model_unpriced")
    assert "no price for “mystery-model”" in summarize.error_message
    assert llm_server.requests == []
    assert not LLMCall.objects.exists()


def test_the_start_up_check_refuses_an_unpriced_default_model(settings):
    settings.OPENAI_API_KEY = "sk-test"
    settings.LLM_MODEL = "mystery-model"

    with pytest.raises(SystemCheckError, match=r"pipeline\.E006"):
        call_command("check")


def test_publishing_makes_a_new_version_and_refuses_a_bad_policy(django_user_model):
    admin = django_user_model.objects.create_user(username="lead", password="x", is_staff=True)

    first = publish("summarize", ["gpt-4o-mini"], "gpt-4o-mini", user=admin)
    second = publish("summarize", ["gpt-4o-mini", "gpt-4.1-mini"], "gpt-4.1-mini", user=admin)

    assert (first.version, second.version) == (1, 2)
    assert policy_current("visit", "summarize") == second
    assert (second.created_by, second.created_by_label, second.reason) == (
        admin,
        "lead",
        "cost review",
    )
    for allowed, default, stage, reason, message in [
        (["gpt-4o-mini"], "gpt-4o", "summarize", "x", "must be one of the allowed"),
        (["mystery-model"], "mystery-model", "summarize", "x", "no price for “mystery-model”"),
        (["gpt-4o-mini"], "gpt-4o-mini", "billing", "x", "has no stage billing"),
        (["gpt-4o-mini"], "gpt-4o-mini", "note", "  ", "Say why"),
        ([" "], "gpt-4o-mini", "note", "x", "at least one allowed model"),
    ]:
        with pytest.raises(OperationRefused, match=message):
            publish(stage, allowed, default, reason=reason)
    assert ModelPolicy.objects.count() == 2


def test_an_admin_publishes_a_version_and_cannot_edit_or_delete_one(admin_client, admin_user):
    url = "/admin/pipeline/modelpolicy/add/"
    form = {
        "workflow": "visit",
        "stage": "note",
        "allowed": "gpt-4o-mini, gpt-4.1-mini",
        "default_model": "gpt-4.1-mini",
        "reason": "the note reads better",
    }

    refused = admin_client.post(url, form | {"allowed": "gpt-4.1-mini, mystery-model"})
    assert refused.status_code == 200 and "no price for “mystery-model”" in refused.content.decode()
    assert admin_client.post(url, form).status_code == 302
    assert admin_client.post(url, form | {"default_model": "gpt-4o-mini"}).status_code == 302

    versions = list(ModelPolicy.objects.order_by("version"))
    assert [(p.version, p.default_model, p.created_by) for p in versions] == [
        (1, "gpt-4.1-mini", admin_user),
        (2, "gpt-4o-mini", admin_user),
    ]
    assert versions[0].allowed_models == ["gpt-4o-mini", "gpt-4.1-mini"]
    listing = admin_client.get("/admin/pipeline/modelpolicy/").content.decode()
    assert "gpt-4o-mini: 0.15 / 0.60 (from 2024-07-18, price table file)" in listing
    change = admin_client.post(
        f"/admin/pipeline/modelpolicy/{versions[0].pk}/change/", form | {"stage": "summarize"}
    )
    assert change.status_code == 403
    assert (
        admin_client.post(
            f"/admin/pipeline/modelpolicy/{versions[0].pk}/delete/", {"post": "yes"}
        ).status_code
        == 403
    )
    assert ModelPolicy.objects.count() == 2


def test_an_admin_publishes_a_price_row_that_prices_the_next_calls_only(
    admin_client, admin_user, clinician, llm_server
):
    first = run_visit(clinician)
    url = "/admin/pipeline/modelprice/add/"
    form = {
        "model": "gpt-4o-mini",
        "effective_from": timezone.now().date().isoformat(),
        "input_usd_per_million": "1.00",
        "output_usd_per_million": "2.00",
        "reason": "provider notice of 1 December",
    }

    refused = admin_client.post(url, form | {"output_usd_per_million": "-2"})
    assert refused.status_code == 200 and "cannot be negative" in refused.content.decode()
    refused = admin_client.post(url, form | {"reason": "  "})
    assert refused.status_code == 200 and "This field is required" in refused.content.decode()
    assert admin_client.post(url, form).status_code == 302
    second = run_visit(clinician)

    row = ModelPrice.objects.get()
    assert (row.created_by, row.created_by_label, row.reason) == (
        admin_user,
        "admin",
        "provider notice of 1 December",
    )
    # The first visit's calls keep the price they were made at; the second's use the new row.
    for visit, (inp, out) in [(first, ("0.15", "0.60")), (second, ("1.00", "2.00"))]:
        for call in LLMCall.objects.filter(stage__run_id=visit.current_run_id):
            expected = (
                call.input_tokens * Decimal(inp) + call.output_tokens * Decimal(out)
            ) / 1_000_000
            assert call.cost_usd == expected.quantize(Decimal("0.000001"))
            assert call.cost_usd > 0
    listing = admin_client.get("/admin/pipeline/modelprice/").content.decode()
    assert "provider notice of 1 December" in listing
    row_url = f"/admin/pipeline/modelprice/{row.pk}"
    assert admin_client.post(f"{row_url}/change/", form).status_code == 403
    assert admin_client.post(f"{row_url}/delete/", {"post": "yes"}).status_code == 403
    assert ModelPrice.objects.count() == 1
