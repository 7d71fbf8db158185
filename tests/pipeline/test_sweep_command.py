"""`pipeline_sweep --every` outlives its database: connections cut under it (as a database
restart or failover cuts them) are waited out, and the loop goes on sweeping on new ones."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection

from tests.conftest import requires_postgres
from tests.support.cluster import cluster_environment, wait_for

pytestmark = [requires_postgres, pytest.mark.cluster, pytest.mark.django_db(transaction=True)]


def sweeps(log: Path) -> int:
    return log.read_text(errors="replace").count("reaped ")


def test_the_sweep_loop_waits_out_cut_connections_and_carries_on(tmp_path: Path):
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
        for _ in range(3):
            with connection.cursor() as cursor:
                cursor.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            time.sleep(0.5)
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
