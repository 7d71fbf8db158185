"""Chaos for the durability tests: a fault-injecting LLM peer, a pool of real clusters, and the
agents that kill clusters, cut their database connections and sweep, all bounded and recorded.

Every strike is aimed and booked: the victim cluster is frozen (SIGSTOP) for a moment so that
the attempts it is running are known exactly, which lets the test assert afterwards what became
of each one (a SIGKILLed attempt must be on record as `lost`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import random
import signal
import socket
import threading
import time
import wave
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from django.db import connection, connections

from pipeline.core import recovery
from pipeline.core.models import Attempt, LLMCall
from pipeline.core.states import AttemptStatus
from pipeline.llm.gateway import OFFLINE_MODEL
from tests.fakes.llm_server import FakeLLMServer, default_content, request_digest
from tests.support.cluster import Cluster
from visits.speech import audio

# --- a fault-injecting LLM peer that can be held still ---------------------------------------

_TRANSIENT_FAULTS = frozenset({"408", "409", "429", "500", "503", "timeout", "disconnect"})


def distinct_content(body: dict[str, Any]) -> str:
    """The schema instance the fake answers by default, with every "stub" string tagged by the
    request it answers. Two visits then never get the same summary, so their note requests (built
    from the summary) differ too: a repeated digest can only mean the same question asked again."""
    content = default_content(body)
    tag = hashlib.sha256(json.dumps(body.get("messages"), sort_keys=True).encode()).hexdigest()
    return content.replace('"stub"', f'"stub {tag[:12]}"')


class ChaosLLMServer(FakeLLMServer):
    """The loopback chat-completions server with seeded fault rates, plus three rules that keep a
    chaos run about durability rather than about exhausting retry policies by bad luck:

    * a transient fault (429, 5xx, timeout) hits one request (digest) at most
      `transient_faults_per_request` times; after that the provider answers it. Without a cap a
      run of six failures in a row (0.25**6 per stage) fails a stage permanently by design.
    * a repair request (one that carries the model's earlier, invalid answer) is never answered
      with malformed JSON: two invalid answers in a row are, by design, a permanent failure
      and that path has its own test.
    * `held()` freezes the bookkeeping so that a killer can wait for a moment when no answer is
      on its way to a worker that has not yet put it in the ledger (see `Chaos.kill`).
    """

    def __init__(
        self, *, seed: int, timeout_seconds: float, transient_faults_per_request: int = 2
    ) -> None:
        super().__init__(seed=seed, timeout_seconds=timeout_seconds)
        self.responder = distinct_content
        self.transient_faults_per_request = transient_faults_per_request
        self._local = threading.local()
        self._transient_faults: Counter[str] = Counter()
        self._in_flight = 0

    def _handle_chat(self, handler: Any, body: dict[str, Any]) -> None:
        messages = body.get("messages") or []
        self._local.digest = request_digest(body)
        self._local.repair = any(
            isinstance(message, dict) and message.get("role") == "assistant" for message in messages
        )
        with self._lock:
            self._in_flight += 1
            self._local.counted = True
        try:
            super()._handle_chat(handler, body)
        finally:
            with self._lock:
                if self._local.counted:
                    self._in_flight -= 1

    def _next_fault(self) -> str:
        fault = super()._next_fault()  # always draw, so the seeded sequence stays the same
        if fault == "malformed" and self._local.repair:
            return "ok"
        if fault in _TRANSIENT_FAULTS:
            digest = self._local.digest
            if self._transient_faults[digest] >= self.transient_faults_per_request:
                return "ok"
            self._transient_faults[digest] += 1
        if fault not in ("ok", "malformed") and self._local.counted:
            # No answer will be sent (a held or refused request): nothing to wait for.
            self._local.counted = False
            self._in_flight -= 1
        return fault

    @contextlib.contextmanager
    def held(self) -> Iterator[tuple[int, int]]:
        """Hold the server still; yields (requests that may yet be answered, answers booked so
        far).
        While held, no request is recorded and no answer is booked."""
        with self._lock:
            yield self._in_flight, sum(1 for record in self._requests if record.answered)

    def fault_counts(self) -> Counter[str]:
        return Counter(record.fault for record in self.requests)


def ledger_calls() -> int:
    """Model calls in the engine's ledger (the offline engine's free rows excluded)."""
    return LLMCall.objects.exclude(model=OFFLINE_MODEL).count()


# --- recordings that differ -----------------------------------------------------------------


def recording_padded(source: Path, dest: Path, *, lead_seconds: float) -> Path:
    """`source` as a 16 kHz mono WAV that starts with `lead_seconds` of silence.

    Every segment time in the transcript moves with the lead, and segment times are part of the
    summarize prompt: visits made from one fixture then ask the model different questions."""
    pcm = io.BytesIO()
    audio.recording_normalize(source, pcm, max_seconds=3600)
    samples = np.frombuffer(pcm.getvalue(), dtype=np.int16)
    lead = np.zeros(int(lead_seconds * audio.SAMPLE_RATE), dtype=np.int16)
    with wave.open(str(dest), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(audio.SAMPLE_RATE)
        out.writeframes(np.concatenate([lead, samples]).tobytes())
    return dest


# --- clusters -------------------------------------------------------------------------------


def process_group(pgid: int) -> set[int]:
    """Pids of the live processes in a process group (a cluster and every worker it forked)."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...; comm may contain spaces, so split after the last ')'.
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid:
            pids.add(int(entry.name))
    return pids


class ClusterPool:
    """Named qcluster processes; each one's database sessions carry its name as
    `application_name` (libpq's PGAPPNAME) so that they can be found in pg_stat_activity."""

    def __init__(self, log_dir: Path, *, prefix: str, **env: str) -> None:
        self.log_dir = log_dir
        self.prefix = prefix
        self.env = env
        self.started: list[tuple[str, Cluster]] = []
        self.live: dict[str, Cluster] = {}
        self._lock = threading.Lock()

    def start(self) -> str:
        with self._lock:
            name = f"{self.prefix}-{len(self.started)}"
            cluster = Cluster(self.log_dir / f"{name}.log", PGAPPNAME=name, **self.env).start()
            self.started.append((name, cluster))
            self.live[name] = cluster
            return name

    def workers(self, name: str) -> set[str]:
        """The `host:pid` names its processes use as lease owners."""
        cluster = self.live[name]
        assert cluster.process is not None
        host = socket.gethostname()
        return {f"{host}:{pid}" for pid in process_group(cluster.process.pid)}

    def kill(self, name: str) -> None:
        """SIGKILL the whole cluster as it is. Unlike `Cluster.kill` no SIGCONT goes first: a
        frozen worker must not get to send one more statement before it dies."""
        with self._lock:
            cluster = self.live.pop(name)
        cluster.signal(signal.SIGKILL)
        assert cluster.process is not None
        cluster.process.wait(timeout=10)

    def kill_all(self) -> None:
        for _name, cluster in self.started:
            cluster.kill()
        self.live.clear()

    def logs_tail(self, lines: int = 15) -> str:
        parts = []
        for name, cluster in self.started:
            text = cluster.log() if cluster.log_path.exists() else ""
            parts.append(f"--- {name} ---\n" + "\n".join(text.splitlines()[-lines:]))
        return "\n".join(parts)


# --- the chaos agents -----------------------------------------------------------------------


@dataclass
class Strike:
    kind: str  # "kill" or "cut"
    cluster: str
    at: float  # time.time()
    attempt_ids: list[int]  # the attempts the victim was running when it was struck
    backends: int = 0  # connections terminated (cuts)


@dataclass
class Chaos:
    """Kills and connection cuts, aimed so that each stage is struck at most once.

    A stage has three (ingest, transcribe) or six (summarize, note) attempts; a strike spends
    one of them. Striking the same stage again and again would only prove that a policy's
    attempts run out, which is designed behaviour with its own tests."""

    pool: ClusterPool
    server: ChaosLLMServer
    rng: random.Random
    freeze_seconds: float = 0.1
    quiet_wait_seconds: float = 0.6
    strikes: list[Strike] = field(default_factory=list)
    deferred_kills: int = 0
    struck_stages: set[int] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _running(self, name: str) -> list[tuple[int, int, str]]:
        """(attempt, stage, stage name) of every attempt the cluster's workers are running."""
        workers = self.pool.workers(name)
        rows = Attempt.objects.filter(status=AttemptStatus.RUNNING, worker__in=workers)
        return list(rows.values_list("id", "stage_id", "stage__name"))

    @contextlib.contextmanager
    def _frozen(self, name: str) -> Iterator[list[tuple[int, int, str]] | None]:
        """SIGSTOP the cluster; yield what it is running, or None if a stage there was struck
        before. The caller may kill it; otherwise it is continued on leaving."""
        cluster = self.pool.live[name]
        cluster.signal(signal.SIGSTOP)
        try:
            # Let what it sent before it stopped arrive: requests at the LLM server, statements
            # (a COMMIT, say) at the database, which must be done with them before we look.
            time.sleep(self.freeze_seconds)
            wait_until_idle(name)
            running = self._running(name)
            struck = any(stage in self.struck_stages for _, stage, _ in running)
            yield None if struck else running
        finally:
            if name in self.pool.live:
                cluster.signal(signal.SIGCONT)

    def kill(self, *, mid_work: bool = False, mid_write: Path | None = None) -> Strike | None:
        """SIGKILL a random cluster and start a new one. With `mid_work`, only a cluster that is
        running an attempt; with `mid_write` (the storage root), only one caught writing an
        artifact (a `.partial` file exists, waited for a few seconds at most).

        The kill lands only when no model answer is on its way to a worker that has not yet
        written it to the ledger: an answer a process never received cannot be recorded by any
        client, so killing inside that window (milliseconds) would test physics, not the engine.
        """
        with self._lock:
            if mid_write is not None:
                names, partial = self._writing(mid_write)
            else:
                names, partial = list(self.pool.live), None
            self.rng.shuffle(names)
            for name in names:
                with self._frozen(name) as running:
                    if running is None or ((mid_work or partial) and not running):
                        continue
                    if partial is not None and not partial.exists():
                        continue  # it finished writing before it froze
                    if not self._kill_when_quiet(name):
                        self.deferred_kills += 1
                        continue
                    strike = Strike("kill", name, time.time(), [a for a, *_ in running])
                self.struck_stages.update(stage for _, stage, _ in running)
                self.strikes.append(strike)
                self.pool.start()
                return strike
            return None

    def _writing(self, root: Path, *, within_seconds: float = 15.0) -> tuple[list[str], Path]:
        """The cluster whose worker is writing an artifact, and the file, as soon as one is."""
        deadline = time.monotonic() + within_seconds
        while time.monotonic() < deadline:
            for partial in root.glob("runs/*/*/attempt-*/*.partial"):
                run_id, stage_name, attempt_dir = partial.parent.relative_to(root).parts[1:]
                worker = (
                    Attempt.objects.filter(
                        stage__run_id=int(run_id),
                        stage__name=stage_name,
                        number=int(attempt_dir.removeprefix("attempt-")),
                        status=AttemptStatus.RUNNING,
                    )
                    .values_list("worker", flat=True)
                    .first()
                )
                for name in list(self.pool.live):
                    if worker in self.pool.workers(name):
                        return [name], partial
            time.sleep(0.002)
        return [], root

    def _kill_when_quiet(self, name: str) -> bool:
        deadline = time.monotonic() + self.quiet_wait_seconds
        while True:
            with self.server.held() as (in_flight, answered):
                if in_flight == 0 and answered == ledger_calls():
                    self.pool.kill(name)
                    return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.03)

    def cut(self) -> Strike | None:
        """Terminate every database session of a random cluster (pg_terminate_backend)."""
        with self._lock:
            names = list(self.pool.live)
            self.rng.shuffle(names)
            for name in names:
                with self._frozen(name) as running:
                    if running is None:
                        continue
                    with connection.cursor() as cursor:
                        cursor.execute(
                            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                            "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                            "AND application_name = %s",
                            [name],
                        )
                        (backends,) = cursor.fetchone()
                    strike = Strike("cut", name, time.time(), [a for a, *_ in running], backends)
                self.struck_stages.update(stage for _, stage, _ in running)
                self.strikes.append(strike)
                return strike
            return None

    def of_kind(self, kind: str) -> list[Strike]:
        return [strike for strike in self.strikes if strike.kind == kind]


def wait_until_idle(application_name: str, *, timeout: float = 2.0) -> None:
    """Wait until no database session of the application is executing a statement."""
    deadline = time.monotonic() + timeout
    with connection.cursor() as cursor:
        while time.monotonic() < deadline:
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND application_name = %s AND state = 'active'",
                [application_name],
            )
            if cursor.fetchone()[0] == 0:
                return
            time.sleep(0.02)
    raise AssertionError(f"{application_name} still had statements running after {timeout} s")


class Agent(threading.Thread):
    """Calls `act` every `interval()` seconds until stopped; keeps the first error it meets.
    Its database connection is its own and is closed when it ends."""

    def __init__(self, name: str, act: Callable[[], object], interval: Callable[[], float]):
        super().__init__(name=name, daemon=True)
        self._act = act
        self._interval = interval
        self._halt = threading.Event()
        self.error: BaseException | None = None
        self.rounds = 0

    def run(self) -> None:
        try:
            while not self._halt.wait(self._interval()):
                self._act()
                self.rounds += 1
        except BaseException as exc:
            self.error = exc
        finally:
            connections.close_all()

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=30)
        if self.error is not None:
            raise AssertionError(f"the {self.name} agent failed") from self.error


def sweeper(every_seconds: float = 1.0) -> Agent:
    """The recovery sweep, as often as an operator would run `pipeline_sweep --every 1`;
    django-q2's own schedule fires only once a minute."""
    return Agent("sweeper", recovery.sweep, lambda: every_seconds)
