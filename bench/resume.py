"""4. Resume economics: a failure injected in each stage in turn, then a retry of the run.

The LLM path is on (OPENAI_API_KEY set, OPENAI_BASE_URL = the loopback fake server from
tests/fakes/llm_server.py, which bills tokens per answered request). The recording is the sample
repeated three times (~125 s) with TRANSCRIBE_CHUNK_SECONDS=30, so transcription has 4 chunks.
Every run is driven inline in this process (SQLite temporary file), except the transcribe case.

Failures:
* ingest: the stored recording is swapped for garbage (permanent "unreadable"), then restored;
* transcribe: the process running the visit (a child) is SIGKILLed once two chunks are
  checkpointed; after the lease expires the run is resumed here;
* summarize: the provider refuses the key once (HTTP 401, permanent);
* summarize, after an answer: the first answer is malformed and the repair request gets a 401;
* note: summarize is answered, then the note request gets a 401.
Then `pipeline.core.store.stage_reopen_failed` and `run_execute_inline`: tokens the server billed
during the retry and its wall seconds, against a full re-run of the visit from scratch.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from common import (
    Row,
    base_environment,
    cli,
    clinician,
    django_setup,
    emit,
    make_long_recording,
    median,
    migrate,
    sqlite_url,
    wait_for,
    workdir,
)

NAME = "resume"


def env_for(tmp: Path, base_url: str) -> dict[str, str]:
    return base_environment(
        tmp,
        sqlite_url(tmp),
        OPENAI_API_KEY="bench-key",
        OPENAI_BASE_URL=base_url,
        LLM_MODEL="gpt-4o-mini",
        LLM_REQUEST_TIMEOUT_SECONDS="5",
        PIPELINE_LEASE_SECONDS="2",
        PIPELINE_RETRY_INTERVAL_SCALE="0.01",
        TRANSCRIBE_CHUNK_SECONDS="30",
    )


def tokens(server) -> int:
    prompt, completion = server.billed()
    return prompt + completion


def verdict(label: str, status: str, spent: int, full_tok: int, secs: float, full_s: float) -> str:
    if status != "succeeded":
        return f"MISSES (run {status})"
    if label.startswith("ingest"):
        return "as expected (nothing before ingest to reuse)"
    if spent <= full_tok and secs < full_s:
        return "meets"
    return "MISSES" if secs >= full_s else "time meets; tokens MISS"


def child_main(run_id: int) -> None:
    """In the child: drive the run inline until the parent kills us."""
    import django

    django.setup()
    from pipeline.core import executor
    from pipeline.core.models import Run

    executor.run_execute_inline(Run.objects.get(id=run_id), worker="bench-child")


def main() -> None:
    parser = cli(NAME, __doc__.splitlines()[0])
    parser.add_argument("--child-run", type=int, help="internal")
    args = parser.parse_args()
    if args.child_run:
        child_main(args.child_run)
        return

    from tests.fakes.llm_server import FakeLLMServer

    rows: list[Row] = []
    with workdir(NAME) as tmp, FakeLLMServer(timeout_seconds=3.0) as server:
        env = env_for(tmp, server.base_url)
        django_setup(env)
        migrate()
        from pipeline import artifact_path
        from pipeline.core import executor, recovery, store
        from pipeline.core.models import Checkpoint, Run, Stage
        from visits.services import visit_create
        from visits.speech.transcription import whisper_model

        user = clinician()
        recording = make_long_recording(tmp / "visit_3x.wav", repeats=3)
        whisper_model()

        def new_run() -> Run:
            return visit_create(clinician=user, recording=recording).current_run

        def drive(run: Run) -> Run:
            return executor.run_execute_inline(run, worker="bench")

        def timed(action) -> tuple[float, int, Run]:
            before = tokens(server)
            started = time.perf_counter()
            run = action()
            return time.perf_counter() - started, tokens(server) - before, run

        # Full runs from scratch: the price of not resuming.
        full = [timed(lambda: drive(new_run())) for _ in range(1 if args.quick else 2)]
        full_s = median([f[0] for f in full]) or 0.0
        full_tok = int(median([float(f[1]) for f in full]) or 0)

        marks: dict[int, int] = {}  # run id -> index of its first request on the server
        resent: list[str] = []

        def mark(run: Run) -> Run:
            marks[run.id] = len(server.requests)
            return run

        def check_resent(run: Run, since: int) -> None:
            """Requests of the retry that an earlier attempt of this run had been answered."""
            requests = server.requests
            answered = {r.digest for r in requests[marks[run.id] : since] if r.answered}
            resent.extend(r.digest for r in requests[since:] if r.digest in answered)

        def retry(run: Run) -> tuple[float, int, Run]:
            def action() -> Run:
                store.stage_reopen_failed(run=run)
                return drive(run)

            since = len(server.requests)
            result = timed(action)
            check_resent(run, since)
            return result

        cases: list[tuple[str, float, int, Run, str]] = []

        # ingest
        run = mark(new_run())
        source = artifact_path(run.input["recording"])
        original = source.read_bytes()
        source.write_bytes(os.urandom(4096))
        drive(run)
        failed = Stage.objects.get(run=run, name="ingest").status
        source.write_bytes(original)
        cases.append(("ingest (unreadable file)", *retry(run), f"failed stage {failed}"))

        # transcribe: SIGKILL the process running it
        run = mark(new_run())
        child = subprocess.Popen(
            [sys.executable, __file__, "--child-run", str(run.id)],
            env={**os.environ},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(
            lambda: (
                Checkpoint.objects.filter(stage__run=run, stage__name="transcribe").count() >= 2
            ),
            timeout=120,
        )
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        killed_at = time.perf_counter()
        kept = Checkpoint.objects.filter(stage__run=run, stage__name="transcribe").count()
        # The lease must expire before anyone may take the stage back (2 s here).
        wait_for(lambda: recovery.leases_reap() or None, timeout=30, poll=0.2)
        waited = time.perf_counter() - killed_at
        since = len(server.requests)
        seconds, spent, run = timed(lambda: drive(run))
        check_resent(run, since)
        reused = Stage.objects.get(run=run, name="transcribe").output or {}
        cases.append(
            (
                "transcribe (SIGKILL mid-stage)",
                seconds,
                spent,
                run,
                f"{kept} of {reused.get('chunks')} chunks kept, {reused.get('chunks_reused')} "
                f"reused; +{waited:.1f} s waiting for the 2 s lease",
            )
        )

        # summarize: 401 at once
        run = mark(new_run())
        server.script("401")
        drive(run)
        cases.append(("summarize (HTTP 401)", *retry(run), ""))

        # summarize after one answered call: malformed answer, then 401 on the repair request
        run = mark(new_run())
        server.script("malformed", "401")
        before = tokens(server)
        drive(run)
        wasted = tokens(server) - before
        cases.append(
            (
                "summarize (answered, repair 401)",
                *retry(run),
                f"failed attempt was billed {wasted} tokens; its answer is reused",
            )
        )

        # note: summarize answered, then 401
        run = mark(new_run())
        server.script("ok", "401")
        drive(run)
        cases.append(("note (HTTP 401)", *retry(run), ""))

        for label, seconds, spent, run, note in cases:
            run.refresh_from_db()
            rows.append(
                Row(
                    NAME,
                    f"retry after failure in {label}",
                    f"{spent} tok, {seconds:.2f} s",
                    baseline=f"{full_tok} tok, {full_s:.2f} s",
                    ratio=f"tok {spent / full_tok:.2f}x, time {seconds / full_s:.2f}x"
                    if full_tok and full_s
                    else "",
                    goal="retry < full re-run" if not label.startswith("ingest") else "~1x",
                    verdict=verdict(label, run.status, spent, full_tok, seconds, full_s),
                    note=note,
                )
            )
        rows.append(
            Row(
                NAME,
                "answered LLM requests sent again by a retry",
                str(len(resent)),
                goal="0",
                verdict="meets" if not resent else "MISSES",
                note="digests answered for an earlier attempt of the same run, sent again",
            )
        )
    emit(rows, args.json)


if __name__ == "__main__":
    main()
