"""1. The transcribe stage, run through the engine, against raw faster-whisper.

Same process, same warm model (`transcription.whisper_model()`), same decoding settings
(`transcribe_options()`), same files. For each file and repetition:

* ours: a visit is created and its ingest stage run; then the transcribe stage is claimed and
  run by the executor (`store.stage_claim` + `executor._attempt_run`: lease, heartbeat thread,
  PCM map, chunking, a checkpoint per chunk, the transcript artifact, the commit);
* raw: `model.transcribe(samples, **transcribe_options())` on the same 16 kHz samples,
  decoded beforehand (the stage also starts from decoded PCM: ingest did the decoding);
* raw + decode: `model.transcribe(path, ...)`, what a script would do, against our ingest +
  transcribe stages.

Files: fixtures/visit_sample.ogg (42 s, one chunk) and the sample repeated to about 4 minutes
(two chunks at the default TRANSCRIBE_CHUNK_SECONDS=120). Medians of the repetitions; the order
of ours/raw alternates so that neither always runs on a warmer cache.
"""

from __future__ import annotations

import time
from pathlib import Path

from common import (
    SAMPLE_VISIT,
    Row,
    base_environment,
    cli,
    clinician,
    django_setup,
    emit,
    fmt,
    make_long_recording,
    median,
    migrate,
    ratio_row,
    sqlite_url,
    workdir,
)

NAME = "transcribe"
# CPU seconds (all threads of this process) of the last measurement: less sensitive than wall
# time to other processes competing for the cores.
CPU: dict[str, float] = {}


def engine_transcribe(path: Path, user) -> tuple[float, float, dict]:
    """(ingest seconds, transcribe-stage seconds, transcribe output) through the executor."""
    from pipeline.core import executor, store
    from pipeline.core.models import Stage
    from visits.services import visit_create

    visit = visit_create(clinician=user, recording=path)
    run_id = visit.current_run_id
    ingest = Stage.objects.get(run_id=run_id, name="ingest")
    started = time.perf_counter()
    claim = store.stage_claim(stage_id=ingest.id, worker="bench")
    next_id = executor._attempt_run(claim)
    ingest_seconds = time.perf_counter() - started
    started, cpu = time.perf_counter(), time.process_time()
    claim = store.stage_claim(stage_id=next_id, worker="bench")
    executor._attempt_run(claim)
    transcribe_seconds = time.perf_counter() - started
    CPU["ours"] = time.process_time() - cpu
    stage = Stage.objects.get(id=next_id)
    return ingest_seconds, transcribe_seconds, stage.output


def raw_transcribe(source: object) -> tuple[float, int]:
    from visits.speech.transcription import transcribe_options, whisper_model

    started, cpu = time.perf_counter(), time.process_time()
    segments, _info = whisper_model().transcribe(source, **transcribe_options())
    words = sum(len(segment.text.split()) for segment in segments)
    CPU["raw"] = time.process_time() - cpu
    return time.perf_counter() - started, words


def measure(path: Path, label: str, reps: int, user) -> list[Row]:
    from faster_whisper import decode_audio

    samples = decode_audio(str(path), sampling_rate=16000)
    ours, ours_ingest, raw, raw_file, ours_cpu, raw_cpu = [], [], [], [], [], []
    output: dict = {}
    raw_words = 0
    for rep in range(reps):
        order = ("ours", "raw") if rep % 2 == 0 else ("raw", "ours")
        for which in order:
            if which == "ours":
                ingest_s, transcribe_s, output = engine_transcribe(path, user)
                ours.append(transcribe_s)
                ours_cpu.append(CPU["ours"])
                ours_ingest.append(ingest_s + transcribe_s)
            else:
                seconds, raw_words = raw_transcribe(samples)
                raw.append(seconds)
                raw_cpu.append(CPU["raw"])
                seconds, _ = raw_transcribe(str(path))
                raw_file.append(seconds)
    duration = len(samples) / 16000
    note = (
        f"{duration:.0f} s audio, {output.get('chunks')} chunk(s), {reps} reps; "
        f"words ours/raw {output.get('words')}/{raw_words}"
    )
    return [
        ratio_row(
            NAME,
            f"transcribe stage vs raw, {label}",
            median(ours),
            median(raw),
            goal=1.10,
            note=note,
        ),
        ratio_row(
            NAME,
            f"transcribe stage vs raw, CPU seconds, {label}",
            median(ours_cpu),
            median(raw_cpu),
            goal=1.10,
            note="process CPU time, all threads (robust to other load on the machine)",
        ),
        ratio_row(
            NAME,
            f"ingest+transcribe vs raw(path), {label}",
            median(ours_ingest),
            median(raw_file),
            goal=None,
            note="raw decodes the file itself",
        ),
    ]


def main() -> None:
    args = cli(NAME, __doc__.splitlines()[0]).parse_args()
    reps = 1 if args.quick else 2
    with workdir(NAME) as tmp:
        django_setup(base_environment(tmp, sqlite_url(tmp)))
        migrate()
        from django.conf import settings

        from visits.speech.transcription import whisper_model
        from visits.speech.whisper_models import model_choice

        user = clinician()
        long_file = make_long_recording(tmp / "visit_long.wav", repeats=6)
        started = time.perf_counter()
        whisper_model()
        load = time.perf_counter() - started
        # Warm-up: the first transcription of a process pays one-off costs on both sides.
        raw_transcribe(str(SAMPLE_VISIT))
        engine_transcribe(SAMPLE_VISIT, user)
        rows = measure(SAMPLE_VISIT, "42 s sample", reps + 2, user)
        rows += measure(long_file, "~4 min", reps, user)
        rows.append(
            Row(
                NAME,
                "model load (once per process)",
                fmt(load),
                note=f"{model_choice().name}, {settings.WHISPER_COMPUTE_TYPE}, "
                f"beam {settings.WHISPER_BEAM_SIZE}, "
                f"chunk {settings.TRANSCRIBE_CHUNK_SECONDS:.0f} s",
            )
        )
    emit(rows, args.json)


if __name__ == "__main__":
    main()
