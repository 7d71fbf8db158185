"""Is this process alive, and can it do its work? For load balancers and orchestrators.

`/healthz` answers as long as the process can answer. `/readyz` answers 200 only when the
database is reachable, every migration is applied, the django-q2 broker answers, and a worker
cluster has been seen within the last `CLUSTER_SEEN_SECONDS`: the recovery sweep's schedule
is advanced by a cluster's scheduler each minute, so a `next_run` long past means no cluster
is running. Neither says anything about a visit.
"""

from __future__ import annotations

from datetime import timedelta

from django.db import DatabaseError, connection
from django.db.migrations.executor import MigrationExecutor
from django.utils import timezone
from django_q.brokers import get_broker
from django_q.models import Schedule
from pydantic import BaseModel

from pipeline.backends.djangoq import SWEEP_SCHEDULE_NAME

# The sweep is due every minute and django-q2's scheduler wakes about every 30 s.
CLUSTER_SEEN_SECONDS = 90


class Check(BaseModel):
    name: str
    ok: bool
    detail: str


class Readiness(BaseModel):
    ready: bool
    checks: list[Check]


def _database() -> Check:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    except DatabaseError as exc:
        return Check(name="database", ok=False, detail=f"unreachable ({type(exc).__name__})")
    return Check(name="database", ok=True, detail=connection.vendor)


def _migrations() -> Check:
    executor = MigrationExecutor(connection)
    pending = executor.migration_plan(executor.loader.graph.leaf_nodes())
    if pending:
        names = ", ".join(f"{m.app_label}.{m.name}" for m, _ in pending[:5])
        return Check(name="migrations", ok=False, detail=f"{len(pending)} not applied: {names}")
    return Check(name="migrations", ok=True, detail="all applied")


def _broker() -> Check:
    try:
        answered = bool(get_broker().ping())
    except Exception as exc:  # any client's connection error: the broker does not answer
        return Check(name="broker", ok=False, detail=f"unreachable ({type(exc).__name__})")
    return Check(name="broker", ok=answered, detail="answers" if answered else "no answer")


def cluster_unseen_seconds() -> float | None:
    """How long the sweep schedule's next run has been overdue: how long no worker cluster has
    been seen (0 while one keeps moving it). None if the schedule does not exist."""
    sweep = Schedule.objects.filter(name=SWEEP_SCHEDULE_NAME).only("next_run").first()
    if sweep is None or sweep.next_run is None:
        return None
    late: float = (timezone.now() - sweep.next_run).total_seconds()
    return max(0.0, late)


def _cluster() -> Check:
    late = cluster_unseen_seconds()
    if late is None:
        return Check(name="cluster", ok=False, detail="the sweep schedule does not exist")
    if late > CLUSTER_SEEN_SECONDS:
        seen = timedelta(seconds=round(late))
        return Check(name="cluster", ok=False, detail=f"no cluster seen for {seen}")
    return Check(name="cluster", ok=True, detail="seen within the last minute")


def readiness() -> Readiness:
    """Every check; without the database, those that need it are not tried."""
    checks = [_database()]
    if checks[0].ok:
        checks += [_migrations(), _broker(), _cluster()]
    return Readiness(ready=all(check.ok for check in checks), checks=checks)
