"""Speech to text with faster-whisper, in chunks that a crashed attempt need not redo, cut into
sentence segments that a citation can play."""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol, TypedDict

import numpy as np
from django.conf import settings
from faster_whisper import WhisperModel

from pipeline import artifact_path
from visits.schemas import TranscribeOutput, Transcript
from visits.speech.audio import SAMPLE_RATE
from visits.speech.whisper_models import model_choice

logger = logging.getLogger(__name__)

# Chunks are cut at the quietest 100 ms within this many seconds of the nominal boundary, so a
# word is rarely split between two chunks.
_CUT_SEARCH_SECONDS = 3.0
_FRAME = SAMPLE_RATE // 10

# How a chunk's words become segments (sentences and pauses, `sentences_from_words`). Part of
# each chunk checkpoint's key: change it when the rule changes.
SEGMENTS_VERSION = "s1"


@lru_cache(maxsize=1)
def whisper_model(beside: int = 1) -> WhisperModel:
    """Loaded on first use, once per process: workers fork, so never at import time.
    `beside` is how many attempts this process runs side by side (`ctx.attempts_per_process`)."""
    choice = model_choice()
    logger.info("loading Whisper model %s", choice.name)
    return WhisperModel(
        choice.path,
        device=settings.WHISPER_DEVICE,
        compute_type=settings.WHISPER_COMPUTE_TYPE,
        cpu_threads=cpu_threads(beside),
        # Attempts on threads of one process (a Temporal worker) share this model: without a
        # model worker each, their chunks would wait for one another.
        num_workers=beside,
    )


def cpu_threads(beside: int = 1) -> int:
    """The cores one model may use: WHISPER_CPU_THREADS, else this process's share."""
    if settings.WHISPER_CPU_THREADS:
        return settings.WHISPER_CPU_THREADS
    if beside > 1:  # attempts on threads of this process share the cores
        return max(1, (os.cpu_count() or 1) // beside)
    if multiprocessing.parent_process() is None:
        return 0  # a command or a web process: the library's default
    workers = max(1, int(settings.Q_CLUSTER.get("workers", 1)))
    return max(1, (os.cpu_count() or 1) // workers)


def transcribe_options() -> dict[str, object]:
    """The decoding settings, shared with the benchmark so that both measure the same work."""
    return {
        "beam_size": settings.WHISPER_BEAM_SIZE,
        "language": "en",
        "vad_filter": True,
        # Segments are regrouped into sentences from word times (`sentences_from_words`). This
        # also changes decoding a little: faster-whisper then resumes each 30 s window after
        # the last aligned word rather than at the model's last timestamp.
        "word_timestamps": True,
    }


def chunk_bounds(pcm: np.ndarray, chunk_seconds: float) -> list[tuple[int, int]]:
    """Sample ranges covering `pcm`, each about `chunk_seconds` long, cut at quiet moments."""
    return ChunkCutter(chunk_seconds).cut(pcm, final=True)


class ChunkCutter:
    """Cuts a recording that is still growing into the chunks `chunk_bounds` would cut from the
    whole of it: each cut as soon as the audio it looks at has arrived, never moved afterwards
    (a chunk's bounds are part of its checkpoint's key)."""

    def __init__(self, chunk_seconds: float) -> None:
        self.nominal = int(chunk_seconds * SAMPLE_RATE)
        self.bounds: list[tuple[int, int]] = []
        self._start = 0
        self._closed = False

    def cut(self, pcm: np.ndarray, *, final: bool) -> list[tuple[int, int]]:
        """Every chunk so far of the recording whose first `len(pcm)` samples are `pcm`; with
        `final`, the recording is whole and the rest of it is the last chunk."""
        total = int(pcm.shape[0])
        # A cut is decided within reach of its nominal point: the whole search window must be
        # here before it is made; a recording that may still grow keeps its last chunk open.
        reach = int(_CUT_SEARCH_SECONDS * SAMPLE_RATE)
        margin = self.nominal * 1.25 if final else max(self.nominal * 1.25, self.nominal + reach)
        while not self._closed and total - self._start > margin:
            end = _quietest_cut(pcm, self._start + self.nominal)
            self.bounds.append((self._start, end))
            self._start = end
        if final and not self._closed:
            if total > self._start:
                self.bounds.append((self._start, total))
            self._closed = True
        return self.bounds


def _quietest_cut(pcm: np.ndarray, around: int) -> int:
    reach = int(_CUT_SEARCH_SECONDS * SAMPLE_RATE)
    lo, hi = around - reach, around + reach
    window = np.asarray(pcm[lo:hi], dtype=np.float32)
    frames = window[: len(window) // _FRAME * _FRAME].reshape(-1, _FRAME)
    if not len(frames):
        return around
    energy = np.square(frames).mean(axis=1)
    return lo + int(np.argmin(energy)) * _FRAME + _FRAME // 2


class RawSegment(TypedDict):
    """A transcribed segment before it is numbered; chunk checkpoints store lists of these."""

    start: float
    end: float
    text: str


@dataclass(frozen=True)
class TimedWord:
    """One word as faster-whisper gives it: its text keeps its leading space."""

    start: float
    end: float
    word: str


class WordLike(Protocol):
    """What `sentences_from_words` reads of a word (`TimedWord`, or faster-whisper's `Word`)."""

    @property
    def start(self) -> float: ...
    @property
    def end(self) -> float: ...
    @property
    def word(self) -> str: ...


def transcribe_samples(
    pcm: np.ndarray, *, offset_seconds: float, prompt: str = "", beside: int = 1
) -> list[RawSegment]:
    """Transcribe one chunk into sentence segments; times are relative to the whole recording.
    `prompt` names words to expect (`visits.speech.vocabulary`); `beside` as `whisper_model`'s."""
    words = transcribe_words(pcm, prompt=prompt, beside=beside)
    return sentences_from_words(words, offset_seconds=offset_seconds)


def transcribe_words(pcm: np.ndarray, *, prompt: str = "", beside: int = 1) -> list[TimedWord]:
    """The words of one chunk with their times (seconds from the chunk's start), in order."""
    audio = np.asarray(pcm, dtype=np.float32) / 32768.0
    segments, _info = whisper_model(beside).transcribe(
        audio, **transcribe_options(), initial_prompt=prompt or None
    )
    words: list[TimedWord] = []
    for segment in segments:
        for index, word in enumerate(segment.words or ()):
            text = word.word
            # Whisper's own segments were stripped and joined with a space; keep that space
            # where one of them starts, so two of its segments never glue into one word.
            if index == 0 and not text[:1].isspace():
                text = " " + text
            words.append(TimedWord(start=float(word.start), end=float(word.end), word=text))
    return words


# --- sentences from words ------------------------------------------------------------------
#
# Whisper's own segments are decoding windows of a few seconds that start and end mid-sentence;
# a clinician who clicks a citation should hear the whole statement, and only it.

# A silence this long between two words ends a segment even without punctuation: speakers
# pause between turns and thoughts, and tiny models often drop the full stop.
PAUSE_SECONDS = 0.8
# No segment is longer than this (a citation should play one statement, not a minute of
# monologue); a longer one is split at its longest pause.
MAX_SEGMENT_SECONDS = 25.0

_SENTENCE_END = ".?!"
# Closing marks faster-whisper attaches to the word before them (`append_punctuations`), and
# opening marks it attaches to the word after them (`prepend_punctuations`).
_CLOSING = "\"'\u201d\u2019)]}"
_OPENING = "\"'\u201c\u2018¿([{-"
# Words ending in a period that are usually followed by a capitalized name or word, so the
# period is not a full stop ("Dr. Smith", "e.g. Tylenol", "Tylenol vs. Advil"). Abbreviations
# followed by a lowercase word ("8 a.m. and", "etc. and") are caught by the lowercase rule.
_ABBREVIATIONS = frozenset(
    {
        "dr.", "mr.", "mrs.", "ms.", "mx.", "prof.", "st.", "rev.", "hon.",
        "e.g.", "i.e.", "vs.", "cf.", "approx.",
    }
)  # fmt: skip


def sentences_from_words(words: Sequence[WordLike], *, offset_seconds: float) -> list[RawSegment]:
    """Group timed words into segments that follow sentences and pauses.

    A segment ends after a word that ends a sentence (see `_ends_sentence`), or before a
    silence longer than `PAUSE_SECONDS`; one longer than `MAX_SEGMENT_SECONDS` is split at its
    longest pause. Times are `offset_seconds` + the word times, rounded to 10 ms; segments are
    in order and never overlap. Text is the words joined as the model spelled them.
    """
    spoken = [word for word in words if word.word.strip()]
    groups: list[list[WordLike]] = []
    current: list[WordLike] = []
    for index, word in enumerate(spoken):
        current.append(word)
        following = spoken[index + 1] if index + 1 < len(spoken) else None
        if (
            following is None
            or _ends_sentence(word, following)
            or _pause(word, following) > PAUSE_SECONDS
        ):
            groups.append(current)
            current = []
    segments: list[RawSegment] = []
    for group in groups:
        for piece in _capped(group):
            start = round(offset_seconds + float(piece[0].start), 2)
            end = round(offset_seconds + float(piece[-1].end), 2)
            if segments:
                # faster-whisper's boundary fixes can make a word start a few hundredths before
                # the previous one ended; a citation must not replay the sentence before.
                start = max(start, segments[-1]["end"])
            text = "".join(word.word for word in piece).strip()
            segments.append({"start": start, "end": max(end, start), "text": text})
    return segments


def _pause(word: WordLike, following: WordLike) -> float:
    # Word times come in 20 ms steps; rounding keeps "0.8 s after" from being 0.8000000001.
    return round(float(following.start) - float(word.end), 2)


def _ends_sentence(word: WordLike, following: WordLike) -> bool:
    """Whether `word` ends a sentence, judged with the word after it."""
    if not following.word[:1].isspace():
        # The next word is glued to this one ("2." + "5"): a decimal or an abbreviation split
        # into tokens, not a sentence end.
        return False
    core = word.word.strip().rstrip(_CLOSING)
    if not core or core[-1] not in _SENTENCE_END:
        # "2.5", "day,", "milligrams" (a decimal point inside a word ends nothing).
        return False
    if core[-1] in "?!":
        return True
    if core.endswith(".."):
        # An ellipsis is a voice trailing off mid-thought; if the speaker stopped, the pause
        # rule ends the segment.
        return False
    if core.lstrip(_OPENING).lower() in _ABBREVIATIONS:
        return False
    # A full stop is followed by a capital (or a number); a period before a lowercase word is
    # an abbreviation we do not list ("a.m. and", "approx. two", "etc. and").
    first = following.word.strip().lstrip(_OPENING)[:1]
    return not first.islower()


def _capped(group: list[WordLike]) -> list[list[WordLike]]:
    """`group`, split at its longest pauses until no piece is longer than the cap."""
    duration = float(group[-1].end) - float(group[0].start)
    if duration <= MAX_SEGMENT_SECONDS or len(group) < 2:
        return [group]
    middle = (float(group[0].start) + float(group[-1].end)) / 2
    # The longest pause; among equal ones (continuous speech has none) the one nearest the
    # middle, so that the pieces come out balanced rather than one word at a time.
    cut = max(
        range(1, len(group)),
        key=lambda i: (_pause(group[i - 1], group[i]), -abs(float(group[i].start) - middle)),
    )
    return _capped(group[:cut]) + _capped(group[cut:])


def transcript_load(transcribed: TranscribeOutput) -> Transcript:
    """The transcript file a transcribe stage wrote (OSError if storage lost it)."""
    return Transcript.model_validate_json(artifact_path(transcribed.transcript).read_text())
