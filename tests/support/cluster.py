"""Real django-q2 clusters in child processes, sharing the test database, for durability tests."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Self

from django.conf import settings
from django.db import connection


def cluster_environment(**overrides: str) -> dict[str, str]:
    """The environment a cluster needs to work on this test's database and storage."""
    db = connection.settings_dict
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "DATABASE_URL": f"postgres://{db['USER'] or 'root'}@{db['HOST'] or '127.0.0.1'}:"
        f"{db['PORT'] or 5432}/{db['NAME']}",
        "PRIVATE_STORAGE_ROOT": str(settings.PRIVATE_STORAGE_ROOT),
        "PIPELINE_LEASE_SECONDS": str(settings.PIPELINE_LEASE_SECONDS),
        # A worker a test freezes (SIGSTOP) must not hold its row locks for the whole test.
        "DB_IDLE_IN_TRANSACTION_SECONDS": str(max(5.0, 2 * settings.PIPELINE_LEASE_SECONDS)),
        "PIPELINE_RETRY_INTERVAL_SCALE": str(settings.PIPELINE_RETRY_INTERVAL_SCALE),
        "TRANSCRIBE_CHUNK_SECONDS": str(settings.TRANSCRIBE_CHUNK_SECONDS),
        "HF_HUB_OFFLINE": "1",
        "OPENAI_API_KEY": settings.OPENAI_API_KEY,
        "OPENAI_BASE_URL": settings.OPENAI_BASE_URL or "",
        "LLM_MODEL": settings.LLM_MODEL,
        "LLM_REQUEST_TIMEOUT_SECONDS": str(settings.LLM_REQUEST_TIMEOUT_SECONDS),
        "FHIR_BASE_URL": settings.FHIR_BASE_URL,
        "FHIR_AUTH_TOKEN": settings.FHIR_AUTH_TOKEN,
        "FHIR_TIMEOUT_SECONDS": str(settings.FHIR_TIMEOUT_SECONDS),
    }
    env.update(overrides)
    return env


class Cluster:
    """`manage.py qcluster` (or a subclass's `command()`) in its own process group, so that it
    can be killed whole."""

    def __init__(self, log_path: Path, **env: str) -> None:
        self.log_path = log_path
        self.env = cluster_environment(**env)
        self.process: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        return ["qcluster"]

    def start(self) -> Self:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "manage.py", *self.command()],
            cwd=settings.BASE_DIR,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    def signal(self, signum: int) -> None:
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signum)

    def kill(self) -> None:
        """SIGKILL to every process of the cluster: no chance to clean up, like the OOM killer."""
        if self.process is None:
            return
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def wait_for(condition: Callable[[], object], *, timeout: float, what: str) -> object:
    """Poll until `condition()` is truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
