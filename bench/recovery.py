"""6. Recovery time after SIGKILL of a cluster mid-transcription.

PostgreSQL, ORM broker. PIPELINE_LEASE_SECONDS=L and `manage.py pipeline_sweep --every S`
running beside the clusters (django-q2's minute schedule for the sweep is removed so that only
the configured sweep counts). A visit (the sample repeated to ~4 minutes, 60 s chunks) runs on
cluster A; once transcription has checkpointed its first chunk, A's whole process group gets
SIGKILL and a new cluster B is started at once. Recovery = B's attempt 2 of the transcribe stage
started_at minus the kill time. Bound: L (the lease runs out at most L after the last
heartbeat) + S (the next sweep reaps and re-enqueues) + Q_POLL_SECONDS (B picks it up).
"""

from __future__ import annotations

from common import (
    Child,
    Row,
    base_environment,
    cli,
    clinician,
    cluster,
    django_setup,
    emit,
    make_long_recording,
    manage,
    median,
    migrate,
    pg_drop,
    pg_recreate,
    queue_purge,
    wait_for,
    workdir,
)

NAME = "recovery"


def main() -> None:
    parser = cli(NAME, __doc__.splitlines()[0])
    parser.add_argument("--lease", type=float, default=5.0)
    parser.add_argument("--sweep", type=float, default=2.0)
    args = parser.parse_args()
    reps = 1 if args.quick else 3
    lease, every = args.lease, args.sweep
    rows: list[Row] = []
    with workdir(NAME) as tmp:
        env = base_environment(
            tmp,
            pg_recreate(),
            PIPELINE_LEASE_SECONDS=str(lease),
            PIPELINE_SWEEP_SECONDS=str(every),
            TRANSCRIBE_CHUNK_SECONDS="60",
        )
        django_setup(env)
        sweeper = None
        clusters: list[Child] = []
        try:
            migrate()
            queue_purge()
            from django.conf import settings
            from django.utils import timezone

            from pipeline.core.models import Attempt, Checkpoint
            from visits.services import visit_create, visit_start

            poll = float(settings.Q_CLUSTER["poll"])
            user = clinician()
            recording = make_long_recording(tmp / "visit_long.wav", repeats=6)
            sweeper = Child(
                manage("pipeline_sweep", "--every", str(every)), env, tmp / "sweep.log"
            ).start()
            times, lost_ok = [], 0
            for rep in range(reps):
                first = cluster(env, tmp / f"a-{rep}.log")
                clusters.append(first)
                visit = visit_create(clinician=user, recording=recording)
                visit_start(visit=visit)
                run_id = visit.current_run_id
                wait_for(
                    lambda run_id=run_id: Checkpoint.objects.filter(
                        stage__run_id=run_id, stage__name="transcribe"
                    ).exists(),
                    timeout=120,
                )
                first.kill()
                killed_at = timezone.now()
                clusters.append(cluster(env, tmp / f"b-{rep}.log"))
                second = wait_for(
                    lambda run_id=run_id: Attempt.objects.filter(
                        stage__run_id=run_id, stage__name="transcribe", number=2
                    ).first(),
                    timeout=lease + 3 * every + 30,
                    poll=0.02,
                )
                if second is not None:
                    times.append((second.started_at - killed_at).total_seconds())
                    lost_ok += Attempt.objects.filter(
                        stage__run_id=run_id, stage__name="transcribe", number=1, status="lost"
                    ).count()
                for child in clusters:
                    child.kill()
                clusters.clear()
            bound = lease + every + poll
            worst = max(times) if times else None
            rows.append(
                Row(
                    NAME,
                    "kill -> next attempt started (SIGKILL mid-transcription)",
                    f"median {median(times):.2f} s, max {worst:.2f} s" if times else "never",
                    baseline=f"bound {bound:.1f} s (lease {lease:g} + sweep {every:g} "
                    f"+ poll {poll:g})",
                    ratio=f"{worst / bound:.2f}x of bound" if worst else "",
                    goal="<= bound",
                    verdict="meets" if worst is not None and worst <= bound else "MISSES",
                    note=f"{len(times)}/{reps} recovered; killed attempt recorded as lost: "
                    f"{lost_ok}/{len(times)}; all runs: " + ", ".join(f"{t:.2f}" for t in times),
                )
            )
        finally:
            if sweeper is not None:
                sweeper.kill()
            for child in clusters:
                child.kill()
            pg_drop()
    emit(rows, args.json)


if __name__ == "__main__":
    main()
