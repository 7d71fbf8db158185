"""/healthz says the process answers; /readyz that it can work: database, migrations, broker,
and a worker cluster seen within the last minute (the sweep schedule it keeps moving)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone
from django_q.models import Schedule

from pipeline.backends.djangoq import SWEEP_SCHEDULE_NAME
from tests.conftest import requires_postgres
from tests.support.cluster import Cluster, wait_for

pytestmark = pytest.mark.django_db


def sweep_last_moved(seconds_ago: float) -> None:
    """As a cluster's scheduler leaves it: next run a minute after it last fired."""
    next_run = timezone.now() - timedelta(seconds=seconds_ago) + timedelta(minutes=1)
    Schedule.objects.filter(name=SWEEP_SCHEDULE_NAME).update(next_run=next_run)


def test_healthz_answers_without_signing_in(client):
    response = client.get("/healthz")
    assert (response.status_code, response.content) == (200, b"ok\n")


def test_readyz_is_ready_while_a_cluster_keeps_the_sweep_moving(client):
    sweep_last_moved(seconds_ago=20)
    response = client.get("/readyz")
    assert response.status_code == 200
    body = response.json()
    assert body["ready"] is True
    assert [c["name"] for c in body["checks"]] == ["database", "migrations", "broker", "cluster"]


def test_readyz_is_503_when_no_cluster_has_been_seen(client):
    sweep_last_moved(seconds_ago=10 * 60)
    response = client.get("/readyz")
    assert response.status_code == 503
    (cluster,) = [c for c in response.json()["checks"] if c["name"] == "cluster"]
    assert cluster["ok"] is False and "no cluster seen for 0:09:" in cluster["detail"]


def test_readyz_names_a_missing_sweep_schedule(client):
    Schedule.objects.filter(name=SWEEP_SCHEDULE_NAME).delete()
    checks = client.get("/readyz").json()["checks"]
    assert {"name": "cluster", "ok": False, "detail": "the sweep schedule does not exist"} in checks


@requires_postgres
@pytest.mark.django_db(transaction=True)
def test_a_real_cluster_makes_readyz_ready(client, tmp_path):
    sweep_last_moved(seconds_ago=10 * 60)
    assert client.get("/readyz").status_code == 503
    cluster = Cluster(tmp_path / "cluster.log").start()
    try:
        wait_for(
            lambda: client.get("/readyz").status_code == 200,
            timeout=90,
            what="a cluster to move the sweep schedule",
        )
    finally:
        cluster.kill()
