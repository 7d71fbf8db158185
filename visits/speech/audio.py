"""Decoding any common recording into the one format the rest of the pipeline reads:
16 kHz mono signed 16-bit PCM, streamed frame by frame so that a long recording never sits
whole in memory."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import IO, Any

import av
import numpy as np

from visits.errors import SUPPORTED_FORMATS, EmptyRecording, RecordingTooLong, UnreadableRecording
from visits.speech.pieces import PieceReader

SAMPLE_RATE = 16_000
# A file that decodes to less than this share of the length its header declares was cut short.
_TRUNCATION_TOLERANCE = 0.9

# An upload is untrusted: FFmpeg must read it with a demuxer for one of the formats we accept
# (the names FFmpeg gives them), never guess another. Playlists (hls), concat scripts, DASH
# manifests and image sequences open further files or URLs, so a crafted upload could read
# another visit's recording or make the server fetch from the network. None of the accepted
# demuxers follows references; mov's external data references (drefs) stay off, FFmpeg's default.
ACCEPTED_DEMUXERS = (
    "wav",
    "mp3",
    "mov,mp4,m4a,3gp,3g2,mj2",  # .m4a, .mp4
    "aac",  # raw ADTS .aac
    "ogg",  # .ogg, .oga, .opus
    "flac",
    "matroska,webm",  # .webm
)
# A recording made in the browser streams in one of these (MediaRecorder's containers that need
# no seeking to read), named as the recorder names them, with the demuxer that reads them.
STREAM_DEMUXERS = {"webm": "webm", "ogg": "ogg"}
# Only the upload itself, a local file: no network or other protocol, whatever a demuxer asks.
_OPEN_OPTIONS = {
    "format_whitelist": ",".join(ACCEPTED_DEMUXERS),
    "protocol_whitelist": "file",
}
# A visit recording has one audio track, perhaps a video or cover image and a few tracks more;
# every extra stream is demuxed and buffered, so a file with hundreds costs memory for nothing.
MAX_STREAMS = 8
# Everything is mixed down to mono 16 kHz: more channels or a higher rate than any recorder
# makes (7.1 surround, 192 kHz studio audio) adds no information, only decoding and resampling
# work per second of audio that the length limit does not see.
MAX_CHANNELS = 8
MAX_SAMPLE_RATE_HZ = 192_000
# The stage's lease is renewed in the background; asking this often whether the attempt still
# owns the stage stops a long decode soon after a lost lease or a passed deadline, without a
# database write per frame.
HEARTBEAT_INTERVAL_SECONDS = 2.0


@dataclass(frozen=True)
class DecodedRecording:
    duration_seconds: float
    source_format: str
    declared_seconds: float | None


def recording_normalize(
    source: Path,
    dest: IO[bytes],
    *,
    max_seconds: float,
    heartbeat: Callable[[], None] | None = None,
    stream_format: str | None = None,
) -> DecodedRecording:
    """Decode `source` into `dest` as 16 kHz mono s16le; raise a permanent error for any file
    that is not a whole, playable, non-empty recording within the limits. `heartbeat` is called
    at most every `HEARTBEAT_INTERVAL_SECONDS` while decoding; what it raises stops the decode.

    With `stream_format` (a key of `STREAM_DEMUXERS`), `source` is the folder of a recording
    arriving as pieces (`visits.speech.pieces`), decoded as they come until it is sealed."""
    try:
        if stream_format is not None:
            container = av.open(
                PieceReader(source),
                mode="r",
                format=STREAM_DEMUXERS[stream_format],
                container_options=_OPEN_OPTIONS,
            )
        else:
            if source.stat().st_size == 0:
                raise EmptyRecording(
                    "The file is empty (0 bytes). Check the recorder and upload again."
                )
            container = av.open(str(source), mode="r", container_options=_OPEN_OPTIONS)
    except av.ArgumentError as exc:
        # FFmpeg's answer when the file is of a kind outside the allow-lists.
        raise UnreadableRecording(
            "The file could not be read as audio: it is not a recording in an accepted format "
            "(playlists and files that refer to other files are refused). "
            f"Upload a {SUPPORTED_FORMATS} recording."
        ) from exc
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
        if len(container.streams) > MAX_STREAMS:
            raise UnreadableRecording(
                f"The file holds {len(container.streams)} tracks; a recording may have at most "
                f"{MAX_STREAMS}. Export it with a single audio track and upload again."
            )
        stream = container.streams.audio[0]
        _check_channels_and_rate(stream.channels, stream.sample_rate)
        declared = _declared_seconds(container, stream)
        if declared is not None and declared > max_seconds:
            raise RecordingTooLong(_too_long_message(declared, max_seconds))
        max_samples = int(max_seconds * SAMPLE_RATE)
        resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
        samples = 0
        next_beat = time.monotonic() + HEARTBEAT_INTERVAL_SECONDS
        try:
            for frame in container.decode(stream):
                if heartbeat is not None and time.monotonic() >= next_beat:
                    heartbeat()
                    next_beat = time.monotonic() + HEARTBEAT_INTERVAL_SECONDS
                # The header may understate what the frames hold.
                _check_channels_and_rate(frame.layout.nb_channels, frame.sample_rate)
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


# The errors a decode may end in, by name: what a child process sends back is re-raised as is.
_DECODE_ERRORS: dict[str, type[UnreadableRecording | EmptyRecording | RecordingTooLong]] = {
    error.__name__: error for error in (EmptyRecording, RecordingTooLong, UnreadableRecording)
}


def recording_normalize_isolated(
    source: Path,
    dest: Path,
    *,
    max_seconds: float,
    memory_bytes: int,
    cpu_seconds: int,
    heartbeat: Callable[[], None] | None = None,
) -> DecodedRecording:
    """`recording_normalize` in a child process limited to `memory_bytes` of address space and
    `cpu_seconds` of CPU, writing to the file `dest`: a decoder bug or a crafted file can then
    exhaust only the child, never the worker. The worker heartbeats while it waits, and what
    `heartbeat` raises (a lost lease, a passed deadline) stops the child at once."""
    with DecodeChild(
        source, dest, max_seconds=max_seconds, memory_bytes=memory_bytes, cpu_seconds=cpu_seconds
    ) as child:
        while (decoded := child.poll(wait_seconds=HEARTBEAT_INTERVAL_SECONDS)) is None:
            if heartbeat is not None:
                heartbeat()
        return decoded


class DecodeChild:
    """`recording_normalize` running in a child process with limits (see
    `recording_normalize_isolated`), watched without blocking: `poll` says whether it is done.
    Leaving the `with` block stops a child still running.

    The child is a fresh interpreter running this module (not a fork of a worker that holds
    threads and connections, nor multiprocessing's spawn, which re-imports the caller's main).
    For a recording arriving as pieces (`stream_format`), it writes PCM as it decodes, so the
    parent may read the samples already in `dest` while the recording goes on."""

    def __init__(
        self,
        source: Path,
        dest: Path,
        *,
        max_seconds: float,
        memory_bytes: int,
        cpu_seconds: int,
        stream_format: str | None = None,
    ) -> None:
        self._limits = (memory_bytes, cpu_seconds)
        args = [str(source), str(dest), str(max_seconds), str(memory_bytes), str(cpu_seconds)]
        self._child = subprocess.Popen(
            [sys.executable, "-m", __name__, *args, stream_format or ""],
            cwd=Path(__file__).resolve().parents[2],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )

    def __enter__(self) -> DecodeChild:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._child.poll() is None:
            self._child.kill()
            self._child.communicate()

    def poll(self, wait_seconds: float = 0) -> DecodedRecording | None:
        """The decoded recording once the child is done (None while it runs, after waiting up
        to `wait_seconds`); the child's error, raised as is, if it failed."""
        try:
            # Never a zero wait: `communicate` would time out before reading anything.
            out, _ = self._child.communicate(timeout=max(0.05, wait_seconds))
        except subprocess.TimeoutExpired:
            return None
        try:
            kind, payload = json.loads(out)
        except ValueError:  # no answer: the child was stopped by a limit, or crashed
            memory_bytes, cpu_seconds = self._limits
            raise UnreadableRecording(
                "The recording could not be decoded within the limits a recording is given "
                f"({memory_bytes // 2**20} MB of memory, {cpu_seconds} s of CPU): it may be "
                f"damaged or crafted. Export it again as a {SUPPORTED_FORMATS} file and upload "
                "it."
            ) from None
        if kind == "ok":
            return DecodedRecording(**payload)
        raise _DECODE_ERRORS[kind](payload)


def _decode_child(argv: list[str]) -> None:
    """The child's side: set the limits, decode, print the result or the error's words."""
    source, dest, max_seconds, memory_bytes, cpu_seconds, stream_format = argv
    resource.setrlimit(resource.RLIMIT_AS, (int(memory_bytes), int(memory_bytes)))
    resource.setrlimit(resource.RLIMIT_CPU, (int(cpu_seconds), int(cpu_seconds) + 5))
    try:
        # Unbuffered while streaming: the parent cuts chunks from what is already written.
        with open(dest, "wb", buffering=0 if stream_format else -1) as out:
            decoded = recording_normalize(
                Path(source),
                out,
                max_seconds=float(max_seconds),
                stream_format=stream_format or None,
            )
        answer: list[Any] = ["ok", asdict(decoded)]
    except (EmptyRecording, RecordingTooLong, UnreadableRecording) as exc:
        # FFmpeg out of memory is the limit speaking, not the file: the parent says so.
        if isinstance(exc.__cause__, MemoryError):
            return
        answer = [type(exc).__name__, str(exc)]
    except MemoryError:
        return  # said by the parent, which sees no answer
    sys.stdout.write(json.dumps(answer))


def _check_channels_and_rate(channels: int, sample_rate: int) -> None:
    if channels > MAX_CHANNELS:
        raise UnreadableRecording(
            f"The recording has {channels} audio channels; the limit is {MAX_CHANNELS}. "
            "Export it as mono or stereo and upload again."
        )
    if sample_rate > MAX_SAMPLE_RATE_HZ:
        raise UnreadableRecording(
            f"The recording's sample rate is {sample_rate:,} Hz; the limit is "
            f"{MAX_SAMPLE_RATE_HZ:,} Hz. Export it at 48,000 Hz and upload again."
        )


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
    """Map normalized PCM without reading it into memory (the whole samples written so far, if
    a decoder is still writing it)."""
    samples = path.stat().st_size // 2
    if samples == 0:
        return np.zeros(0, dtype=np.int16)
    return np.memmap(path, dtype=np.int16, mode="r", shape=(samples,))


if __name__ == "__main__":
    _decode_child(sys.argv[1:])
