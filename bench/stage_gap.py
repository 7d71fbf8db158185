"""2. Stage gap on a running cluster against a raw django-q2 task hop, same broker and poll.

Gap = Attempt.started_at of stage N+1 minus Attempt.finished_at of stage N, for visits of the
real workflow (visit_short.mp3, offline LLM engine) run one at a time on a running `qcluster`
(PostgreSQL, ORM broker, Q_POLL_SECONDS as configured). Baseline = a chain of raw django-q2
tasks (bench/hop.py) on the same cluster: each enqueues the next; enqueue -> start.

Cases:
* same queue: every stage on the default cluster, so the worker claims the next stage inline;
* routed: TRANSCRIBE_QUEUE=transcribe and a second cluster for that queue (started with
  Q_CLUSTER_NAME=transcribe), measured against a raw hop between the two clusters.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

from common import (
    SHORT_VISIT,
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
    ratio_row,
    wait_for,
    workdir,
)

NAME = "stage_gap"
FINAL = ("succeeded", "failed", "cancelled")


def run_visits(count: int, user) -> list[int]:
    """Submit visits one at a time, each after the previous finished; return their run ids."""
    from pipeline.core.models import Run
    from visits.services import visit_create, visit_start

    runs = []
    for _ in range(count):
        visit = visit_create(clinician=user, recording=SHORT_VISIT)
        visit_start(visit=visit)
        run_id = visit.current_run_id
        wait_for(
            lambda run_id=run_id: Run.objects.get(id=run_id).status in FINAL,
            timeout=60,
        )
        runs.append(run_id)
    return runs


def gaps(run_ids: list[int]) -> dict[str, list[float]]:
    """Per transition (`ingest->transcribe`...), the gaps of the succeeded attempts."""
    from pipeline.core.models import Attempt

    found: dict[str, list[float]] = {}
    for run_id in run_ids:
        attempts = list(
            Attempt.objects.filter(stage__run_id=run_id, status="succeeded")
            .select_related("stage")
            .order_by("stage__position")
        )
        for before, after in itertools.pairwise(attempts):
            key = f"{before.stage.name}->{after.stage.name}"
            found.setdefault(key, []).append(
                (after.started_at - before.finished_at).total_seconds()
            )
    return found


def workers_of(run_ids: list[int], stage: str) -> set[str]:
    from pipeline.core.models import Attempt

    return set(
        Attempt.objects.filter(stage__run_id__in=run_ids, stage__name=stage).values_list(
            "worker", flat=True
        )
    )


def raw_hops(tmp: Path, count: int, queues: list[str], tag: str) -> list[float]:
    from django_q.tasks import async_task

    out = tmp / f"hops-{tag}.txt"
    out.write_text("")
    first = queues[0] if queues else ""
    options: dict[str, object] = {"task_name": "hop-start", "timeout": 60}
    if first:
        options["cluster"] = first
    rotated = queues[1:] + queues[:1]
    async_task("bench.hop.hop", count, time.time(), str(out), rotated, q_options=options)
    wait_for(lambda: len(out.read_text().split()) >= count + 1, timeout=60)
    values = [float(v) for v in out.read_text().split()]
    return values[1:]  # the first one also waited for the cluster to start polling


def pids_of(child) -> set[str]:
    """The pids of a cluster's process group (its workers are forks of the qcluster process)."""
    pids = set()
    for status in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = status.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == child.pid:  # pgrp
            pids.add(status.parent.name)
    return pids


def main() -> None:
    args = cli(NAME, __doc__.splitlines()[0]).parse_args()
    visits = 3 if args.quick else 8
    hops = 10 if args.quick else 25
    rows: list[Row] = []
    with workdir(NAME) as tmp:
        env = base_environment(tmp, pg_recreate())
        django_setup(env)
        try:
            migrate()
            from django.conf import settings

            poll = settings.Q_CLUSTER["poll"]
            user = clinician()

            # --- same queue ---------------------------------------------------------------
            queue_purge()
            main_cluster = cluster(env, tmp / "same.log")
            run_visits(1, user)  # warm-up: workers load the model
            found = gaps(run_visits(visits, user))
            hop_same = raw_hops(tmp, hops, [], "same")
            main_cluster.kill()
            inline = [v for k, vs in found.items() for v in vs]
            rows.append(
                ratio_row(
                    NAME,
                    "same queue: stage gap (inline) vs raw hop",
                    median(inline),
                    median(hop_same),
                    goal=0.25,
                    unit="ms",
                    digits=1,
                    note=f"median of {len(inline)} gaps over {visits} visits; "
                    f"{len(hop_same)} hops; poll {poll} s; "
                    + ", ".join(f"{k} {fmt(median(v), 'ms', 1)}" for k, v in found.items()),
                )
            )

            # --- routed: transcription on its own queue and cluster --------------------------
            queue_purge()
            fixed = {"TRANSCRIBE_QUEUE": "transcribe"}
            a = cluster(env, tmp / "fixed-a.log", **fixed)
            b = cluster(env, tmp / "fixed-b.log", **fixed, Q_CLUSTER_NAME="transcribe")
            run_visits(1, user)
            runs = run_visits(visits, user)
            found = gaps(runs)
            hop_cross = raw_hops(tmp, hops, ["transcribe", "visit-pipeline"], "cross")
            summarize_on_b = bool(
                {w.rsplit(":", 1)[1] for w in workers_of(runs, "summarize")} & pids_of(b)
            )
            a.kill()
            b.kill()
            cross = found.get("ingest->transcribe", [])
            back = found.get("transcribe->summarize", [])
            rows.append(
                ratio_row(
                    NAME,
                    "routed: ingest->transcribe (to queue 'transcribe') vs raw hop A->B",
                    median(cross),
                    median(hop_cross),
                    goal=1.25,
                    unit="ms",
                    digits=1,
                    note=f"{len(cross)} gaps, {len(hop_cross)} hops alternating A->B->A",
                )
            )
            rows.append(
                ratio_row(
                    NAME,
                    "routed: transcribe->summarize (back to default queue) vs raw hop",
                    median(back),
                    median(hop_cross),
                    goal=1.25,
                    unit="ms",
                    digits=1,
                    note="summarize ran on the transcribe cluster: "
                    + (
                        "YES (dispatch sends queue=None to the sender's own queue)"
                        if summarize_on_b
                        else "no"
                    ),
                )
            )
            note_gap = found.get("summarize->note", [])
            rows.append(
                ratio_row(
                    NAME,
                    "routed: summarize->note (inline) vs raw hop",
                    median(note_gap),
                    median(hop_cross),
                    goal=0.25,
                    unit="ms",
                    digits=1,
                )
            )
        finally:
            pg_drop()
    emit(rows, args.json)


if __name__ == "__main__":
    main()
