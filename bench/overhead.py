"""3. Engine overhead per stage with no-op stages, and visits per minute with 1, 2 and 4 workers.

Overhead: a Workflow of N no-op StageSpecs is registered in this process and one run of it is
driven by `executor.run_execute_inline` (claim with lease, heartbeat thread, output and
status commit, next stage opened and claimed inline). The baseline calls the same N no-op
functions directly. (ours - direct) / N is the engine's cost per stage, on SQLite (a temporary
file) and on PostgreSQL (the dedicated benchmark database, over TCP on 127.0.0.1).

Throughput: a `qcluster` with Q_WORKERS = 1, 2, 4 (Q_QUEUE_LIMIT = workers) on PostgreSQL; a
batch of visits of fixtures/visit_sample.ogg (42 s, offline LLM engine) is queued at once after
a warm-up batch (one visit per worker, so every worker has loaded the model); visits per
minute = batch / (last run finished - first visit queued).
"""

from __future__ import annotations

import subprocess
import sys
import time

from common import (
    SAMPLE_VISIT,
    Row,
    base_environment,
    cli,
    clinician,
    cluster,
    django_setup,
    emit,
    fmt,
    median,
    migrate,
    pg_drop,
    pg_recreate,
    queue_purge,
    sqlite_url,
    wait_for,
    workdir,
)
from pydantic import BaseModel

NAME = "overhead"


class Empty(BaseModel):
    pass


def noop(ctx: object) -> Empty:
    return Empty()


def overhead_per_stage(stages: int, reps: int) -> tuple[float, float]:
    """(median seconds per stage through the engine, median per direct call)."""
    from pipeline.core import executor, store
    from pipeline.core.policy import RetryPolicy
    from pipeline.core.workflow import StageSpec, Workflow, workflow_register

    workflow = Workflow(
        name="bench-noop",
        stages=tuple(
            StageSpec(
                name=f"s{i:03d}", run=noop, output=Empty, policy=RetryPolicy(maximum_attempts=1)
            )
            for i in range(stages)
        ),
    )
    workflow_register(workflow)
    ours, direct = [], []
    for rep in range(reps + 1):
        run = store.run_create(workflow=workflow, subject=f"bench-{rep}", input={})
        started = time.perf_counter()
        run = executor.run_execute_inline(run, worker="bench")
        elapsed = time.perf_counter() - started
        assert run.status == "succeeded", run.error  # a broken run would measure nothing
        started = time.perf_counter()
        for spec in workflow.stages:
            spec.run(None)
        direct_elapsed = time.perf_counter() - started
        if rep:  # the first run warms connections and caches
            ours.append(elapsed / stages)
            direct.append(direct_elapsed / stages)
    return median(ours) or 0.0, median(direct) or 0.0


def overhead_child(database: str, stages: int, reps: int) -> None:
    """Runs in a child process so that each database gets a fresh Django."""
    from common import pg_recreate as recreate

    with workdir(NAME) as tmp:
        url = recreate() if database == "postgres" else sqlite_url(tmp)
        django_setup(base_environment(tmp, url))
        migrate()
        ours, direct = overhead_per_stage(stages, reps)
        from django.db import connections

        connections.close_all()
    print(f"{ours} {direct}")


def throughput(tmp, env, workers: int, batch: int, user, **extra: str) -> tuple[float, int]:
    from django.utils import timezone

    from pipeline.core.models import Run
    from visits.services import visit_create, visit_start

    def submit(count: int) -> list[int]:
        ids = []
        for _ in range(count):
            visit = visit_create(clinician=user, recording=SAMPLE_VISIT)
            visit_start(visit=visit)
            ids.append(visit.current_run_id)
        return ids

    def finished(ids: list[int]) -> bool:
        return not Run.objects.filter(id__in=ids, finished_at__isnull=True).exists()

    queue_purge()
    child = cluster(
        env,
        tmp / f"workers-{workers}.log",
        Q_WORKERS=str(workers),
        Q_QUEUE_LIMIT=str(workers),
        **extra,
    )
    try:
        warm = submit(workers)
        wait_for(lambda: finished(warm), timeout=120, poll=0.1)
        started = timezone.now()
        ids = submit(batch)
        wait_for(lambda: finished(ids), timeout=300, poll=0.1)
        runs = Run.objects.filter(id__in=ids)
        succeeded = runs.filter(status="succeeded").count()
        last = max(run.finished_at or timezone.now() for run in runs)
        seconds = (last - started).total_seconds()
    finally:
        child.kill()
    return batch / seconds * 60, succeeded


def main() -> None:
    parser = cli(NAME, __doc__.splitlines()[0])
    parser.add_argument("--child", choices=["sqlite", "postgres"], help=argparse_hidden())
    args = parser.parse_args()
    stages, reps = (50, 3) if args.quick else (100, 5)
    if args.child:
        overhead_child(args.child, stages, reps)
        return
    rows: list[Row] = []
    for database in ("sqlite", "postgres"):
        out = subprocess.run(
            [sys.executable, __file__, "--child", database] + (["--quick"] if args.quick else []),
            capture_output=True,
            text=True,
            check=False,
        )
        try:
            ours, direct = (float(v) for v in out.stdout.split()[-2:])
        except ValueError:
            rows.append(
                Row(
                    NAME,
                    f"engine overhead per no-op stage, {database}",
                    "error",
                    note=out.stderr.strip().splitlines()[-1:][0] if out.stderr else "",
                )
            )
            continue
        rows.append(
            Row(
                NAME,
                f"engine overhead per no-op stage, {database}",
                fmt(ours - direct, "ms", 2),
                baseline=fmt(direct, "ms", 4),
                ratio="",
                note=f"median of {reps} runs x {stages} stages, run_execute_inline; "
                "baseline = direct call of the no-op",
            )
        )
    batch = 4 if args.quick else 6
    with workdir(NAME) as tmp:
        env = base_environment(tmp, pg_recreate())
        django_setup(env)
        try:
            migrate()
            user = clinician()
            per_minute = {}
            for workers in (1, 2, 4):
                rate, ok = throughput(tmp, env, workers, batch, user)
                per_minute[workers] = rate
                rows.append(
                    Row(
                        NAME,
                        f"visits per minute, {workers} worker(s)",
                        f"{rate:.1f}/min",
                        ratio=f"{rate / per_minute[1]:.2f}x vs 1 worker",
                        note=f"{ok}/{batch} succeeded; 42 s sample, PostgreSQL, ORM broker",
                    )
                )
            # The same 4 workers with one CTranslate2 thread each (2 cores, see BENCHMARKS.md).
            rate, ok = throughput(tmp, env, 4, batch, user, WHISPER_CPU_THREADS="1")
            rows.append(
                Row(
                    NAME,
                    "visits per minute, 4 worker(s), WHISPER_CPU_THREADS=1",
                    f"{rate:.1f}/min",
                    ratio=f"{rate / per_minute[1]:.2f}x vs 1 worker",
                    note=f"{ok}/{batch} succeeded; default WHISPER_CPU_THREADS=0 lets each "
                    "worker's CTranslate2 pick its own thread count",
                )
            )
        finally:
            pg_drop()
    emit(rows, args.json)


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
