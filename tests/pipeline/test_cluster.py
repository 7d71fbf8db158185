"""Durability against a real django-q2 cluster on PostgreSQL: no `sync=True` here. The
contract both backends keep (a visit, faults, retry, re-run, cancel, a killed worker, routed
queues) is in `test_contract.py`; these are the built-in engine's own: fan-out, zombies.

Clusters run as child processes on the test database; the test process only enqueues, kills,
sweeps and reads the database."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.conf import settings
from django.db import OperationalError, transaction

from pipeline.core import recovery
from pipeline.core.models import (
    AttemptStatus,
    RunStatus,
    Stage,
    StageStatus,
    Unit,
)
from pipeline.core.states import UnitStatus
from tests.conftest import SAMPLE_VISIT, requires_postgres
from tests.support.cluster import Cluster, cluster_environment, wait_for
from visits.models import Visit
from visits.quality.evaluation import word_error_rate
from visits.schemas import TranscribeOutput
from visits.services import visit_create, visit_start
from visits.speech.transcription import transcript_load

pytestmark = [requires_postgres, pytest.mark.cluster, pytest.mark.django_db(transaction=True)]

FINAL = (RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED)


@pytest.fixture
def clusters(tmp_path: Path, settings) -> Iterator[list[Cluster]]:
    settings.PIPELINE_LEASE_SECONDS = 2.0
    settings.TRANSCRIBE_CHUNK_SECONDS = 10.0
    started: list[Cluster] = []
    yield started
    for cluster in started:
        cluster.kill()  # a graceful django-q2 shutdown takes ~15 s and proves nothing here


def start_cluster(clusters: list[Cluster], tmp_path: Path, **env: str) -> Cluster:
    cluster = Cluster(tmp_path / f"cluster-{len(clusters)}.log", **env).start()
    clusters.append(cluster)
    return cluster


def run_status(visit) -> str:
    visit.current_run.refresh_from_db()
    return visit.current_run.status


def stage(visit, name: str) -> Stage:
    return Stage.objects.get(run=visit.current_run, name=name)


def test_transcription_fans_out_to_both_workers_and_hears_what_one_pass_hears(
    clusters, tmp_path, clinician
):
    cluster = start_cluster(clusters, tmp_path)
    fanned = visit_create(clinician=clinician, recording=SAMPLE_VISIT)
    visit_start(visit=fanned)
    wait_for(lambda: run_status(fanned) in FINAL, timeout=180, what="the run to finish")
    assert run_status(fanned) == RunStatus.SUCCEEDED, cluster.log()

    units = Unit.objects.filter(stage__run=fanned.current_run, stage__name="transcribe")
    assert len(units) >= 3 and all(u.status == UnitStatus.DONE for u in units)
    # Chunks were heard by both worker processes, not queued behind one.
    assert len({unit.worker for unit in units}) == 2
    assert sum(unit.tries for unit in units) == len(units)

    # The same chunks heard one after another, in this process (whose Whisper may run more
    # threads: the sums of a float model can then differ in the last bit, hence the margin).
    one_pass = visit_create(clinician=clinician, recording=SAMPLE_VISIT)
    visit_start(visit=one_pass, inline=True)
    assert run_status(one_pass) == RunStatus.SUCCEEDED
    fanned_text, one_pass_text = (
        " ".join(
            s.text
            for s in transcript_load(TranscribeOutput(**stage(v, "transcribe").output)).segments
        )
        for v in (fanned, one_pass)
    )
    assert word_error_rate(one_pass_text, fanned_text) <= 0.01


def test_a_zombie_worker_cannot_overwrite_the_newer_attempt(clusters, tmp_path, clinician):
    zombie = start_cluster(clusters, tmp_path)
    visit = visit_create(clinician=clinician, recording=SAMPLE_VISIT)
    visit_start(visit=visit)
    wait_for(
        lambda: stage(visit, "transcribe").status == StageStatus.RUNNING,
        timeout=60,
        what="transcription to start",
    )
    # Freeze the worker mid-stage: it stops heartbeating but is still alive.
    zombie.signal(signal.SIGSTOP)
    wait_for(lambda: recovery.sweep().reaped, timeout=30, what="the sweep to reap the lease")

    start_cluster(clusters, tmp_path)
    wait_for(
        lambda: stage(visit, "transcribe").status == StageStatus.SUCCEEDED,
        timeout=120,
        what="the new attempt to finish transcription",
    )
    winner = stage(visit, "transcribe").output
    # Wake the zombie: it finishes its work and tries to commit it.
    zombie.signal(signal.SIGCONT)
    wait_for(lambda: run_status(visit) in FINAL, timeout=120, what="the run to finish")

    transcribe = stage(visit, "transcribe")
    assert transcribe.output == winner
    assert "attempt-2" in winner["transcript"]
    statuses = list(transcribe.attempts.order_by("number").values_list("status", flat=True))
    assert statuses == [AttemptStatus.LOST, AttemptStatus.SUCCEEDED]
    assert run_status(visit) == RunStatus.SUCCEEDED


def test_a_worker_frozen_inside_a_transaction_loses_its_row_locks(clinician):
    # How the zombie test above could hang: frozen between two statements of a transaction
    # (planning or claiming units), a worker kept its row locks, and the next attempt waited
    # on them for ever. PostgreSQL now ends a session idle in a transaction.
    visit = visit_create(clinician=clinician, recording=SAMPLE_VISIT)
    code = (
        "import time\n"
        "from django.db import transaction\n"
        "from visits.models import Visit\n"
        "with transaction.atomic():\n"
        f"    Visit.objects.select_for_update().get(pk={visit.pk})\n"
        "    print('locked', flush=True)\n"
        "    time.sleep(60)\n"
    )
    worker = subprocess.Popen(
        [sys.executable, "manage.py", "shell", "--no-imports", "-c", code],
        cwd=settings.BASE_DIR,
        env=cluster_environment(DB_IDLE_IN_TRANSACTION_SECONDS="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert worker.stdout is not None
        assert worker.stdout.readline().strip() == "locked"
        worker.send_signal(signal.SIGSTOP)
        wait_for(
            lambda: visit_lockable(visit.pk), timeout=15, what="the frozen worker's lock to go"
        )
    finally:
        worker.kill()
        worker.wait(timeout=10)


def visit_lockable(pk: int) -> bool:
    try:
        with transaction.atomic():
            Visit.objects.select_for_update(nowait=True).get(pk=pk)
    except OperationalError:
        return False
    return True
