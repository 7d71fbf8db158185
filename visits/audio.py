"""Decoding any common recording into the one format the rest of the pipeline reads:
16 kHz mono signed 16-bit PCM, streamed frame by frame so that a long recording never sits
whole in memory."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import IO

import av
import numpy as np

from visits.errors import SUPPORTED_FORMATS, EmptyRecording, RecordingTooLong, UnreadableRecording

SAMPLE_RATE = 16_000
# A file that decodes to less than this share of the length its header declares was cut short.
_TRUNCATION_TOLERANCE = 0.9


@dataclass(frozen=True)
class DecodedRecording:
    duration_seconds: float
    source_format: str
    declared_seconds: float | None


def recording_normalize(source: Path, dest: IO[bytes], *, max_seconds: float) -> DecodedRecording:
    """Decode `source` into `dest` as 16 kHz mono s16le; raise a permanent error for any file
    that is not a whole, playable, non-empty recording within the length limit."""
    if source.stat().st_size == 0:
        raise EmptyRecording("The file is empty (0 bytes). Check the recorder and upload again.")
    try:
        container = av.open(str(source), mode="r")
    except (av.FFmpegError, UnicodeDecodeError, ValueError) as exc:
        raise UnreadableRecording(
            "The file could not be read as audio "
            f"({_reason(exc)}). Upload a {SUPPORTED_FORMATS} recording."
        ) from exc
    with container:
        if not container.streams.audio:
            raise UnreadableRecording(
                f"The file has no audio track. Upload a {SUPPORTED_FORMATS} recording."
            )
        stream = container.streams.audio[0]
        declared = _declared_seconds(container, stream)
        if declared is not None and declared > max_seconds:
            raise RecordingTooLong(_too_long_message(declared, max_seconds))
        max_samples = int(max_seconds * SAMPLE_RATE)
        resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
        samples = 0
        try:
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    samples += _write(out, dest)
                if samples > max_samples:
                    raise RecordingTooLong(_too_long_message(samples / SAMPLE_RATE, max_seconds))
            for out in resampler.resample(None):
                samples += _write(out, dest)
        except av.FFmpegError as exc:
            raise UnreadableRecording(
                f"The recording is damaged after {samples / SAMPLE_RATE:.1f} s of audio "
                f"({_reason(exc)}). Upload the complete file again."
            ) from exc
        fmt = container.format.name
    duration = samples / SAMPLE_RATE
    if samples == 0:
        raise EmptyRecording(
            "The recording contains no audio. Check the recorder and upload again."
        )
    if declared is not None and declared > 2 and duration < declared * _TRUNCATION_TOLERANCE:
        raise UnreadableRecording(
            f"The recording is cut short: its header promises {declared:.1f} s but only "
            f"{duration:.1f} s could be decoded. Upload the complete file again."
        )
    return DecodedRecording(duration_seconds=duration, source_format=fmt, declared_seconds=declared)


def _write(frame: av.AudioFrame, dest: IO[bytes]) -> int:
    pcm = frame.to_ndarray().astype(np.int16, copy=False).reshape(-1)
    dest.write(pcm.tobytes())
    return int(pcm.shape[0])


def _declared_seconds(
    container: av.container.InputContainer, stream: av.AudioStream
) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return None


def _too_long_message(seconds: float, max_seconds: float) -> str:
    # str(timedelta) reads as h:mm:ss.
    length, limit = (timedelta(seconds=round(value)) for value in (seconds, max_seconds))
    return (
        f"The recording is {length} long; the limit is {limit}. Split it into shorter recordings."
    )


def _reason(exc: BaseException) -> str:
    """The decoder's own words where it has them; never a Python class name for a clinician."""
    if isinstance(exc, av.FFmpegError) and exc.strerror:
        return exc.strerror.lower()
    return "not a recognizable audio file"


def pcm_load(path: Path) -> np.ndarray:
    """Map normalized PCM without reading it into memory."""
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=np.int16)
    return np.memmap(path, dtype=np.int16, mode="r")
