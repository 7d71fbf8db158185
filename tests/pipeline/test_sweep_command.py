"""`pipeline_sweep --every` outlives its database: an outage (new connections refused, open
ones cut, as a restart or a failover does) is waited out, and the loop goes on sweeping on new
connections."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest
from django.conf import settings
from django.db import connection

from tests.conftest import requires_postgres
from tests.support.cluster import cluster_environment, wait_for

pytestmark = [requires_postgres, pytest.mark.cluster, pytest.mark.django_db(transaction=True)]


def sweeps(log: Path) -> int:
    return log.read_text(errors="replace").count("reaped ")


def test_the_sweep_loop_waits_out_a_database_outage_and_carries_on(tmp_path: Path):
    log = tmp_path / "sweep.log"
    with log.open("wb") as out:
        sweeper = subprocess.Popen(
            [sys.executable, "manage.py", "pipeline_sweep", "--every", "0.2"],
            cwd=settings.BASE_DIR,
            env=cluster_environment(LOG_FORMAT="plain"),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(lambda: sweeps(log) >= 2, timeout=60, what="the sweep's first rounds")
        # The database goes away for 2 s: no new connection is allowed, and the open ones are
        # cut (this test's own excepted).
        db = connection.settings_dict
        connection.ensure_connection()
        # (A database cannot refuse connections from a session of its own: asked from another.)
        with psycopg.connect(
            host=db["HOST"] or "127.0.0.1",
            port=db["PORT"] or 5432,
            user=db["USER"] or "root",
            dbname="postgres",
            autocommit=True,
        ) as admin:
            name = db["NAME"]
            try:
                admin.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false')
                admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = %s AND pid <> %s",
                    [name, connection.connection.info.backend_pid],
                )
                time.sleep(2.0)
            finally:
                admin.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')
        after_cuts = sweeps(log)
        wait_for(lambda: sweeps(log) >= after_cuts + 3, timeout=60, what="sweeps after the cuts")
        assert sweeper.poll() is None, log.read_text()
    finally:
        sweeper.kill()
        sweeper.wait(timeout=10)
    text = log.read_text(errors="replace")
    assert "the database is unavailable" in text, text
    assert "the database is back" in text, text
    assert "Traceback" not in text, text
