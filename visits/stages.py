"""The visit workflow: four durable stages, read top to bottom.

    ingest -> transcribe -> summarize -> note

Each stage declares here the model of what it returns, how long one attempt may take, how
often it is tried and which of its errors are permanent. Everything a stage needs from the
ones before comes from their committed outputs, read back as those models."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from django.conf import settings
from openai.types.chat import ChatCompletionMessageParam

from pipeline import (
    BudgetExceeded,
    LLMGateway,
    OutputInvalid,
    RetryPolicy,
    StageContext,
    StageSpec,
    UnitContext,
    Workflow,
    artifact_path,
    llm_enabled,
    units_run,
    units_stream,
)
from visits.errors import EmptyRecording, NoSpeechDetected, RecordingTooLong, UnreadableRecording
from visits.notes import claims, offline, prompts, versions as notes
from visits.refs import INGEST, NOTE, SUMMARIZE, TRANSCRIBE, VISIT
from visits.schemas import (
    ClinicalSummary,
    Doubt,
    IngestOutput,
    NoteOutput,
    PostVisitNote,
    Segment,
    SummarizeOutput,
    TranscribeOutput,
    Transcript,
    evidence_check,
)
from visits.speech import audio, pieces, transcription, whisper_models as speech_models

# Fewer words than this is no conversation: never let a model invent a visit from it.
MIN_SPEECH_WORDS = 4


def ingest(ctx: StageContext) -> IngestOutput:
    """Decode the uploaded recording into 16 kHz mono PCM; or, for a recording still being
    made, wait for its first piece and hand the stream to `transcribe`."""
    if "recording_pieces" in ctx.input:
        return _ingest_live(ctx)
    source = artifact_path(ctx.input["recording"])
    with ctx.artifact_writer("audio.s16le") as pcm:
        # Decoded in a child process with limits: the upload is untrusted.
        decoded = audio.recording_normalize_isolated(
            source,
            Path(pcm.name),
            heartbeat=ctx.heartbeat,
            **_decode_limits(),
        )
    return IngestOutput(
        audio=ctx.artifact_ref("audio.s16le"),
        sample_rate=audio.SAMPLE_RATE,
        duration_seconds=round(decoded.duration_seconds, 3),
        source_format=decoded.source_format,
        source_bytes=source.stat().st_size,
    )


def _decode_limits() -> dict[str, Any]:
    return {
        "max_seconds": settings.RECORDING_MAX_SECONDS,
        "memory_bytes": settings.RECORDING_DECODE_MEMORY_MB * 2**20,
        "cpu_seconds": settings.RECORDING_DECODE_CPU_SECONDS,
    }


def _ingest_live(ctx: StageContext) -> IngestOutput:
    folder = artifact_path(ctx.input["recording_pieces"])
    while not pieces.piece_path(folder, 0).exists():
        if pieces.pieces_sealed(folder) == 0:
            raise EmptyRecording("The recording was stopped before any audio arrived.")
        ctx.lease_check()  # a withdrawn visit's run is cancelled: stop waiting
        time.sleep(0.5)
    return IngestOutput(
        audio=None,
        sample_rate=audio.SAMPLE_RATE,
        duration_seconds=None,
        source_format=ctx.input["recording_format"],
        source_bytes=None,
        live=True,
    )


def _chunk_units(
    ctx: StageContext, model: str, audio_ref: str, bounds: list[tuple[int, int]]
) -> list[tuple[str, dict[str, Any]]]:
    """The units of `transcribe`, one per chunk of `bounds` of the PCM `audio_ref`."""
    # A chunk heard by another model or with another prompt is another transcription: the key
    # names both, and how a chunk was cut into segments, so a retry after a change of any of
    # them transcribes again rather than mix two kinds in one transcript.
    heard_by = hashlib.sha256(f"{model}\n{ctx.input.get('whisper_prompt', '')}".encode())
    return [
        (
            f"chunk:{transcription.SEGMENTS_VERSION}:{heard_by.hexdigest()[:12]}:"
            f"{index:05d}:{start}:{end}",
            {"audio": audio_ref, "start": start, "end": end},
        )
        for index, (start, end) in enumerate(bounds)
    ]


def transcribe(ctx: StageContext) -> TranscribeOutput:
    """Transcribe chunk by chunk, each a unit any free transcription worker takes; each finished
    chunk is kept, so a retry starts after it. A live recording is decoded and cut into chunks
    while it is being made, and each is transcribed as soon as it is cut."""
    started = time.monotonic()
    ingested = ctx.output(INGEST)
    model = speech_models.model_choice().name
    kept = ctx.checkpoints(prefix="chunk:")
    if ingested.live:
        audio_ref, duration, chunks, heard = _transcribe_live(ctx, model)
    else:
        assert ingested.audio is not None and ingested.duration_seconds is not None
        audio_ref, duration = ingested.audio, ingested.duration_seconds
        pcm = audio.pcm_load(artifact_path(audio_ref))
        bounds = transcription.chunk_bounds(pcm, settings.TRANSCRIBE_CHUNK_SECONDS)
        chunks = _chunk_units(ctx, model, audio_ref, bounds)
        heard = units_run(ctx, chunks)
    for key, value in chunks:
        seconds = (value["end"] - value["start"]) / audio.SAMPLE_RATE
        if key in kept:
            ctx.usage.saved_audio_seconds += seconds
        else:
            ctx.usage.audio_seconds += seconds
    raw_segments = [segment for key, _ in chunks for segment in heard[key]]
    transcript = Transcript(
        model=model,
        duration_seconds=duration,
        segments=[Segment(id=i, **segment) for i, segment in enumerate(raw_segments)],
    )
    ctx.usage.compute_seconds = time.monotonic() - started
    if transcript.word_count < MIN_SPEECH_WORDS:
        raise NoSpeechDetected(
            "No speech detected in the recording "
            f"({transcript.word_count} words in {transcript.duration_seconds:.0f} s). "
            "Check that the microphone was on and upload the visit again."
        )
    with ctx.artifact_writer("transcript.json", mode="w") as handle:
        handle.write(transcript.model_dump_json())
    return TranscribeOutput(
        transcript=ctx.artifact_ref("transcript.json"),
        audio=audio_ref if ingested.live else None,
        model=transcript.model,
        segments=len(transcript.segments),
        words=transcript.word_count,
        chunks=len(chunks),
        chunks_reused=len(kept.keys() & heard.keys()),
    )


def _transcribe_live(
    ctx: StageContext, model: str
) -> tuple[str, float, list[tuple[str, dict[str, Any]]], dict[str, Any]]:
    """Decode the pieces as they arrive (in a child with limits: they are untrusted), cut the
    audio into chunks at pauses and stream them to the workers, until the recording is sealed
    and every chunk is heard. A later attempt decodes from the first piece again: the cuts fall
    where they fell, so every chunk already heard is kept."""
    ctx.attempt_dir.mkdir(parents=True, exist_ok=True)
    dest = ctx.attempt_dir / "audio.s16le"
    dest.touch()  # read before the decoder has written anything
    audio_ref = ctx.artifact_ref("audio.s16le")
    cutter = transcription.ChunkCutter(settings.TRANSCRIBE_LIVE_CHUNK_SECONDS)
    decoded: list[audio.DecodedRecording] = []
    with audio.DecodeChild(
        artifact_path(ctx.input["recording_pieces"]),
        dest,
        stream_format=ctx.input["recording_format"],
        **_decode_limits(),
    ) as child:

        def source(sealed: bool) -> tuple[list[tuple[str, dict[str, Any]]], bool]:
            if not decoded and (done := child.poll()) is not None:
                decoded.append(done)
            bounds = cutter.cut(audio.pcm_load(dest), final=bool(decoded))
            return _chunk_units(ctx, model, audio_ref, bounds), bool(decoded)

        heard = units_stream(ctx, source)
    chunks = _chunk_units(ctx, model, audio_ref, cutter.bounds)
    return audio_ref, round(decoded[0].duration_seconds, 3), chunks, heard


def transcribe_chunk(unit: UnitContext) -> list[transcription.RawSegment]:
    """One unit of `transcribe`: a chunk of the decoded audio, heard with the run's prompt."""
    start, end = unit.input["start"], unit.input["end"]
    pcm = audio.pcm_load(artifact_path(unit.input["audio"]))[start:end]
    return transcription.transcribe_samples(
        pcm,
        offset_seconds=start / audio.SAMPLE_RATE,
        prompt=unit.run_input.get("whisper_prompt", ""),
        beside=unit.attempts_per_process,
    )


def _engine_label(ctx: StageContext) -> str:
    return LLMGateway(ctx).model if llm_enabled() else offline.ENGINE_LABEL


DocumentT = TypeVar("DocumentT", ClinicalSummary, PostVisitNote)


def _drafted(
    ctx: StageContext,
    transcript: Transcript,
    *,
    messages: list[ChatCompletionMessageParam],
    output_type: type[DocumentT],
    offline_draft: Callable[[], DocumentT],
    doubts: Callable[[DocumentT, Transcript], list[Doubt]],
) -> tuple[DocumentT, list[Doubt]]:
    """A document from the model (or the offline engine) whose citations all exist, asked once
    to repair what its evidence does not show; and what is still doubtful after that."""
    document = LLMGateway(ctx).complete(
        messages=messages,
        output_type=output_type,
        offline=offline_draft,
        check=lambda result: evidence_check(result, transcript),
        review=lambda result: claims.unsupported_as_repair(doubts(result, transcript)),
    )
    return document, doubts(document, transcript)


def summarize(ctx: StageContext) -> SummarizeOutput:
    """Structured clinical facts, each citing the transcript segments it came from."""
    transcript = transcription.transcript_load(ctx.output(TRANSCRIBE))
    summary, unsupported = _drafted(
        ctx,
        transcript,
        messages=prompts.summarize_messages(transcript),
        output_type=ClinicalSummary,
        offline_draft=lambda: offline.summarize(transcript),
        doubts=claims.summary_unsupported,
    )
    return SummarizeOutput(engine=_engine_label(ctx), summary=summary, unsupported=unsupported)


def note(ctx: StageContext) -> NoteOutput:
    """The SOAP note for the chart and the after-visit summary for the patient."""
    transcript = transcription.transcript_load(ctx.output(TRANSCRIBE))
    summary = ctx.output(SUMMARIZE).summary
    result, unsupported = _drafted(
        ctx,
        transcript,
        messages=prompts.note_messages(summary),
        output_type=PostVisitNote,
        offline_draft=lambda: offline.write_note(summary),
        doubts=claims.note_unsupported,
    )
    return NoteOutput(engine=_engine_label(ctx), note=result, unsupported=unsupported)


# Provider outages come in minutes, so the LLM stages are patient: six attempts, backing off
# from 2 s to at most 2 min (about 4 min in all) before an admin is needed. An answer that
# stays invalid after its repair, or a spent budget, needs a person, not another attempt; so
# does a refused key or request (the gateway raises those as permanent `llm_http_4xx`).
LLM_STAGE_POLICY = RetryPolicy(
    initial_interval_seconds=2,
    backoff_coefficient=2,
    maximum_interval_seconds=120,
    maximum_attempts=6,
    start_to_close_timeout_seconds=600,
    non_retryable_error_codes=(OutputInvalid.code, BudgetExceeded.code),
)

VISIT_WORKFLOW = Workflow(
    name=VISIT,
    stages=(
        StageSpec(
            name=INGEST.name,
            title="Ingest recording",
            run=ingest,
            output=INGEST.output,
            policy=RetryPolicy(
                initial_interval_seconds=2,
                maximum_attempts=3,
                start_to_close_timeout_seconds=600,
                non_retryable_error_codes=(
                    UnreadableRecording.code,
                    EmptyRecording.code,
                    RecordingTooLong.code,
                ),
            ),
        ),
        StageSpec(
            name=TRANSCRIBE.name,
            title="Transcribe",
            run=transcribe,
            # Chunks fan out to every free worker of the queue (`pipeline.core.units`).
            unit=transcribe_chunk,
            output=TRANSCRIBE.output,
            queue=settings.TRANSCRIBE_QUEUE or None,
            policy=RetryPolicy(
                initial_interval_seconds=5,
                maximum_attempts=3,
                # A live recording's attempt lasts as long as the visit does.
                start_to_close_timeout_seconds=int(settings.RECORDING_MAX_SECONDS) + 3600,
                non_retryable_error_codes=(NoSpeechDetected.code,),
            ),
        ),
        StageSpec(
            name=SUMMARIZE.name,
            title="Summarize",
            run=summarize,
            output=SUMMARIZE.output,
            policy=LLM_STAGE_POLICY,
            flagged=lambda output: len(output.unsupported),
        ),
        StageSpec(
            name=NOTE.name,
            title="Write note",
            run=note,
            output=NOTE.output,
            policy=LLM_STAGE_POLICY,
            flagged=lambda output: len(output.unsupported),
            # The draft becomes the visit's next note version in the same commit.
            on_success=notes.note_draft_record,
        ),
    ),
)
