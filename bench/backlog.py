"""8. A backlog of short visits queued at once, on the Redis broker: throughput and queue wait.

PostgreSQL (database `bench_backlog`), Q_BROKER=redis on 127.0.0.1:6379 in its own database
number (13; the test suite uses 9) under its own site name (`Q_SITE_NAME=bench-backlog`, so
the queue is the Redis list `django_q:bench-backlog:q`), offline LLM engine. The visits are
fixtures/visit_short.mp3 (11.8 s, one chunk), created beforehand (`visit_create`) and then
started in one transaction, so that every wake-up reaches Redis at the same commit.

Cases, on this one 2-core machine:

* "2 workers, two clusters": two `qcluster` processes on the same queue, Q_WORKERS=1 each,
  standing for two transcription hosts; WHISPER_CPU_THREADS=1 each (the machine's 2 cores
  shared out, as a 2-worker cluster does by itself);
* "1 worker": one `qcluster` with Q_WORKERS=1 (its model gets both cores, WHISPER_CPU_THREADS=0);
* "2 workers, one cluster": Q_WORKERS=2 (not with --quick), to see what splitting a host's
  workers over two clusters costs.

Per case, after a warm-up visit per worker: visits per minute = visits / (last run finished -
the enqueue commit); whether any stage has more than one succeeded attempt (Attempt rows),
and how many attempts were not the first; queue wait = the ingest stage's first attempt
started_at - the enqueue commit (Stage.enqueued_at is not used: the recovery sweep rewrites
it when it re-sends a wake-up for a stage still waiting, which it does for a backlog older
than 2 x PIPELINE_SWEEP_SECONDS; such re-sent stages are counted). The sweep runs as deployed:
django-q2's schedule, every minute, through the same queue: when each sweep was queued and
when it ran is reported.
"""

from __future__ import annotations

import time
from collections import Counter
from datetime import timedelta

from common import (
    SHORT_VISIT,
    Child,
    Row,
    base_environment,
    cli,
    clinician,
    cluster,
    django_setup,
    emit,
    group_cpu_seconds,
    machine_busy_seconds,
    median,
    migrate,
    percentile,
    pg_drop,
    pg_recreate,
    wait_for,
    workdir,
)

NAME = "backlog"
DATABASE = "bench_backlog"
REDIS_URL = "redis://127.0.0.1:6379/13"
SITE = "bench-backlog"


def redis_clear() -> int:
    """Delete this benchmark's keys (and only them) from its Redis database."""
    import redis

    connection = redis.Redis.from_url(REDIS_URL)
    keys = list(connection.scan_iter(match=f"django_q:{SITE}*"))
    if keys:
        connection.delete(*keys)
    return len(keys)


def runs_finished(ids: list[int]) -> bool:
    from pipeline.core.models import Run

    return not Run.objects.filter(id__in=ids, finished_at__isnull=True).exists()


def submit(user, count: int) -> list[int]:
    """Start `count` visits in one transaction (every wake-up is sent at its commit)."""
    from django.db import transaction

    from visits.services import visit_create, visit_start

    visits = [visit_create(clinician=user, recording=SHORT_VISIT) for _ in range(count)]
    with transaction.atomic():
        for visit in visits:
            visit_start(visit=visit)
    return [visit.current_run_id for visit in visits]


def case(tmp, env, user, *, label: str, clusters: list[dict[str, str]], visits: int) -> Row:
    from django.db import transaction
    from django.db.models import Count, Q
    from django.utils import timezone
    from django_q.models import Task

    from pipeline.backends.djangoq import TASK_SWEEP
    from pipeline.core.models import Attempt, Run, Stage
    from visits.services import visit_create, visit_start

    Task.objects.all().delete()
    redis_clear()
    children: list[Child] = []
    try:
        workers = 0
        for number, overrides in enumerate(clusters):
            workers += int(overrides["Q_WORKERS"])
            children.append(
                cluster(env, tmp / f"{label.replace(' ', '_')}-{number}.log", **overrides)
            )
        # Warm-up: two visits per worker, so that every worker has loaded its model.
        warm = submit(user, 2 * workers)
        if not wait_for(lambda: runs_finished(warm), timeout=180, poll=0.1):
            raise RuntimeError(f"warm-up did not finish; see {children[0].log_path}")
        created = time.perf_counter()
        batch = [visit_create(clinician=user, recording=SHORT_VISIT) for _ in range(visits)]
        create_seconds = time.perf_counter() - created
        cpu = sum(group_cpu_seconds(child.pid) for child in children)
        busy, clock, mine = machine_busy_seconds(), time.monotonic(), time.process_time()
        enqueued = timezone.now()
        with transaction.atomic():
            for visit in batch:
                visit_start(visit=visit)
        sent = timezone.now()
        ids = [visit.current_run_id for visit in batch]
        wait_for(lambda: runs_finished(ids), timeout=max(900.0, visits * 6.0), poll=0.25)
        cpu = sum(group_cpu_seconds(child.pid) for child in children) - cpu
        busy, clock = machine_busy_seconds() - busy, time.monotonic() - clock
        # Cores kept busy by everything else meanwhile: other work on the machine, and the
        # database and Redis serving the clusters.
        others = max(0.0, busy - cpu - (time.process_time() - mine)) / clock
        # django-q2's Task.started is when the scheduler queued the task, stopped when it ran.
        sweeps = [
            ((queued - enqueued).total_seconds(), (done - enqueued).total_seconds())
            for queued, done in Task.objects.filter(
                func=TASK_SWEEP, started__gte=enqueued
            ).values_list("started", "stopped")
        ]
        runs = Run.objects.filter(id__in=ids)
        succeeded = runs.filter(status="succeeded").count()
        last = max(run.finished_at or timezone.now() for run in runs)
        elapsed = (last - enqueued).total_seconds()
        attempts = Attempt.objects.filter(stage__run_id__in=ids)
        twice = (
            Stage.objects.filter(run_id__in=ids)
            .annotate(wins=Count("attempts", filter=Q(attempts__status="succeeded")))
            .filter(wins__gt=1)
            .count()
        )
        later = attempts.filter(number__gt=1).count()
        statuses = Counter(attempts.values_list("status", flat=True))
        waits = [
            (started - enqueued).total_seconds()
            for started in attempts.filter(stage__name="ingest", number=1).values_list(
                "started_at", flat=True
            )
        ]
        in_system = [
            (finished - enqueued).total_seconds()
            for finished in runs.exclude(finished_at=None).values_list("finished_at", flat=True)
        ]
        resent = Stage.objects.filter(
            run_id__in=ids, name="ingest", enqueued_at__gt=sent + timedelta(seconds=1)
        ).count()
        per_worker = Counter(attempts.filter(stage__name="ingest").values_list("worker", flat=True))
    finally:
        for child in children:
            child.kill()
        redis_clear()
    rate = visits / elapsed * 60 if elapsed > 0 else 0.0
    p95 = percentile(waits, 0.95)
    return Row(
        NAME,
        f"backlog of {visits} short visits, {label}",
        f"{rate:.1f} visits/min",
        baseline=f"p95 queue wait {p95:.1f} s" if p95 is not None else "n/a",
        goal="0 stages run twice to success",
        verdict="meets" if twice == 0 and succeeded == visits else "MISSES",
        note=(
            f"{succeeded}/{visits} succeeded in {elapsed:.1f} s; stages with >1 succeeded "
            f"attempt: {twice}; attempts beyond the first: {later}; attempt statuses "
            f"{dict(statuses)}; queue wait (ingest attempt 1 start - enqueue commit) p50 "
            f"{median(waits) or 0:.1f} s, p95 {p95 or 0:.1f} s, max {max(waits, default=0):.1f} "
            f"s; enqueue -> note done p95 {percentile(in_system, 0.95) or 0:.1f} s; stages "
            f"re-sent by the sweep while waiting: {resent}; visits per worker "
            f"{'/'.join(str(n) for n in sorted(per_worker.values(), reverse=True))}; "
            f"creating the {visits} visits beforehand took {create_seconds:.1f} s; the commit "
            f"sending {visits} wake-ups {(sent - enqueued).total_seconds():.2f} s; cluster CPU "
            f"{cpu / visits:.2f} s per visit; other processes and the database kept "
            f"{others:.2f} cores busy meanwhile; the recovery sweep (django-q2 schedule, same "
            "queue) was queued / ran at "
            + (", ".join(f"+{q:.0f}/+{d:.0f} s" for q, d in sorted(sweeps)) if sweeps else "-")
            + " after the commit"
        ),
        extra={
            "rate": rate,
            "p95_wait": p95,
            "twice": twice,
            "later": later,
            "cpu_per_visit": cpu / visits,
            "others": others,
            "sweeps": sorted(sweeps),
        },
    )


def main() -> None:
    parser = cli(NAME, __doc__.splitlines()[0])
    parser.add_argument(
        "--visits", type=int, default=None, help="visits in the backlog (default 200; 50 quick)"
    )
    args = parser.parse_args()
    visits = args.visits or (50 if args.quick else 200)
    rows: list[Row] = []
    with workdir(NAME) as tmp:
        env = base_environment(
            tmp,
            pg_recreate(DATABASE),
            Q_BROKER="redis",
            REDIS_URL=REDIS_URL,
            Q_SITE_NAME=SITE,
        )
        django_setup(env)
        try:
            migrate()
            user = clinician()
            one = {"Q_WORKERS": "1", "Q_QUEUE_LIMIT": "1", "WHISPER_CPU_THREADS": "1"}
            cases = [
                ("2 workers, two clusters", [one, one]),
                ("1 worker", [{"Q_WORKERS": "1", "Q_QUEUE_LIMIT": "1"}]),
            ]
            if not args.quick:
                cases.append(("2 workers, one cluster", [{"Q_WORKERS": "2", "Q_QUEUE_LIMIT": "2"}]))
            results = {}
            for label, clusters in cases:
                row = case(tmp, env, user, label=label, clusters=clusters, visits=visits)
                results[label] = row.extra["rate"]
                rows.append(row)
            base = results.get("1 worker")
            for row in rows:
                if base:
                    row.ratio = f"{row.extra['rate'] / base:.2f}x vs 1 worker"
        finally:
            pg_drop(DATABASE)
    emit(rows, args.json)


if __name__ == "__main__":
    main()
