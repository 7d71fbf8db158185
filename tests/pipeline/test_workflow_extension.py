"""Adding a stage, as ARCHITECTURE.md tells a newcomer to: declare it beside the others with its
output model and policy, and it runs, retries and is read back like the four visit stages."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from pipeline.core import executor, store, workflow as workflow_module
from pipeline.core.errors import PermanentError, TransientError
from pipeline.core.policy import RetryPolicy
from pipeline.core.selectors import run_stages, stage_output
from pipeline.core.states import FailureKind, RunStatus, StageStatus
from pipeline.core.workflow import StageRef, StageSpec, Workflow, workflow_register
from pipeline.ops import checks
from tests.conftest import SHORT_VISIT
from visits.models import Visit
from visits.refs import NOTE
from visits.schemas import NoteOutput
from visits.services import visit_create
from visits.stages import VISIT_WORKFLOW

# The heartbeat runs on its own connection: the rows it fences on must be committed.
pytestmark = pytest.mark.django_db(transaction=True)


class ReadingLevel(BaseModel):
    """The fifth stage's output: how long the patient's sentences are."""

    sentences: int
    words_per_sentence: float


class NoPatientSummary(PermanentError):
    code = "no_patient_summary"


calls: list[int] = []


def reading_level(ctx) -> ReadingLevel:
    calls.append(ctx.attempt_number)
    if ctx.attempt_number == 1:
        raise TransientError("the readability service hiccuped", code="hiccup")
    summary = ctx.output(NOTE).note.patient_summary
    if not summary:
        raise NoPatientSummary("the note has no patient summary to grade")
    words = sum(len(item.text.split()) for item in summary)
    return ReadingLevel(sentences=len(summary), words_per_sentence=words / len(summary))


READING_LEVEL = StageSpec(
    name="reading_level",
    title="Grade the patient summary",
    run=reading_level,
    output=ReadingLevel,
    policy=RetryPolicy(
        initial_interval_seconds=1,
        maximum_attempts=3,
        jitter=0,
        start_to_close_timeout_seconds=30,
        non_retryable_error_codes=(NoPatientSummary.code,),
    ),
)

EXTENDED = Workflow(name="visit-graded", stages=(*VISIT_WORKFLOW.stages, READING_LEVEL))


@pytest.fixture
def extended_workflow():
    workflow_register(EXTENDED)
    calls.clear()
    return EXTENDED


def test_a_fifth_stage_runs_after_the_four_retries_by_its_policy_and_reads_back_typed(
    clinician, extended_workflow
):
    visit: Visit = visit_create(clinician=clinician, recording=SHORT_VISIT)
    run = store.run_create(
        workflow=extended_workflow,
        subject=visit.subject,
        input={"recording": visit.recording.name},
    )

    run = executor.run_execute_inline(run)

    assert run.status == RunStatus.SUCCEEDED, run.error
    assert [s.name for s in run_stages(run.id)] == [
        "ingest",
        "transcribe",
        "summarize",
        "note",
        "reading_level",
    ]
    assert calls == [1, 2]  # the transient error was retried, once
    graded = stage_output(run, StageRef("reading_level", ReadingLevel))
    note = stage_output(run, NOTE)
    assert isinstance(graded, ReadingLevel) and note is not None
    assert graded.sentences == len(note.note.patient_summary) > 0
    with pytest.raises(TypeError, match="outputs ReadingLevel, not NoteOutput"):
        stage_output(run, StageRef("reading_level", NoteOutput))


def test_a_stage_returning_the_wrong_shape_fails_permanently_with_a_clear_code():
    def sloppy(ctx) -> dict[str, object]:
        return {"sentences": "many"}

    workflow = Workflow(
        name="t-sloppy",
        stages=(StageSpec("grade", sloppy, RetryPolicy(maximum_attempts=3), output=ReadingLevel),),
    )
    workflow_register(workflow)
    run = executor.run_execute_inline(
        store.run_create(workflow=workflow, subject="thing:1", input={})
    )
    stage = run.stages.get()
    assert (stage.status, stage.failure_kind, stage.attempt_count) == (
        StageStatus.FAILED,
        FailureKind.PERMANENT,
        1,
    )
    assert stage.error_code == "stage_output_invalid"
    assert "is not a ReadingLevel" in stage.error_message


def test_the_system_check_names_a_stage_without_an_output_model(monkeypatch):
    def untyped(ctx) -> BaseModel:
        return BaseModel()

    # Registered for this test only: `manage.py check` elsewhere must not see it.
    monkeypatch.setattr(workflow_module, "_workflows", dict(workflow_module._workflows))
    workflow_register(
        Workflow(name="t-untyped", stages=(StageSpec("loose", untyped, RetryPolicy()),))
    )
    found = [m for m in checks.check_stage_outputs() if m.obj == "t-untyped.loose"]
    assert [m.id for m in found] == ["pipeline.E005"]
    assert "output=" in found[0].hint
