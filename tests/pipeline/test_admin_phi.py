"""PHI in the engine's admin: stage outputs, model answers, checkpoints, error messages and
tracebacks are shown (and searched) only with `pipeline.view_phi`; and an error a provider
answers with, quoting our request, is stored without the request's text."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from django.contrib.auth.models import Permission
from django.test import Client
from django.urls import reverse
from django.utils import timezone
from pydantic import BaseModel

from pipeline.core import executor, store, workflow as workflow_module
from pipeline.core.errors import PermanentError
from pipeline.core.models import Attempt, Checkpoint, LLMCall, Run, Stage
from pipeline.core.policy import RetryPolicy, failure_from_exception
from pipeline.core.states import AttemptStatus, FailureKind, RunStatus, StageStatus
from pipeline.core.workflow import StageSpec, Workflow, workflow_register
from pipeline.llm.gateway import LLMGateway
from tests.fakes.llm_server import FakeLLMServer

MARKER = "Zebrafinch-PHI-7731"  # stands for a patient's words
PHI_HIDDEN = "hidden: needs the view_phi permission"
MODELS = ["run", "stage", "attempt", "llmcall"]


@pytest.fixture
def phi_rows(db) -> dict[str, Any]:
    """A failed run whose every PHI-bearing column carries MARKER, beside ones that carry none."""
    run = Run.objects.create(
        workflow="t-phi",
        subject="thing:1",
        status=RunStatus.FAILED,
        error=f"ask: the model said {MARKER}",
    )
    stage = Stage.objects.create(
        run=run,
        name="ask",
        position=0,
        status=StageStatus.FAILED,
        failure_kind=FailureKind.PERMANENT,
        output={"summary": f"patient says {MARKER}"},
        error_code="llm_http_400",
        error_message=f"rejected: {MARKER}",
    )
    attempt = Attempt.objects.create(
        stage=stage,
        number=1,
        status=AttemptStatus.FAILED,
        worker="worker-on-host-9",
        started_at=timezone.now(),
        finished_at=timezone.now(),
        error_code="llm_http_400",
        error_message=f"rejected: {MARKER}",
        traceback=f'Traceback (most recent call last):\nValueError: "{MARKER}"\n',
        input_tokens=1234,
        output_tokens=567,
    )
    Checkpoint.objects.create(stage=stage, key="chunk:0", value={"text": MARKER}, attempt_number=1)
    call = LLMCall.objects.create(
        stage=stage,
        attempt=attempt,
        digest="d" * 64,
        model="gpt-4o-mini",
        content=f'{{"summary": "{MARKER}"}}',
        input_tokens=1234,
        output_tokens=567,
        cost_usd=Decimal("0.000525"),
    )
    return {"run": run, "stage": stage, "attempt": attempt, "llmcall": call}


def _staff_client(django_user_model, *, view_phi: bool) -> Client:
    username = "oncall-phi" if view_phi else "oncall"
    user = django_user_model.objects.create_user(username=username, password="x", is_staff=True)
    views = Permission.objects.filter(
        content_type__app_label="pipeline", codename__startswith="view_"
    )
    user.user_permissions.add(*views.exclude(codename="view_phi"))
    if view_phi:
        user.user_permissions.add(Permission.objects.get(codename="view_phi"))
    client = Client()
    client.force_login(user)
    return client


def _pages(client: Client, rows: dict[str, Any]) -> dict[str, str]:
    """The HTML of every admin page of the engine that shows these rows: the lists and each
    row's page."""
    urls = {f"{m} list": reverse(f"admin:pipeline_{m}_changelist") for m in MODELS}
    urls["audit list"] = reverse("admin:pipeline_auditentry_changelist")
    for model in MODELS:
        urls[f"{model} page"] = reverse(f"admin:pipeline_{model}_change", args=[rows[model].pk])
    return {name: _get(client, url).content.decode() for name, url in urls.items()}


def _get(client: Client, url: str, **params: str) -> Any:
    response = client.get(url, params)
    assert response.status_code == 200, url
    return response


def test_without_view_phi_no_admin_page_shows_phi_but_the_rest_is_there(
    django_user_model, phi_rows
):
    client = _staff_client(django_user_model, view_phi=False)

    pages = _pages(client, phi_rows)

    assert [name for name, html in pages.items() if MARKER in html] == []
    for name in ["run page", "stage page", "attempt page", "llmcall page"]:
        assert PHI_HIDDEN in pages[name], name
    # What is not PHI stays: status, error code, worker, tokens, cost.
    attempt_page = pages["attempt page"]
    for shown in ["llm_http_400", "worker-on-host-9", "1234", "567", "Failed"]:
        assert shown in attempt_page, shown
    assert "worker-on-host-9" in pages["stage page"]  # the attempts inline
    assert "0.000525" in pages["llmcall page"]
    assert "llm_http_400" in pages["stage list"]


def test_with_view_phi_the_pages_show_outputs_answers_messages_and_tracebacks(
    django_user_model, phi_rows
):
    client = _staff_client(django_user_model, view_phi=True)

    pages = _pages(client, phi_rows)

    for name in ["run page", "stage page", "attempt page", "llmcall page"]:
        assert MARKER in pages[name], name
        assert PHI_HIDDEN not in pages[name], name
    assert "Traceback (most recent call last)" in pages["attempt page"]
    assert "Traceback (most recent call last)" in pages["stage page"]  # the attempts inline


def test_searching_for_phi_finds_nothing_without_view_phi(django_user_model, phi_rows):
    def found(client: Client) -> dict[str, int]:
        return {
            model: _get(client, reverse(f"admin:pipeline_{model}_changelist"), q=MARKER)
            .context_data["cl"]
            .result_count
            for model in MODELS
        }

    assert found(_staff_client(django_user_model, view_phi=False)) == dict.fromkeys(MODELS, 0)
    # Error messages and tracebacks are searchable with the permission; answers never are.
    with_phi = found(_staff_client(django_user_model, view_phi=True))
    assert with_phi == {"run": 1, "stage": 1, "attempt": 1, "llmcall": 0}


# --- what a provider's error stores ----------------------------------------------------------


class EchoingLLMServer(FakeLLMServer):
    """Refuses every request with a 400 whose body quotes the request back, as providers do when
    they name an invalid value."""

    def _handle_chat(self, handler: Any, body: dict[str, Any]) -> None:
        quoted = body["messages"][-1]["content"]
        error = {
            "message": f"Invalid value for 'messages[0].content': {quoted!r}.",
            "type": "invalid_request_error",
            "param": "messages[0].content",
            "code": "invalid_value",
        }
        handler.send_json(400, {"error": error})


class Answer(BaseModel):
    text: str


def ask(ctx: Any) -> Answer:
    return LLMGateway(ctx).complete(
        messages=[{"role": "user", "content": f"Summarise: the patient says {MARKER}."}],
        output_type=Answer,
        offline=lambda: Answer(text="offline"),
    )


@pytest.mark.django_db(transaction=True)
def test_a_provider_error_quoting_the_prompt_is_stored_without_it(settings, monkeypatch):
    monkeypatch.setattr(workflow_module, "_workflows", dict(workflow_module._workflows))
    workflow = Workflow(
        name="t-phi-echo",
        stages=(StageSpec("ask", ask, RetryPolicy(maximum_attempts=1), output=Answer),),
    )
    workflow_register(workflow)
    with EchoingLLMServer() as server:
        settings.OPENAI_API_KEY = "test-key"
        settings.OPENAI_BASE_URL = server.base_url
        settings.LLM_MODEL = "gpt-4o-mini"
        settings.LLM_REQUEST_TIMEOUT_SECONDS = 1.0

        run = executor.run_execute_inline(
            store.run_create(workflow=workflow, subject="thing:1", input={})
        )

    stage = run.stages.get()
    attempt = stage.attempts.get()
    assert (run.status, stage.failure_kind) == (RunStatus.FAILED, FailureKind.PERMANENT)
    assert attempt.error_code == "llm_http_400"
    stored = {
        "run.error": run.error,
        "stage.error_message": stage.error_message,
        "attempt.error_message": attempt.error_message,
        "attempt.traceback": attempt.traceback,
    }
    assert [name for name, text in stored.items() if MARKER in text] == []
    # What the provider said that cannot quote us is kept: status, error type and code.
    assert attempt.error_message == (
        "the LLM provider rejected the request (HTTP 400, invalid_request_error, "
        "invalid_value); check LLM_MODEL and OPENAI_BASE_URL"
    )
    assert "openai.BadRequestError" in attempt.traceback


def test_an_error_ours_was_raised_from_keeps_its_type_and_stack_but_not_its_words():
    try:
        try:
            raise KeyError(f"the patient says {MARKER}")
        except KeyError as exc:
            raise PermanentError("the lookup failed", code="lookup") from exc
    except PermanentError as exc:
        failure = failure_from_exception(exc, RetryPolicy())

    assert MARKER not in failure.traceback
    assert "KeyError: <message withheld>" in failure.traceback
    assert 'raise KeyError(f"the patient says {MARKER}")' in failure.traceback  # its stack
    assert "pipeline.core.errors.PermanentError: the lookup failed" in failure.traceback
