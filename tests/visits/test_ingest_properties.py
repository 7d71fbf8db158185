"""Bad input, generated: random bytes, real recordings cut at random points, right bytes under
wrong names, absurd sample rates and lengths, headers that lie.

Properties:
* `recording_normalize` returns a decoded recording or raises one of the permanent errors of
  `visits.errors`, whose message a clinician can act on; never anything else, never a hang.
* Through the engine a run always reaches a final state; a failure is permanent, at one stage,
  after exactly one attempt, with an actionable message, and leaves nothing half-written.
* An upload through the web is a form error (400) or a visit (302) that then fails as above;
  never a 500.

Bounded: few examples per property, no deadline per example, under a minute in all."""

from __future__ import annotations

import contextlib
import io
import re
import struct
import threading
import time
import wave
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from django.db import connections
from django.test import Client
from django.urls import reverse
from hypothesis import HealthCheck, assume, event, given, settings, strategies as st
from hypothesis.errors import InvalidArgument

from pipeline.core.errors import PermanentError
from pipeline.core.models import AttemptStatus, RunStatus, StageStatus
from tests.conftest import SAMPLE_VISIT, SHORT_VISIT
from tests.visits.test_ingest import encode, tone
from visits.errors import EmptyRecording, RecordingTooLong, UnreadableRecording
from visits.models import Visit
from visits.services import RECORDING_EXTENSIONS, visit_create, visit_start
from visits.speech import audio

RATE = 16_000
STAGES = ("ingest", "transcribe", "summarize", "note")
EXTENSIONS = sorted(RECORDING_EXTENSIONS)
# What a recording may fail with: each says what is wrong and what to do.
RECORDING_ERRORS = (UnreadableRecording, EmptyRecording, RecordingTooLong)
PERMANENT_CODES = {"unreadable_recording", "empty_recording", "recording_too_long", "no_speech"}
# A clinician should never read Python: no traceback, no exception class, no source location.
PYTHON_TALK = re.compile(r"Traceback|File \"|\b[A-Z][A-Za-z]*(Error|Exception|Warning)\b")
# No single decode of these small inputs may take anywhere near a stage timeout.
DECODE_SECONDS_MAX = 10.0
RUN_SECONDS_MAX = 90.0

FAST = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
ENGINE = settings(FAST, max_examples=50)


# --- inputs ----------------------------------------------------------------------------------

# extension -> (container, codec, codec rate) of every supported format, encoded once per module.
FORMATS = {
    "wav": ("wav", "pcm_s16le", None),
    "mp3": ("mp3", "libmp3lame", None),
    "flac": ("flac", "flac", None),
    "ogg": ("ogg", "libopus", 48_000),
    "m4a": ("ipod", "aac", None),
    "webm": ("webm", "libopus", 48_000),
}


@pytest.fixture(scope="module")
def recordings(tmp_path_factory) -> dict[str, bytes]:
    """Two seconds of tone in every supported format, and the two spoken fixtures."""
    folder = tmp_path_factory.mktemp("recordings")
    made = {
        extension: encode(
            folder / f"tone.{extension}",
            tone(2.0),
            container_format=container,
            codec=codec,
            codec_rate=codec_rate,
        ).read_bytes()
        for extension, (container, codec, codec_rate) in FORMATS.items()
    }
    made["short.mp3"] = SHORT_VISIT.read_bytes()
    made["sample.ogg"] = SAMPLE_VISIT.read_bytes()
    return made


def wav_bytes(*, rate: int, frames: int, channels: int = 1, width: int = 2, seed: int = 0) -> bytes:
    """A WAV with `frames` frames of quiet noise at any sample rate the header can hold."""
    noise = np.random.default_rng(seed).integers(0, 256, frames * channels * width, dtype=np.uint8)
    out = io.BytesIO()
    with wave.open(out, "wb") as handle:
        handle.setnchannels(channels)
        handle.setsampwidth(width)
        handle.setframerate(rate)
        handle.writeframes(noise.tobytes())
    return out.getvalue()


def wav_claiming(data: bytes, *, seconds: int) -> bytes:
    """`data` (a WAV) with a header that claims `seconds` of audio it does not have."""
    rate, channels, width = struct.unpack_from("<I", data, 24)[0], data[22], data[34] // 8
    claimed = min(0xFFFF_FFF0, seconds * rate * channels * width)
    patched = bytearray(data)
    at = patched.index(b"data") + 4
    struct.pack_into("<I", patched, at, claimed)
    struct.pack_into("<I", patched, 4, min(0xFFFF_FFF0, claimed + at - 4))
    return bytes(patched)


# The first bytes of each container we take: garbage behind them gets past the format probe and
# into the demuxers and decoders.
MAGIC = [
    b"",
    b"RIFF\xff\xff\xff\xffWAVEfmt ",
    b"ID3\x04\x00\x00\x00\x00\x00\x00",
    b"\xff\xfb\x90\x64",
    b"OggS\x00\x02",
    b"fLaC\x00\x00\x00\x22",
    b"\x1aE\xdf\xa3",
    b"\x00\x00\x00\x20ftypM4A \x00\x00\x00\x00",
    b"\xff\xf1\x50\x80",
]
random_bytes = st.tuples(
    st.builds(lambda magic, tail: magic + tail, st.sampled_from(MAGIC), st.binary(max_size=3000)),
    st.sampled_from(EXTENSIONS),
)


@st.composite
def cut_recording(draw: Any, recordings: dict[str, bytes]) -> tuple[bytes, str]:
    """A real recording with its end, its head or a middle part cut away."""
    name = draw(st.sampled_from(sorted(recordings)))
    data = recordings[name]
    start, end = sorted(draw(st.tuples(*[st.integers(0, len(data))] * 2)))
    how = draw(st.sampled_from(["keep head", "keep tail", "drop middle"]))
    cut = {
        "keep head": data[:end],
        "keep tail": data[start:],
        "drop middle": data[:start] + data[end:],
    }
    return cut[how], Path(name).suffix.lstrip(".") or name


@st.composite
def absurd_wav(draw: Any) -> tuple[bytes, str]:
    """Sample rates from 1 Hz to 384 kHz, one frame to a few seconds, some headers that lie."""
    rate = draw(st.sampled_from([1, 100, 4000, 8000, 11_025, 22_050, 48_000, 96_000, 384_000]))
    frames = draw(st.integers(min_value=1, max_value=min(3 * rate, 200_000)))
    data = wav_bytes(
        rate=rate,
        frames=frames,
        channels=draw(st.sampled_from([1, 2])),
        width=draw(st.sampled_from([1, 2, 3, 4])),
        seed=draw(st.integers(0, 100)),
    )
    if draw(st.booleans()):
        data = wav_claiming(data, seconds=draw(st.sampled_from([60, 3600, 5 * 3600, 10**6])))
    return data, draw(st.sampled_from(["wav", "wav", *EXTENSIONS]))


def bad_inputs(recordings: dict[str, bytes]) -> st.SearchStrategy[tuple[bytes, str]]:
    """Inputs for whole runs. The 42 s spoken fixture is left out: cut late, it is a real visit
    that takes seconds to transcribe and proves nothing more than the short one."""
    short = {name: data for name, data in recordings.items() if name != "sample.ogg"}
    return st.one_of(random_bytes, cut_recording(short), absurd_wav())


# --- checks ----------------------------------------------------------------------------------


def outcome(text: str) -> None:
    """Count an outcome in hypothesis' statistics (--hypothesis-show-statistics), if in one."""
    with contextlib.suppress(InvalidArgument):
        event(text)


def assert_actionable(message: str) -> None:
    assert message.strip(), "an empty error message"
    assert not PYTHON_TALK.search(message), f"Python in a clinician's message: {message!r}"


def normalize(tmp_path: Path, data: bytes, extension: str, *, max_seconds: float = 3600) -> Any:
    """`recording_normalize` on `data` saved as visit.<extension>: the result, or the
    permanent error it raised (anything else propagates and fails the test)."""
    source = tmp_path / f"visit.{extension}"
    source.write_bytes(data)
    dest = io.BytesIO()
    started = time.monotonic()
    try:
        decoded = audio.recording_normalize(source, dest, max_seconds=max_seconds)
    except RECORDING_ERRORS as exc:
        assert_actionable(str(exc))
        outcome(f"failed: {exc.code}")
        return exc
    finally:
        assert time.monotonic() - started < DECODE_SECONDS_MAX
    assert decoded.duration_seconds > 0
    assert len(dest.getvalue()) == round(decoded.duration_seconds * RATE) * 2
    outcome("decoded")
    return decoded


def run_to_the_end(visit: Visit) -> None:
    """Run the visit inline in a thread of its own, so that a hang fails instead of waiting."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            visit_start(visit=visit, inline=True)
        except BaseException as exc:
            errors.append(exc)
        finally:
            connections.close_all()

    runner = threading.Thread(target=target, daemon=True)
    runner.start()
    runner.join(RUN_SECONDS_MAX)
    assert not runner.is_alive(), f"the run was still going after {RUN_SECONDS_MAX:.0f} s"
    if errors:
        raise errors[0]


def assert_final_and_clean(visit: Visit, root: Path) -> None:
    """The run is final; a failure is permanent, at one stage, after one attempt, with an
    actionable message; nothing half-written is left."""
    run = visit.current_run
    run.refresh_from_db()
    assert run.status in (RunStatus.SUCCEEDED, RunStatus.FAILED), run.status
    stages = {stage.name: stage for stage in run.stages.all()}
    assert sorted(root.rglob("*.partial")) == []
    run_dir = root / "runs" / str(run.id)
    outcome(f"run {run.status}: {run.error.split(':')[0]}")
    if run.status == RunStatus.SUCCEEDED:
        assert all(len(stage.attempts.all()) == 1 for stage in stages.values())
        return
    (failed,) = [stage for stage in stages.values() if stage.status == StageStatus.FAILED]
    attempts = list(failed.attempts.all())
    assert [(a.status, a.error_code in PERMANENT_CODES) for a in attempts] == [
        (AttemptStatus.FAILED, True)
    ], [(a.status, a.error_code, a.error_message) for a in attempts]
    assert_actionable(failed.error_message)
    assert_actionable(run.error)
    assert not (run_dir / failed.name / "attempt-1").exists()
    position = STAGES.index(failed.name)
    for name in STAGES[:position]:
        assert stages[name].status == StageStatus.SUCCEEDED
    for name in STAGES[position + 1 :]:
        assert stages[name].status == StageStatus.PENDING
        assert not stages[name].attempts.exists()
        assert not (run_dir / name).exists()


# --- recording_normalize, directly ----------------------------------------------------------


@settings(FAST, max_examples=400)
@given(case=random_bytes)
def test_random_bytes_decode_or_fail_permanently(tmp_path, case):
    data, extension = case
    normalize(tmp_path, data, extension)


@settings(FAST, max_examples=150)
@given(data=st.data())
def test_recordings_cut_anywhere_decode_or_fail_permanently(tmp_path, recordings, data):
    content, extension = data.draw(cut_recording(recordings))
    result = normalize(tmp_path, content, extension)
    if isinstance(result, PermanentError):
        assert isinstance(result, (UnreadableRecording, EmptyRecording))


@pytest.mark.parametrize("extension", EXTENSIONS)
@pytest.mark.parametrize("source", sorted(FORMATS))
def test_a_whole_recording_under_the_wrong_extension_still_decodes(
    tmp_path, recordings, source, extension
):
    decoded = normalize(tmp_path, recordings[source], extension)

    assert not isinstance(decoded, PermanentError), f"{source} named .{extension}: {decoded}"
    assert decoded.duration_seconds == pytest.approx(2.0, abs=0.15)


@settings(FAST, max_examples=150)
@given(case=absurd_wav(), max_seconds=st.sampled_from([1.0, 5.0, 3600.0]))
def test_absurd_rates_lengths_and_lying_headers_decode_or_fail_permanently(
    tmp_path, case, max_seconds
):
    data, extension = case
    result = normalize(tmp_path, data, extension, max_seconds=max_seconds)
    if not isinstance(result, PermanentError):
        # Whatever decodes is no longer than the limit and than what the file holds.
        assert result.duration_seconds <= max_seconds + 0.1


# --- through the engine and the web ---------------------------------------------------------


@pytest.mark.django_db(transaction=True)
@ENGINE
@given(data=st.data())
def test_bad_input_through_the_engine_fails_once_and_cleanly(
    tmp_path, recordings, clinician, private_storage, data
):
    content, extension = data.draw(bad_inputs(recordings))
    source = tmp_path / f"visit.{extension}"
    source.write_bytes(content)
    visit = visit_create(clinician=clinician, recording=source)

    run_to_the_end(visit)

    assert_final_and_clean(visit, private_storage)


@pytest.mark.django_db(transaction=True)
@ENGINE
@given(
    data=st.data(),
    stem=st.text(st.characters(codec="utf-8", exclude_categories=["C"]), max_size=30),
    extension=st.sampled_from([*EXTENSIONS, "MP3", "txt", "exe", "wav.exe", ""]),
)
def test_web_upload_of_bad_input_is_a_form_error_or_a_visit_never_a_500(
    recordings, clinician, private_storage, data, stem, extension
):
    content, _ = data.draw(bad_inputs(recordings))
    name = f"{stem}.{extension}" if extension else stem
    assume(name.strip("."))
    client = Client()
    client.force_login(clinician)
    before = Visit.objects.count()

    response = client.post(
        reverse("visits:upload"),
        {"recording": _upload(name, content)},
    )

    assert response.status_code in (302, 400), response.status_code
    outcome(f"HTTP {response.status_code}")
    if response.status_code == 400:
        assert Visit.objects.count() == before
        assert b"errorlist" in response.content
        return
    visit = Visit.objects.get(pk=int(response["Location"].rstrip("/").split("/")[-1]))
    run_to_the_end(visit)
    assert_final_and_clean(visit, private_storage)


def _upload(name: str, content: bytes) -> Any:
    from django.core.files.uploadedfile import SimpleUploadedFile

    return SimpleUploadedFile(name, content, content_type="application/octet-stream")
