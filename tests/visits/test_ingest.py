"""Recordings through the real pipeline: every supported format decodes, and every bad or odd
file fails once, permanently, with a message that says what to fix and nothing half-written.

The audio is made here with PyAV and numpy (a tone, silence, noise), so no binary is committed.
These tests run the pipeline inline with real commits (`transactional_db`): the stage
heartbeat runs on its own connection and must see the rows the test wrote."""

from __future__ import annotations

import wave
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest

from pipeline.core.models import Run
from tests.conftest import SHORT_VISIT
from visits.errors import RecordingRejected
from visits.models import Visit
from visits.selectors import visit_status_document
from visits.services import visit_create, visit_start

pytestmark = pytest.mark.django_db(transaction=True)

RATE = 16_000
STAGES = ("ingest", "transcribe", "summarize", "note")


# --- making audio ----------------------------------------------------------------------------


def tone(seconds: float, *, rate: int = RATE, hz: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * 32767 * np.sin(2 * np.pi * hz * t)).astype(np.int16)


def encode(
    path: Path,
    samples: np.ndarray,
    *,
    container_format: str,
    codec: str,
    rate: int = RATE,
    codec_rate: int | None = None,
) -> Path:
    """Encode int16 mono `samples` at `rate` into `path` with PyAV's bundled FFmpeg."""
    codec_rate = codec_rate or rate
    with av.open(str(path), mode="w", format=container_format) as container:
        stream = container.add_stream(codec, rate=codec_rate, layout="mono")
        stream.codec_context.open()  # fixes the sample format and frame size
        ctx = stream.codec_context
        resampler = av.AudioResampler(
            format=ctx.format.name,
            layout="mono",
            rate=codec_rate,
            frame_size=ctx.frame_size or None,
        )
        frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = rate
        frame.pts = 0
        for out in [*resampler.resample(frame), *resampler.resample(None)]:
            container.mux(stream.encode(out))
        container.mux(stream.encode(None))
    return path


def wav(path: Path, samples: np.ndarray) -> Path:
    return encode(path, samples, container_format="wav", codec="pcm_s16le")


# --- running the pipeline and reading what it left -------------------------------------------


def process(clinician: Any, recording: Path) -> tuple[Visit, dict[str, Any]]:
    visit = visit_create(clinician=clinician, recording=recording)
    visit_start(visit=visit, inline=True)
    visit.refresh_from_db()
    return visit, visit_status_document(visit).model_dump(mode="json")


def stage_doc(doc: dict[str, Any], name: str) -> dict[str, Any]:
    return next(stage for stage in doc["stages"] if stage["name"] == name)


def assert_failed_permanently_at(
    doc: dict[str, Any], stage_name: str, *, code: str, words: tuple[str, ...]
) -> dict[str, Any]:
    """The run failed at `stage_name` after exactly one attempt; later stages never started."""
    assert doc["status"] == "failed", doc
    assert [stage["name"] for stage in doc["stages"]] == list(STAGES)
    failing = stage_doc(doc, stage_name)
    assert failing["status"] == "failed"
    assert len(failing["attempts"]) == 1, failing["attempts"]
    (attempt,) = failing["attempts"]
    assert attempt["status"] == "failed"
    assert attempt["error_code"] == code
    for word in words:
        assert word.lower() in failing["error"].lower(), failing["error"]
        assert word.lower() in attempt["error"].lower(), attempt["error"]
    for earlier in STAGES[: STAGES.index(stage_name)]:
        assert stage_doc(doc, earlier)["status"] == "succeeded"
        assert len(stage_doc(doc, earlier)["attempts"]) == 1
    for later in STAGES[STAGES.index(stage_name) + 1 :]:
        assert stage_doc(doc, later)["attempts"] == [], later
        assert stage_doc(doc, later)["status"] == "pending", later
    assert doc["transcript"] is None
    assert doc["summary"] is None
    assert doc["note"] is None
    assert doc["engine"] is None
    return failing


def assert_nothing_half_written(root: Path, visit: Visit, failed_stage: str) -> None:
    assert list(root.rglob("*.partial")) == []
    run_dir = root / "runs" / str(visit.current_run_id)
    assert not (run_dir / failed_stage / "attempt-1").exists()
    for later in STAGES[STAGES.index(failed_stage) + 1 :]:
        assert not (run_dir / later).exists()
    # The upload itself is kept (the clinician may download it or retry), nothing else is.
    assert (root / visit.recording.name).is_file()


# --- bad and odd recordings ------------------------------------------------------------------


def test_text_file_renamed_mp3_fails_once_as_unreadable(clinician, private_storage, tmp_path):
    source = tmp_path / "visit.mp3"
    source.write_text("Patient: Jane Example. These are notes, not a recording.\n" * 40)

    visit, doc = process(clinician, source)

    assert_failed_permanently_at(
        doc, "ingest", code="unreadable_recording", words=("could not be read as audio",)
    )
    assert_nothing_half_written(private_storage, visit, "ingest")
    assert Run.objects.get(pk=visit.current_run_id).error.startswith("ingest: ")


def test_truncated_mp3_fails_once_as_cut_short(clinician, private_storage, tmp_path):
    whole = encode(
        tmp_path / "whole.mp3",
        tone(8.0),
        container_format="mp3",
        codec="libmp3lame",
        codec_rate=22_050,
    )
    data = whole.read_bytes()
    # libmp3lame's first frame is a Xing ("Info" for CBR) header that declares the full length.
    assert b"Info" in data[:4096] or b"Xing" in data[:4096]
    truncated = tmp_path / "visit.mp3"
    truncated.write_bytes(data[: len(data) // 2])

    visit, doc = process(clinician, truncated)

    failing = assert_failed_permanently_at(
        doc, "ingest", code="unreadable_recording", words=("cut short",)
    )
    assert "8.0 s" in failing["error"]
    assert_nothing_half_written(private_storage, visit, "ingest")


def test_zero_byte_wav_fails_once_as_empty(clinician, private_storage, tmp_path):
    source = tmp_path / "visit.wav"
    source.write_bytes(b"")

    visit, doc = process(clinician, source)

    assert_failed_permanently_at(doc, "ingest", code="empty_recording", words=("empty",))
    assert_nothing_half_written(private_storage, visit, "ingest")


def test_wav_header_without_samples_fails_once_as_empty(clinician, private_storage, tmp_path):
    source = tmp_path / "visit.wav"
    with wave.open(str(source), "wb") as header_only:  # a recorder that stopped at once
        header_only.setnchannels(1)
        header_only.setsampwidth(2)
        header_only.setframerate(RATE)
    assert source.stat().st_size == 44

    visit, doc = process(clinician, source)

    assert_failed_permanently_at(doc, "ingest", code="empty_recording", words=("no audio",))
    assert_nothing_half_written(private_storage, visit, "ingest")


@pytest.mark.parametrize(
    "samples",
    [
        pytest.param(np.zeros(5 * RATE, dtype=np.int16), id="digital-silence"),
        pytest.param(
            np.random.default_rng(7).normal(0, 30, 5 * RATE).astype(np.int16), id="low-noise"
        ),
    ],
)
def test_recording_without_speech_fails_once_at_transcribe(
    clinician, private_storage, tmp_path, samples
):
    visit, doc = process(clinician, wav(tmp_path / "visit.wav", samples))

    assert_failed_permanently_at(doc, "transcribe", code="no_speech", words=("No speech detected",))
    assert_nothing_half_written(private_storage, visit, "transcribe")
    # The decoded audio of the stage that did succeed is kept whole.
    ingest = visit.current_run.stages.get(name="ingest").output
    pcm = private_storage / ingest["audio"]
    assert pcm.stat().st_size == 5 * RATE * 2
    assert ingest["duration_seconds"] == pytest.approx(5.0, abs=0.01)


# --- every supported format ------------------------------------------------------------------

FORMATS = [
    pytest.param("wav", "wav", "pcm_s16le", None, "wav", id="wav"),
    pytest.param("mp3", "mp3", "libmp3lame", None, "mp3", id="mp3"),
    pytest.param("flac", "flac", "flac", None, "flac", id="flac"),
    pytest.param("ogg", "ogg", "libopus", 48_000, "ogg", id="ogg-opus"),
    pytest.param("opus", "ogg", "libopus", 48_000, "ogg", id="opus-extension"),
    pytest.param("m4a", "ipod", "aac", None, "mp4", id="m4a-aac"),
    pytest.param("webm", "webm", "libopus", 48_000, "webm", id="webm-opus"),
]


@pytest.mark.parametrize(("extension", "container", "codec", "codec_rate", "detected"), FORMATS)
def test_every_supported_format_decodes(
    clinician, private_storage, tmp_path, extension, container, codec, codec_rate, detected
):
    source = encode(
        tmp_path / f"visit.{extension}",
        tone(2.0),
        container_format=container,
        codec=codec,
        codec_rate=codec_rate,
    )

    visit, doc = process(clinician, source)

    ingest = stage_doc(doc, "ingest")
    assert ingest["status"] == "succeeded", ingest
    assert len(ingest["attempts"]) == 1
    output = visit.current_run.stages.get(name="ingest").output
    assert output["duration_seconds"] == pytest.approx(2.0, abs=0.1)
    assert output["sample_rate"] == 16_000
    assert detected in output["source_format"]
    assert output["source_bytes"] == source.stat().st_size
    pcm = private_storage / output["audio"]
    assert pcm.stat().st_size == pytest.approx(2.0 * RATE * 2, abs=0.1 * RATE * 2)
    # A pure tone is not speech: the run then stops, permanently, before any summary exists.
    assert_failed_permanently_at(doc, "transcribe", code="no_speech", words=("No speech",))
    assert_nothing_half_written(private_storage, visit, "transcribe")


def test_recording_longer_than_the_limit_is_refused_permanently(
    clinician, private_storage, tmp_path, settings
):
    settings.RECORDING_MAX_SECONDS = 60
    source = wav(tmp_path / "visit.wav", np.zeros(90 * RATE, dtype=np.int16))

    visit, doc = process(clinician, source)

    failing = assert_failed_permanently_at(
        doc, "ingest", code="recording_too_long", words=("limit is 0:01:00", "0:01:30 long")
    )
    assert "Split it" in failing["error"]
    assert_nothing_half_written(private_storage, visit, "ingest")


def test_recording_at_the_limit_is_accepted(clinician, tmp_path, settings):
    settings.RECORDING_MAX_SECONDS = 3
    _visit, doc = process(clinician, wav(tmp_path / "visit.wav", tone(2.0)))

    assert stage_doc(doc, "ingest")["status"] == "succeeded"


# --- refused before anything is stored -------------------------------------------------------


@pytest.mark.parametrize("name", ["visit.txt", "visit", "visit.mp3.exe"])
def test_file_extension_not_accepted_is_rejected_before_storing(
    clinician, private_storage, tmp_path, name
):
    source = tmp_path / name
    source.write_bytes(wav(tmp_path / "real.wav", tone(1.0)).read_bytes())

    with pytest.raises(RecordingRejected, match="not a recording format we accept"):
        visit_create(clinician=clinician, recording=source)

    assert Visit.objects.count() == 0
    assert Run.objects.count() == 0
    assert [path for path in private_storage.rglob("*") if path.is_file()] == []


def test_file_over_the_size_limit_is_rejected_before_storing(
    clinician, private_storage, tmp_path, settings
):
    settings.RECORDING_MAX_BYTES = 1000
    source = wav(tmp_path / "visit.wav", tone(1.0))

    with pytest.raises(RecordingRejected, match="limit"):
        visit_create(clinician=clinician, recording=source)

    assert Visit.objects.count() == 0
    assert [path for path in private_storage.rglob("*") if path.is_file()] == []


# --- a real visit, end to end ----------------------------------------------------------------


def test_short_visit_runs_end_to_end(clinician, private_storage):
    _visit, doc = process(clinician, SHORT_VISIT)

    assert doc["status"] == "succeeded", doc
    for stage in doc["stages"]:
        assert stage["status"] == "succeeded", stage
        assert len(stage["attempts"]) == 1
        assert stage["error"] is None
    text = doc["transcript"]["text"].lower()
    assert "ibuprofen" in text
    assert "back pain" in text
    assert doc["summary"] is not None
    assert doc["note"] is not None
    assert "offline" in doc["engine"]
    assert doc["usage"]["audio_seconds"] > 11
    assert list(private_storage.rglob("*.partial")) == []
