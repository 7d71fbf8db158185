"""Transcripts are cut into sentences: the grouping rule on hand-made words, then once with the
real bundled model on the sample visit."""

from __future__ import annotations

import itertools
import os
import re
from pathlib import Path

import pytest

from tests.conftest import SAMPLE_VISIT
from visits.speech import audio, transcription
from visits.speech.transcription import (
    MAX_SEGMENT_SECONDS,
    PAUSE_SECONDS,
    RawSegment,
    TimedWord,
    sentences_from_words,
    transcribe_options,
    transcribe_samples,
    whisper_model,
)

# --- the rule, on hand-made words ------------------------------------------------------------


def spoken(text: str, *, start: float = 0.0, step: float = 0.3) -> list[TimedWord]:
    """`text` as faster-whisper gives it: one word per space, each with its leading space,
    back to back, `step` seconds each. A "|" between words is a silence of one second."""
    words: list[TimedWord] = []
    at = start
    for token in text.split():
        if token == "|":
            at += 1.0
            continue
        words.append(TimedWord(start=round(at, 2), end=round(at + step, 2), word=f" {token}"))
        at += step
    return words


def texts(segments: list[RawSegment]) -> list[str]:
    return [segment["text"] for segment in segments]


def test_a_segment_ends_at_each_sentence_end():
    words = spoken("What brings you in? I have a headache. It hurts! Okay.")
    segments = sentences_from_words(words, offset_seconds=0)
    assert texts(segments) == ["What brings you in?", "I have a headache.", "It hurts!", "Okay."]
    # Each starts at its first word and ends at its last.
    assert [(s["start"], s["end"]) for s in segments] == [
        (0.0, 1.2),
        (1.2, 2.4),
        (2.4, 3.0),
        (3.0, 3.3),
    ]


def test_times_are_relative_to_the_recording_and_rounded():
    words = [
        TimedWord(start=0.123, end=0.456, word=" Hello."),
        TimedWord(start=0.5, end=0.777, word=" Bye."),
    ]
    segments = sentences_from_words(words, offset_seconds=120.0)
    assert segments == [
        {"start": 120.12, "end": 120.46, "text": "Hello."},
        {"start": 120.5, "end": 120.78, "text": "Bye."},
    ]
    assert all(type(s["start"]) is float and type(s["end"]) is float for s in segments)


def test_closing_quotes_and_brackets_after_the_stop_still_end_the_sentence():
    words = spoken('He said "stop." Then (he left.) After that?" Yes.')
    segments = sentences_from_words(words, offset_seconds=0)
    assert texts(segments) == ['He said "stop."', "Then (he left.)", 'After that?"', "Yes."]


def test_decimal_numbers_do_not_end_a_sentence():
    words = spoken("Take 2.5 milligrams of it. Then 0.5 more.")
    assert texts(sentences_from_words(words, offset_seconds=0)) == [
        "Take 2.5 milligrams of it.",
        "Then 0.5 more.",
    ]
    # Should the model split a number into glued pieces ("2." + "5"), it is still one number.
    glued = [
        TimedWord(0.0, 0.3, " Take"),
        TimedWord(0.3, 0.6, " 2."),
        TimedWord(0.6, 0.9, "5"),
        TimedWord(0.9, 1.2, " mg."),
    ]
    assert texts(sentences_from_words(glued, offset_seconds=0)) == ["Take 2.5 mg."]


def test_a_sentence_ending_in_a_number_ends():
    words = spoken("Your pressure is 150 over 95. That is high.")
    assert texts(sentences_from_words(words, offset_seconds=0)) == [
        "Your pressure is 150 over 95.",
        "That is high.",
    ]


@pytest.mark.parametrize(
    "sentence",
    [
        "I saw Dr. Smith today.",
        "Mr. Jones and Mrs. Jones came.",
        "Use a painkiller, e.g. Tylenol, twice.",
        "Ask Prof. Lee, i.e. The expert.",
        "Tylenol vs. Advil is fine.",
        "Take it at 8 a.m. and at night.",
        "Bring fruit, bread, etc. and water.",
    ],
)
def test_abbreviations_do_not_end_a_sentence(sentence):
    words = spoken(f"{sentence} Next one.")
    assert texts(sentences_from_words(words, offset_seconds=0)) == [sentence, "Next one."]


def test_an_ellipsis_does_not_end_a_sentence_without_a_pause():
    words = spoken("I was... Thinking about it.")
    assert texts(sentences_from_words(words, offset_seconds=0)) == ["I was... Thinking about it."]


def test_a_long_pause_ends_a_segment_without_punctuation():
    words = spoken("okay so | the pain started monday")
    segments = sentences_from_words(words, offset_seconds=0)
    assert texts(segments) == ["okay so", "the pain started monday"]
    assert segments[1]["start"] - segments[0]["end"] == pytest.approx(1.0)


def test_a_pause_must_be_longer_than_the_threshold():
    at_threshold = [
        TimedWord(0.0, 0.4, " so"),
        TimedWord(0.4 + PAUSE_SECONDS, 1.6, " then"),
        TimedWord(1.6 + PAUSE_SECONDS + 0.02, 3.2, " later"),
    ]
    assert texts(sentences_from_words(at_threshold, offset_seconds=0)) == ["so then", "later"]


def test_a_segment_longer_than_the_cap_is_split_at_its_longest_pause():
    # 60 words of 0.5 s without a stop: 30 s. Small pauses everywhere, a longer one after word 20.
    words: list[TimedWord] = []
    at = 0.0
    for i in range(60):
        words.append(TimedWord(round(at, 2), round(at + 0.4, 2), f" w{i}"))
        at += 0.5 if i != 19 else 0.7
    segments = sentences_from_words(words, offset_seconds=0)
    assert [len(s["text"].split()) for s in segments] == [20, 40]
    assert all(s["end"] - s["start"] <= MAX_SEGMENT_SECONDS for s in segments)


def test_continuous_speech_longer_than_the_cap_is_split_into_balanced_pieces():
    # 100 words back to back, 0.6 s each: 60 s with no pause at all.
    words = [TimedWord(round(i * 0.6, 2), round((i + 1) * 0.6, 2), f" w{i}") for i in range(100)]
    segments = sentences_from_words(words, offset_seconds=0)
    assert [len(s["text"].split()) for s in segments] == [25, 25, 25, 25]
    assert all(s["end"] - s["start"] <= MAX_SEGMENT_SECONDS for s in segments)
    assert " ".join(texts(segments)) == " ".join(f"w{i}" for i in range(100))


def test_a_single_word_longer_than_the_cap_is_kept_whole():
    words = [TimedWord(0.0, 30.0, " Hmmmmmmm.")]
    assert sentences_from_words(words, offset_seconds=0) == [
        {"start": 0.0, "end": 30.0, "text": "Hmmmmmmm."}
    ]


def test_no_words_no_segments_and_blank_words_are_dropped():
    assert sentences_from_words([], offset_seconds=5.0) == []
    assert sentences_from_words([TimedWord(0.0, 1.0, " ")], offset_seconds=0) == []
    words = [TimedWord(0.0, 0.3, " Yes."), TimedWord(0.3, 0.4, "  "), TimedWord(0.5, 0.8, " No.")]
    assert texts(sentences_from_words(words, offset_seconds=0)) == ["Yes.", "No."]


def test_overlapping_word_times_give_ordered_segments_that_do_not_overlap():
    words = [TimedWord(0.0, 1.04, " Yes."), TimedWord(1.0, 1.5, " Fine.")]
    segments = sentences_from_words(words, offset_seconds=0)
    assert [(s["start"], s["end"]) for s in segments] == [(0.0, 1.04), (1.04, 1.5)]


def test_spacing_is_the_models_own():
    words = [
        TimedWord(0.0, 0.2, " I"),
        TimedWord(0.2, 0.5, " don't"),
        TimedWord(0.5, 0.9, " know,"),
        TimedWord(0.9, 1.2, " doctor."),
    ]
    assert texts(sentences_from_words(words, offset_seconds=0)) == ["I don't know, doctor."]


# --- the real model on the sample visit ------------------------------------------------------

_STOP = re.compile(r"[.?!][\"')\]}]*$")


@pytest.fixture(scope="module")
def sample_pcm(tmp_path_factory) -> Path:
    """The sample decoded as the ingest stage decodes it (16 kHz mono s16le)."""
    path = tmp_path_factory.mktemp("pcm") / "audio.s16le"
    with path.open("wb") as dest:
        audio.recording_normalize(SAMPLE_VISIT, dest, max_seconds=3600)
    return path


def test_the_sample_is_cut_into_sentences(sample_pcm):
    pcm = audio.pcm_load(sample_pcm)
    segments = transcribe_samples(pcm, offset_seconds=0.0)
    assert len(segments) >= 10

    # Ordered, non-overlapping, within the recording, none empty.
    duration = len(pcm) / audio.SAMPLE_RATE
    for segment, after in itertools.pairwise(segments):
        assert segment["end"] <= after["start"]
    for segment in segments:
        assert 0 <= segment["start"] <= segment["end"] <= duration + 0.05
        assert segment["text"] and segment["text"] == segment["text"].strip()

    # Each ends at a sentence end or before a pause (or at the end of the recording) ...
    gaps_after = [b["start"] - a["end"] for a, b in itertools.pairwise(segments)] + [float("inf")]
    for segment, gap in zip(segments, gaps_after, strict=True):
        assert _STOP.search(segment["text"]) or gap > PAUSE_SECONDS, segment
    # ... and none holds two sentences (the sample has no abbreviations).
    for segment in segments:
        assert len(re.split(r"(?<=[.?!])\s+(?=[A-Z0-9])", segment["text"])) == 1, segment

    # The same words as faster-whisper's own segments, only regrouped.
    raw, _info = whisper_model().transcribe(pcm.astype("float32") / 32768.0, **transcribe_options())
    raw_text = " ".join(segment.text for segment in raw)
    assert " ".join(texts(segments)).split() == raw_text.split()
    assert "What brings you in today?" in texts(segments)


def test_attempts_on_threads_of_one_process_split_the_cores_and_get_a_model_worker_each(
    settings, monkeypatch
):
    """A Temporal worker runs its activities on threads around one Whisper model: each gets
    its share of the cores, and the model a worker per attempt, so chunks run side by side."""
    settings.WHISPER_CPU_THREADS = 0
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    alone = transcription.cpu_threads()

    assert transcription.cpu_threads(beside=4) == 2
    transcription.whisper_model.cache_clear()
    try:
        model = transcription.whisper_model(beside=4)
        assert model.model.num_workers == 4
    finally:
        transcription.whisper_model.cache_clear()
    assert alone in (0, 8)  # a command's default, or a django-q2 worker's share


# --- cutting a recording that is still growing --------------------------------------------------


@pytest.mark.parametrize("step_seconds", [0.7, 3.0, 11.0])
def test_a_growing_recording_is_cut_where_the_whole_of_it_is_cut(sample_pcm, step_seconds):
    """The live cutter, fed the sample a few seconds at a time, cuts exactly where the cutter of
    the whole file does, and never moves a cut it has made (a cut is part of a checkpoint's
    key)."""
    pcm = audio.pcm_load(sample_pcm)
    whole = transcription.chunk_bounds(pcm, 8.0)
    cutter = transcription.ChunkCutter(8.0)
    step = int(step_seconds * audio.SAMPLE_RATE)
    seen: list[tuple[int, int]] = []
    for end in range(step, len(pcm), step):
        bounds = list(cutter.cut(pcm[:end], final=False))
        assert bounds[: len(seen)] == seen
        assert all(stop <= end for _, stop in bounds)
        seen = bounds

    assert cutter.cut(pcm, final=True) == whole
    assert len(whole) > 3 and seen != whole
