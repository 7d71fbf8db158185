"""The same durability on django-q2's Redis broker: the path for sites that run clusters on
several hosts.

django-q2 reads its configuration once, at import, so this process (configured for the ORM
broker) never enqueues: every process that talks to the queue is a child with the Redis
environment -- the clusters, `process_recording` (which creates the visit and enqueues its first
stage) and `pipeline_sweep`. This process only kills, waits and reads the database."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django_q.models import OrmQ

from pipeline.core.models import AttemptStatus, Checkpoint, Run, RunStatus, Stage, StageStatus
from tests.conftest import SAMPLE_VISIT, SHORT_VISIT, requires_postgres
from tests.support.cluster import Cluster, cluster_environment, wait_for
from visits.models import Visit

REDIS_HOST, REDIS_PORT, REDIS_DB = "127.0.0.1", 6379, 9
FINAL = (RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED)


def redis_reachable() -> bool:
    try:
        with socket.create_connection((REDIS_HOST, REDIS_PORT), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


pytestmark = [
    requires_postgres,
    pytest.mark.cluster,
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(not redis_reachable(), reason="needs Redis on 127.0.0.1:6379"),
]


@pytest.fixture
def redis_env(settings) -> Iterator[dict[str, str]]:
    """The environment of every queue client in these tests. A site name of its own (the name
    django-q2 signs with and, with no Q_CLUSTER_NAME, the queue served) keeps this test's
    messages apart from anything else using the same Redis database."""
    settings.PIPELINE_LEASE_SECONDS = 2.0
    settings.TRANSCRIBE_CHUNK_SECONDS = 10.0
    name = f"visit-pipeline-test-{uuid.uuid4().hex[:8]}"
    yield {
        "Q_BROKER": "redis",
        "REDIS_URL": f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}",
        "Q_SITE_NAME": name,
        "PIPELINE_SWEEP_SECONDS": "1",
    }
    import redis

    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=REDIS_DB)
    client.delete(f"django_q:{name}:q")
    client.close()


@pytest.fixture
def clusters(redis_env) -> Iterator[list[Cluster]]:
    started: list[Cluster] = []
    yield started
    for cluster in started:
        cluster.kill()


def start_cluster(clusters: list[Cluster], tmp_path: Path, env: dict[str, str]) -> Cluster:
    cluster = Cluster(tmp_path / f"cluster-{len(clusters)}.log", **env).start()
    clusters.append(cluster)
    return cluster


def manage(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """A management command in a child process with the Redis broker configured."""
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=settings.BASE_DIR,
        env=cluster_environment(**env),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def enqueue(env: dict[str, str], recording: Path) -> Visit:
    """`process_recording` without --inline: create the visit, enqueue it on Redis, return."""
    done = manage(env, "process_recording", str(recording), "--consent", "verbal", "--json")
    assert done.returncode == 0, done.stderr
    document: dict[str, Any] = json.loads(done.stdout)
    assert document["status"] in ("queued", "running"), document
    return Visit.objects.get(pk=document["visit"])


def run_status(visit: Visit) -> str:
    return Run.objects.values_list("status", flat=True).get(pk=visit.current_run_id)


def stage(visit: Visit, name: str) -> Stage:
    return Stage.objects.get(run_id=visit.current_run_id, name=name)


def test_cluster_processes_a_visit_over_redis(clusters, redis_env, tmp_path):
    cluster = start_cluster(clusters, tmp_path, redis_env)
    visit = enqueue(redis_env, SHORT_VISIT)

    wait_for(lambda: run_status(visit) in FINAL, timeout=120, what="the run to finish")

    assert run_status(visit) == RunStatus.SUCCEEDED, cluster.log()
    attempts = [
        (s.name, a.number, a.status)
        for s in Stage.objects.filter(run_id=visit.current_run_id).order_by("position")
        for a in s.attempts.order_by("number")
    ]
    assert attempts == [
        ("ingest", 1, "succeeded"),
        ("transcribe", 1, "succeeded"),
        ("summarize", 1, "succeeded"),
        ("note", 1, "succeeded"),
    ]
    assert stage(visit, "transcribe").output["words"] > 10
    # The wake-up went through Redis: the ORM broker's table never saw a message.
    assert OrmQ.objects.count() == 0


def test_killed_cluster_on_redis_is_recovered_by_the_sweep(clusters, redis_env, tmp_path):
    first = start_cluster(clusters, tmp_path, redis_env)
    visit = enqueue(redis_env, SAMPLE_VISIT)

    # SIGKILL the cluster once transcription has kept at least one finished chunk.
    wait_for(
        lambda: Checkpoint.objects.filter(stage__run_id=visit.current_run_id).exists(),
        timeout=120,
        what="the first transcribed chunk",
    )
    first.kill()
    assert stage(visit, "transcribe").status == StageStatus.RUNNING  # nobody told the database
    kept = Checkpoint.objects.filter(stage=stage(visit, "transcribe")).count()

    second = start_cluster(clusters, tmp_path, redis_env)
    # The lease (2 s) expires; a sweep (enqueuing on Redis) takes the stage back.
    reaped = wait_for(
        lambda: _sweep_reaped(redis_env), timeout=30, what="a sweep to reap the lease"
    )
    assert reaped >= 1
    wait_for(lambda: run_status(visit) in FINAL, timeout=120, what="the run to finish")

    assert run_status(visit) == RunStatus.SUCCEEDED, second.log()
    transcribe = stage(visit, "transcribe")
    assert [(a.number, a.status, a.error_code) for a in transcribe.attempts.order_by("number")] == [
        (1, AttemptStatus.LOST, "lease_lost"),
        (2, AttemptStatus.SUCCEEDED, ""),
    ]
    assert stage(visit, "ingest").attempts.count() == 1
    assert transcribe.output["chunks_reused"] >= kept >= 1
    assert OrmQ.objects.count() == 0


def _sweep_reaped(env: dict[str, str]) -> int:
    """Run `pipeline_sweep` once; how many expired leases it took back."""
    done = manage(env, "pipeline_sweep")
    assert done.returncode == 0, done.stderr
    # "reaped N, enqueued M"
    return int(done.stdout.split(",")[0].split()[-1])
