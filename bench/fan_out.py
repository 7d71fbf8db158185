"""7. One long visit fanned out over a cluster's workers, against raw faster-whisper in one pass.

Recording: five of the evaluation visits (fixtures/eval: cardiology, dermatology, pediatrics,
primary care, psychiatry) and fixtures/visit_sample.ogg, joined with 1 s of silence between
them and encoded as Ogg/Opus (24 kbit/s, like the fixtures): about 9.5 minutes of distinct
speech whose script is known, so each transcript also gets a WER against what was said.

* raw: in a child process, `WhisperModel(<bundled tiny.en>, compute_type=WHISPER_COMPUTE_TYPE)`
  with faster-whisper's default `cpu_threads`, then `model.transcribe(path,
  **transcribe_options())` consumed to the last segment (it decodes the file itself); after a
  warm-up transcription of the 42 s sample. Wall and process CPU seconds. One raw run is paired
  with each measured run of ours, just before or just after it by turns, so that other work on
  the machine (test suites of other sessions) weighs on both sides alike; and the cores that
  other work kept busy during each run (/proc/stat minus our processes) are reported. One more
  raw run with cpu_threads=1, for reference.
* ours: a `qcluster` with Q_WORKERS=2 (each worker's model gets one of the 2 cores, as
  WHISPER_CPU_THREADS=0 decides) on PostgreSQL with the ORM broker, offline LLM engine (no
  OPENAI_API_KEY, so summarize and note take milliseconds). After a warm-up visit (the sample
  repeated to 166 s: two chunks at every chunk size, so both workers have loaded their model),
  the recording is uploaded (`visit_create`) and started; time-to-note = the run's finished_at
  minus the moment before `visit_create`; also the CPU seconds of the cluster's processes.
  TRANSCRIBE_CHUNK_SECONDS = 120 (the default), 60 and 30; and Q_WORKERS=1 (one model with
  both cores) at 120 s for reference.

From the engine's rows it also reports what a per-host model needs (BENCHMARKS.md, "Per-host
scaling on paper"): ingest wall, the transcribe stage's head (PCM map, chunk cutting, planning,
until its first unit starts), when the helper worker took its first unit, the gap between two
units on one worker, the tail (last unit done -> stage committed), the compute seconds per
second of audio of one worker thread, and the LLM stages.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from common import (
    FIXTURES,
    REPO,
    SAMPLE_VISIT,
    Row,
    base_environment,
    cli,
    clinician,
    cluster,
    django_setup,
    emit,
    fmt,
    group_cpu_seconds,
    machine_busy_seconds,
    make_long_recording,
    median,
    migrate,
    pg_drop,
    pg_recreate,
    queue_purge,
    wait_for,
    workdir,
)

NAME = "fan_out"
DATABASE = "bench_fan_out"
RATE = 16000
EVAL_PARTS = (
    "cardiology_afib",
    "dermatology_eczema",
    "pediatrics_ear_infection",
    "primary_care_diabetes",
    "psychiatry_depression",
)
GOAL = 0.60  # time-to-note / raw one pass
WER_POINTS = 1.0  # fan-out WER against the script may exceed one pass's by this many points


# --- the recording --------------------------------------------------------------------------


def recording_build(dest: Path) -> tuple[Path, str, float]:
    """(the ~9.5 min Ogg/Opus file, its script as one text, its length in seconds)."""
    import numpy as np
    from faster_whisper import decode_audio

    from fixtures.make_fixtures import VISIT_SAMPLE

    gap = np.zeros(RATE, dtype=np.float32)
    pieces, script = [], []
    for slug in EVAL_PARTS:
        pieces += [decode_audio(str(FIXTURES / "eval" / f"{slug}.ogg"), sampling_rate=RATE), gap]
        lines = json.loads((FIXTURES / "eval" / f"{slug}.json").read_text())["lines"]
        script.append(" ".join(line["text"] for line in lines))
    pieces.append(decode_audio(str(SAMPLE_VISIT), sampling_rate=RATE))
    script.append(" ".join(text for _, text in VISIT_SAMPLE))
    samples = np.concatenate(pieces)
    pcm = (np.clip(samples, -1, 1) * 32767).astype(np.int16)
    _ogg_write(pcm, dest)
    return dest, " ".join(script), len(pcm) / RATE


def _ogg_write(pcm, dest: Path) -> None:
    """16 kHz mono int16 -> Ogg/Opus at 24 kHz, 24 kbit/s (as fixtures/make_fixtures.py)."""
    import av

    with av.open(str(dest), mode="w", format="ogg") as container:
        stream = container.add_stream("libopus", rate=24000, layout="mono")
        stream.bit_rate = 24000
        stream.codec_context.open()
        ctx = stream.codec_context
        resampler = av.AudioResampler(
            format=ctx.format.name, layout="mono", rate=24000, frame_size=ctx.frame_size or None
        )
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = RATE
        frame.pts = 0
        for resampled in [*resampler.resample(frame), *resampler.resample(None)]:
            container.mux(stream.encode(resampled))
        container.mux(stream.encode(None))


# --- raw faster-whisper, in a child process ---------------------------------------------------


def raw_child(path: Path, threads: int) -> None:
    """Runs in a child process: its own model (faster-whisper's default `cpu_threads` unless
    `threads`), a warm-up, then one timed pass; prints one JSON line."""
    django_setup(dict(os.environ))
    from django.conf import settings
    from faster_whisper import WhisperModel

    from visits.speech.transcription import transcribe_options
    from visits.speech.whisper_models import model_choice

    started = time.perf_counter()
    model = WhisperModel(
        model_choice().path,
        device=settings.WHISPER_DEVICE,
        compute_type=settings.WHISPER_COMPUTE_TYPE,
        **({"cpu_threads": threads} if threads else {}),
    )
    load = time.perf_counter() - started
    segments, _ = model.transcribe(str(SAMPLE_VISIT), **transcribe_options())
    list(segments)  # warm-up
    started, cpu = time.perf_counter(), time.process_time()
    segments, _info = model.transcribe(str(path), **transcribe_options())
    text = " ".join(segment.text.strip() for segment in segments)
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    print(json.dumps({"load": load, "wall": wall, "cpu": cpu, "text": text}))


def raw_measure(env: dict[str, str], path: Path, threads: int = 0) -> dict:
    import resource

    def children_cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime

    busy, clock, cpu = machine_busy_seconds(), time.monotonic(), children_cpu()
    done = subprocess.run(
        [sys.executable, __file__, "--raw-child", str(path), "--threads", str(threads)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"raw baseline failed: {done.stderr.strip()[-2000:]}")
    busy, clock = machine_busy_seconds() - busy, time.monotonic() - clock
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # Cores kept busy by other processes while the child ran (load, warm-up and pass).
    result["others"] = max(0.0, busy - (children_cpu() - cpu)) / clock
    return result


# --- ours: a cluster ------------------------------------------------------------------------


def visit_submit(path: Path, user) -> int:
    from visits.services import visit_create, visit_start

    visit = visit_create(clinician=user, recording=path)
    visit_start(visit=visit)
    return visit.current_run_id


def run_wait(run_id: int, timeout: float) -> bool:
    from pipeline.core.models import Run

    return bool(
        wait_for(
            lambda: Run.objects.filter(id=run_id, finished_at__isnull=False).exists(),
            timeout=timeout,
            poll=0.05,
        )
    )


def cluster_case(tmp: Path, env: dict[str, str], *, workers: int, chunk: float, reps: int, user,
                 recording: Path, warm: Path) -> list[dict]:  # fmt: skip
    """Time-to-note of `recording` on a cluster of `workers`, `reps` times after a warm-up,
    each paired with a raw one-pass run just before or after it (alternately), so that other
    load on the machine falls on both sides alike."""
    from django.utils import timezone

    from pipeline.core.models import Run

    queue_purge()
    case_env = {**env, "TRANSCRIBE_CHUNK_SECONDS": f"{chunk:g}"}
    child = cluster(
        case_env,
        tmp / f"cluster-w{workers}-c{chunk:g}.log",
        Q_WORKERS=str(workers),
        Q_QUEUE_LIMIT=str(workers),
    )
    results = []
    try:
        warm_run = visit_submit(warm, user)
        if not run_wait(warm_run, 300):
            raise RuntimeError(f"warm-up run {warm_run} did not finish; see {child.log_path}")
        warm_workers = _unit_workers(warm_run)
        for rep in range(reps):
            raw = raw_measure(env, recording) if rep % 2 == 0 else None
            started, cpu = timezone.now(), group_cpu_seconds(child.pid)
            busy, clock, mine = machine_busy_seconds(), time.monotonic(), time.process_time()
            run_id = visit_submit(recording, user)
            run_wait(run_id, 900)
            cpu = group_cpu_seconds(child.pid) - cpu
            busy, clock = machine_busy_seconds() - busy, time.monotonic() - clock
            mine = time.process_time() - mine
            # Cores kept busy by everything else (other test suites, say; and PostgreSQL).
            others = max(0.0, busy - cpu - mine) / clock
            raw = raw or raw_measure(env, recording)
            run = Run.objects.get(id=run_id)
            result = _run_breakdown(run, started)
            result |= {"warm_workers": warm_workers, "cpu": cpu, "raw": raw, "others": others}
            results.append(result)
    finally:
        child.kill()
    return results


def _unit_workers(run_id: int) -> int:
    from pipeline.core.models import Unit

    return len(set(Unit.objects.filter(stage__run_id=run_id).values_list("worker", flat=True)))


def _seconds(later, earlier) -> float | None:
    if later is None or earlier is None:
        return None
    return (later - earlier).total_seconds()


def _run_breakdown(run, started) -> dict:
    """What the engine's rows say about one run of the long recording."""
    from pipeline.core.models import Attempt, Checkpoint, Stage, Unit
    from visits.schemas import TranscribeOutput
    from visits.speech.transcription import transcript_load

    stages = {stage.name: stage for stage in Stage.objects.filter(run=run)}
    transcribe = stages["transcribe"]
    attempts = list(
        Attempt.objects.filter(stage__run=run)
        .select_related("stage")
        .order_by("stage__position", "number")
    )
    units = list(Unit.objects.filter(stage=transcribe).order_by("index"))
    own = next((a.worker for a in attempts if a.stage_id == transcribe.id), "")
    per_worker = Counter(unit.worker for unit in units)
    # Gaps between two units on the same worker (claim of the next after the last commit).
    gaps = []
    for worker in per_worker:
        mine = sorted((u for u in units if u.worker == worker), key=lambda u: u.started_at)
        gaps += [_seconds(b.started_at, a.finished_at) for a, b in itertools.pairwise(mine)]
    helper_first = min((u.started_at for u in units if u.worker != own), default=None)
    first_unit = min((u.started_at for u in units), default=None)
    last_unit = max((u.finished_at for u in units if u.finished_at), default=None)
    text = ""
    if transcribe.output:
        transcript = transcript_load(TranscribeOutput.model_validate(transcribe.output))
        text = " ".join(segment.text for segment in transcript.segments)
    failures = [
        f"{a.stage.name} #{a.number} {a.status} {a.error_code}: {a.error_message[:300]}"
        for a in attempts
        if a.status != "succeeded"
    ]
    return {
        "run_id": run.id,
        "status": run.status,
        "error": run.error[:300],
        "stages": {name: stage.status for name, stage in stages.items()},
        "failures": failures,
        "time_to_note": _seconds(run.finished_at, started),
        "ingest": _seconds(stages["ingest"].finished_at, stages["ingest"].started_at),
        "transcribe": _seconds(transcribe.finished_at, transcribe.started_at),
        "llm": _seconds(stages["note"].finished_at, stages["summarize"].started_at),
        "head": _seconds(first_unit, transcribe.started_at),
        "helper_first": _seconds(helper_first, transcribe.started_at),
        "tail": _seconds(transcribe.finished_at, last_unit),
        "gap_median": median([g for g in gaps if g is not None]),
        "unit_seconds": sum(unit.seconds for unit in units),
        "unit_max": max((unit.seconds for unit in units), default=0.0),
        "chunks": len(units),
        "per_worker": sorted(per_worker.values(), reverse=True),
        "own_units": per_worker.get(own, 0),
        "unit_tries_over_1": sum(1 for unit in units if unit.tries > 1),
        "checkpoints": Checkpoint.objects.filter(stage=transcribe).count(),
        "attempts": {a.stage_id: a.number for a in attempts},
        "extra_attempts": sum(1 for a in attempts if a.number > 1),
        "text": text,
    }


# --- rows -----------------------------------------------------------------------------------


def _all_runs(results: list[dict]) -> str:
    if len(results) < 2:
        return ""
    return "; all runs " + ", ".join(_f(r["time_to_note"]) for r in results) + " s"


def _wer(reference: str, hypothesis: str) -> float:
    from visits.quality.evaluation import word_error_rate

    return word_error_rate(reference, hypothesis) * 100


def _f(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _mid(results: list[dict], key: str) -> float | None:
    return median([r[key] for r in results if r.get(key) is not None])


def case_rows(
    results: list[dict], *, workers: int, chunk: float, script: str, duration: float
) -> list[Row]:
    # The run whose time-to-note is the median (or the first) stands for the case.
    ordered = sorted(results, key=lambda r: r["time_to_note"] or 1e9)
    mid = ordered[(len(ordered) - 1) // 2]
    ours = _mid(results, "time_to_note")
    raw_wall = median([r["raw"]["wall"] for r in results]) or 0.0
    raw_cpu = median([r["raw"]["cpu"] for r in results]) or 0.0
    raw_text = mid["raw"]["text"]
    ok = sum(1 for r in results if r["status"] == "succeeded")
    others = ", ".join(f"{r['others']:.2f} / {r['raw']['others']:.2f}" for r in results)
    ratio = ours / raw_wall if ours and raw_wall else None
    label = f"{workers} worker{'s' if workers > 1 else ''}, chunk {chunk:g} s"
    goal = GOAL if workers == 2 else None
    verdict = ""
    if goal is not None:
        verdict = "meets" if ratio is not None and ratio <= goal else "MISSES"
    problems = []
    if ok < len(results):
        problems.append(f"{len(results) - ok} run(s) not succeeded")
        for r in results:
            if r["status"] != "succeeded":
                problems.append(
                    f"run {r['run_id']} {r['status']} ({r['error']}; stages {r['stages']}; "
                    f"attempts {' | '.join(r['failures'])})"
                )
    if any(r["unit_tries_over_1"] for r in results):
        problems.append("a unit was tried twice")
    if any(r["extra_attempts"] for r in results):
        problems.append("a stage needed a second attempt")
    if any(r["checkpoints"] != r["chunks"] for r in results):
        problems.append("checkpoints != chunks")
    rows = [
        Row(
            NAME,
            f"time-to-note, ~9.5 min recording, {label}",
            fmt(ours, digits=2),
            baseline=f"{raw_wall:.2f} s raw one pass",
            ratio=f"{ratio:.2f}x" if ratio is not None else "n/a",
            goal=f"<= {goal:.2f}x" if goal is not None else "reference",
            verdict=verdict,
            note=(
                f"transcribe stage {_f(mid['transcribe'])} s, ingest {_f(mid['ingest'])} s, "
                f"summarize+note {_f(mid['llm'])} s; {mid['chunks']} chunks, units per worker "
                f"{'/'.join(str(n) for n in mid['per_worker'])} (attempt's own worker "
                f"{mid['own_units']}); CPU seconds cluster {_mid(results, 'cpu'):.1f} / raw "
                f"{raw_cpu:.1f}; other processes kept {others} cores busy meanwhile (ours / "
                "raw, each run); "
                f"{ok}/{len(results)} succeeded"
                + (f"; {', '.join(problems)}" if problems else "")
                + _all_runs(results)
            ),
            extra={k: v for k, v in mid.items() if k not in ("text", "raw")}
            | {"runs": len(results), "raw_wall": raw_wall, "raw_cpu": raw_cpu},
        )
    ]
    raw_wer = _wer(script, raw_text)
    ours_wer = _wer(script, mid["text"])
    delta = ours_wer - raw_wer
    rows.append(
        Row(
            NAME,
            f"WER against the script, {label}",
            f"{ours_wer:.1f}%",
            baseline=f"{raw_wer:.1f}% one pass",
            ratio=f"{delta:+.1f} pt",
            goal=f"<= +{WER_POINTS:g} pt",
            verdict="meets" if delta <= WER_POINTS else "MISSES",
            note=f"WER of this transcript against the one-pass transcript: "
            f"{_wer(raw_text, mid['text']):.1f}%; words {len(mid['text'].split())} vs "
            f"{len(raw_text.split())}",
        )
    )
    compute = mid["unit_seconds"] / duration
    rows.append(
        Row(
            NAME,
            f"per-host model inputs, {label}",
            f"{compute:.4f} s compute / s audio",
            note=(
                f"per worker: sum of unit seconds {mid['unit_seconds']:.1f} s over "
                f"{duration:.0f} s audio, longest unit {mid['unit_max']:.1f} s; head (map, cut, "
                f"plan -> first unit) {_f(mid['head'], 3)} s; helper's first unit at "
                f"{_f(mid['helper_first'], 3)} s; gap between units on a worker (median) "
                f"{_f(mid['gap_median'] and mid['gap_median'] * 1000, 0)} ms; tail (last unit "
                f"-> stage committed) {_f(mid['tail'], 3)} s"
            ),
        )
    )
    return rows


def raw_rows(results: list[dict], single: dict, duration: float) -> list[Row]:
    """The raw baseline itself: every paired run, and one run with cpu_threads=1."""
    runs = [r["raw"] for r in results]
    walls = [run["wall"] for run in runs]
    cpus = [run["cpu"] for run in runs]
    texts = {run["text"] for run in runs}
    wall, cpu = median(walls) or 0.0, median(cpus) or 0.0
    return [
        Row(
            NAME,
            "raw faster-whisper, one pass, default cpu_threads",
            fmt(wall, digits=2),
            note=f"{duration:.0f} s Ogg/Opus; median of the {len(runs)} paired runs (min "
            f"{min(walls):.2f}, max {max(walls):.2f} s); CPU {cpu:.1f} s = {cpu / wall:.2f} "
            f"cores busy; model load {runs[0]['load']:.2f} s not counted; {len(texts)} distinct "
            f"transcript(s) over the runs",
        ),
        Row(
            NAME,
            "raw faster-whisper, one pass, cpu_threads=1 (for reference)",
            fmt(single["wall"], digits=2),
            ratio=f"{single['wall'] / wall:.2f}x default" if wall else "",
            note=f"CPU {single['cpu']:.1f} s = {single['cpu'] / single['wall']:.2f} cores busy; "
            f"{single['cpu'] / duration:.4f} s compute / s audio; same transcript as default "
            f"threads: {single['text'] in texts}",
        ),
    ]


def main() -> None:
    parser = cli(NAME, __doc__.splitlines()[0])
    parser.add_argument("--raw-child", type=Path, help=_hidden())
    parser.add_argument("--threads", type=int, default=0, help=_hidden())
    parser.add_argument("--reps", type=int, default=None, help="runs per case (default 2; 1 quick)")
    parser.add_argument(
        "--chunks", default="120,60,30", help="TRANSCRIBE_CHUNK_SECONDS values for 2 workers"
    )
    args = parser.parse_args()
    if args.raw_child:
        raw_child(args.raw_child, args.threads)
        return
    reps = args.reps or (1 if args.quick else 2)
    chunks = [float(c) for c in args.chunks.split(",") if c.strip()]
    rows: list[Row] = []
    every: list[dict] = []
    with workdir(NAME) as tmp:
        recording, script, duration = recording_build(tmp / "visit_9m30.ogg")
        warm = make_long_recording(tmp / "warm.wav", repeats=4)
        env = base_environment(tmp, pg_recreate(DATABASE))
        django_setup(env)
        try:
            migrate()
            user = clinician()
            single = raw_measure(env, recording, threads=1)
            cases = [(2, chunk) for chunk in chunks] + [(1, 120.0)]
            for workers, chunk in cases:
                results = cluster_case(
                    tmp, env, workers=workers, chunk=chunk, reps=reps, user=user,
                    recording=recording, warm=warm,
                )  # fmt: skip
                every += results
                rows += case_rows(
                    results, workers=workers, chunk=chunk, script=script, duration=duration
                )
            rows = raw_rows(every, single, duration) + rows
            rows.append(_cutting_row(recording, chunks))
        finally:
            if not os.environ.get("BENCH_KEEP"):
                pg_drop(DATABASE)
    emit(rows, args.json)


def _cutting_row(recording: Path, chunks: list[float]) -> Row:
    """How long the coordinator's chunk cutting takes on this recording (in this process)."""
    import numpy as np
    from faster_whisper import decode_audio

    from visits.speech.transcription import chunk_bounds

    pcm = (decode_audio(str(recording), sampling_rate=RATE) * 32767).astype(np.int16)
    timings = []
    for chunk in chunks:
        started = time.perf_counter()
        bounds = chunk_bounds(pcm, chunk)
        timings.append(
            f"{chunk:g} s: {len(bounds)} chunks in {(time.perf_counter() - started) * 1000:.1f} ms"
        )
    return Row(NAME, "chunk cutting (coordinator, serial)", "; ".join(timings))


def _hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
