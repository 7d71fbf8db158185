"""Uploads are untrusted (issue 11 §3): a crafted file must not make FFmpeg read anything but
itself (another visit's recording, a local file, a URL), nor make it decode more than any
recorder produces. Whatever is refused fails permanently with a message that says what is
accepted, never a server path or a Python name; every accepted format still decodes; and a long
decode answers to the stage's heartbeat.

Playlists are named .m3u8/.mpd here: FFmpeg detects them only under such names, which the upload
form refuses; `recording_normalize` must refuse them whatever the caller checked before."""

from __future__ import annotations

import functools
import io
import shutil
import subprocess
import threading
import time
import wave
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest

from pipeline.core.context import StageContext
from pipeline.core.errors import LeaseLost
from tests.conftest import SAMPLE_VISIT, SHORT_VISIT
from tests.visits.test_ingest import (
    RATE,
    assert_failed_permanently_at,
    assert_nothing_half_written,
    encode,
    process,
    stage_doc,
    tone,
    wav,
)
from visits.errors import UnreadableRecording
from visits.services import visit_create
from visits.speech import audio

REFUSED = "not a recording in an accepted format"


def normalize(source: Path, *, heartbeat: Any = None) -> tuple[audio.DecodedRecording, bytes]:
    dest = io.BytesIO()
    decoded = audio.recording_normalize(source, dest, max_seconds=3600, heartbeat=heartbeat)
    return decoded, dest.getvalue()


def assert_refused(source: Path, *words: str) -> str:
    """Refused as unreadable, with nothing decoded, in words a clinician can read."""
    dest = io.BytesIO()
    with pytest.raises(UnreadableRecording) as refused:
        audio.recording_normalize(source, dest, max_seconds=3600)
    message = str(refused.value)
    for word in words:
        assert word in message, message
    assert dest.getvalue() == b""
    assert str(source.parent) not in message
    assert "Error" not in message
    return message


@pytest.fixture
def other_recording(tmp_path: Path) -> Path:
    """Another clinician's recording, in the same folder as the upload."""
    return Path(shutil.copy(SHORT_VISIT, tmp_path / "other.mp3"))


# --- files that point at other files ---------------------------------------------------------


def test_concat_script_named_mp3_does_not_read_the_recording_next_to_it(tmp_path, other_recording):
    evil = tmp_path / "evil.mp3"
    evil.write_text(f"ffconcat version 1.0\nfile {other_recording.name}\n")

    message = assert_refused(evil, REFUSED)

    assert "WAV, MP3" in message


def hls(path: Path, segment: str) -> Path:
    # It promises less than the other recording holds, so that reading it looks whole, not cut.
    path.write_text(
        "#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXT-X-MEDIA-SEQUENCE:0\n"
        f"#EXTINF:10,\n{segment}\n#EXT-X-ENDLIST\n"
    )
    return path


def test_hls_playlist_of_a_local_segment_is_refused(tmp_path, other_recording):
    assert_refused(hls(tmp_path / "evil.m3u8", other_recording.name), REFUSED)


def test_hls_playlist_with_a_file_url_is_refused(tmp_path, other_recording):
    assert_refused(hls(tmp_path / "evil.m3u8", f"file:{other_recording}"), REFUSED)


@pytest.fixture
def web_server(other_recording: Path) -> Iterator[tuple[str, list[str]]]:
    """A loopback HTTP server offering the other recording; the list collects what was asked."""
    requested: list[str] = []

    class Handler(SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            requested.append(self.path)

    handler = functools.partial(Handler, directory=str(other_recording.parent))
    with ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        yield f"http://127.0.0.1:{server.server_address[1]}", requested
        server.shutdown()
        thread.join()


def test_hls_playlist_with_an_http_url_is_refused_without_a_request(tmp_path, web_server):
    base_url, requested = web_server

    assert_refused(hls(tmp_path / "evil.m3u8", f"{base_url}/other.mp3"))

    assert requested == []


def test_dash_manifest_is_refused(tmp_path, other_recording):
    manifest = tmp_path / "evil.mpd"
    manifest.write_text(
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<MPD xmlns="urn:mpeg:dash:schema:mpd:2011" type="static" '
        'mediaPresentationDuration="PT12S" minBufferTime="PT1S" '
        'profiles="urn:mpeg:dash:profile:isoff-on-demand:2011"><Period>'
        '<AdaptationSet mimeType="audio/mpeg"><Representation id="a" bandwidth="64000">'
        f"<BaseURL>{other_recording.name}</BaseURL>"
        "</Representation></AdaptationSet></Period></MPD>\n"
    )

    assert_refused(manifest)


def test_image_named_mp3_is_refused_as_not_an_accepted_format(tmp_path):
    image = tmp_path / "visit.mp3"
    with av.open(str(image), mode="w", format="image2pipe") as container:
        stream = container.add_stream("png")
        stream.width, stream.height, stream.pix_fmt = 16, 16, "rgb24"
        frame = av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), dtype=np.uint8), format="rgb24")
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))

    assert_refused(image, REFUSED)


# --- more than any recorder makes ------------------------------------------------------------


def pcm_wav(path: Path, *, channels: int, rate: int, seconds: float = 0.5) -> Path:
    """A WAV written by hand, so the header holds whatever channel count and rate we ask."""
    samples = np.tile(tone(seconds, rate=rate).reshape(-1, 1), (1, channels))
    with wave.open(str(path), "wb") as out:
        out.setnchannels(channels)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(samples.tobytes())
    return path


def test_more_channels_than_the_limit_are_refused(tmp_path):
    source = pcm_wav(tmp_path / "visit.wav", channels=16, rate=RATE)

    assert_refused(source, "16 audio channels", f"limit is {audio.MAX_CHANNELS}")


def test_sample_rate_above_the_limit_is_refused(tmp_path):
    source = pcm_wav(tmp_path / "visit.wav", channels=1, rate=384_000)

    assert_refused(source, "384,000 Hz", "192,000 Hz")


def test_channels_and_rate_at_the_limits_still_decode(tmp_path):
    source = pcm_wav(
        tmp_path / "visit.wav", channels=audio.MAX_CHANNELS, rate=audio.MAX_SAMPLE_RATE_HZ
    )

    decoded, pcm = normalize(source)

    assert decoded.duration_seconds == pytest.approx(0.5, abs=0.01)
    assert len(pcm) == round(decoded.duration_seconds * RATE) * 2


def test_more_streams_than_the_limit_are_refused(tmp_path):
    source = tmp_path / "visit.webm"
    with av.open(str(source), mode="w", format="matroska") as container:
        streams = [
            container.add_stream("pcm_s16le", rate=RATE, layout="mono")
            for _ in range(audio.MAX_STREAMS + 1)
        ]
        for stream in streams:
            frame = av.AudioFrame.from_ndarray(
                tone(0.5).reshape(1, -1), format="s16", layout="mono"
            )
            frame.sample_rate, frame.pts = RATE, 0
            container.mux(stream.encode(frame))
            container.mux(stream.encode(None))

    assert_refused(source, f"{audio.MAX_STREAMS + 1} tracks", f"at most {audio.MAX_STREAMS}")


# --- every accepted format still decodes -----------------------------------------------------

ACCEPTED = [
    pytest.param("wav", "wav", "pcm_s16le", None, "wav", id="wav"),
    pytest.param("mp3", "mp3", "libmp3lame", None, "mp3", id="mp3"),
    pytest.param("m4a", "ipod", "aac", None, "mov,mp4,m4a,3gp,3g2,mj2", id="m4a-aac"),
    pytest.param("mp4", "mp4", "aac", None, "mov,mp4,m4a,3gp,3g2,mj2", id="mp4-aac"),
    pytest.param("aac", "adts", "aac", None, "aac", id="raw-aac"),
    pytest.param("ogg", "ogg", "libopus", 48_000, "ogg", id="ogg-opus"),
    pytest.param("oga", "ogg", "flac", None, "ogg", id="oga-flac"),
    pytest.param("opus", "ogg", "libopus", 48_000, "ogg", id="opus"),
    pytest.param("flac", "flac", "flac", None, "flac", id="flac"),
    pytest.param("webm", "webm", "libopus", 48_000, "matroska,webm", id="webm-opus"),
]


@pytest.mark.parametrize(("extension", "container", "codec", "codec_rate", "demuxer"), ACCEPTED)
def test_every_accepted_format_decodes(tmp_path, extension, container, codec, codec_rate, demuxer):
    source = encode(
        tmp_path / f"visit.{extension}",
        tone(2.0),
        container_format=container,
        codec=codec,
        codec_rate=codec_rate,
    )

    decoded, pcm = normalize(source)

    assert decoded.source_format == demuxer
    # Raw AAC has no edit list to trim the encoder's priming samples.
    assert decoded.duration_seconds == pytest.approx(2.0, abs=0.15)
    assert len(pcm) == round(decoded.duration_seconds * RATE) * 2


@pytest.mark.parametrize("fixture", [SAMPLE_VISIT, SHORT_VISIT], ids=lambda path: path.name)
def test_real_recordings_decode(fixture):
    decoded, _pcm = normalize(fixture)

    assert decoded.source_format in audio.ACCEPTED_DEMUXERS
    assert decoded.duration_seconds > 10


def test_the_allow_list_names_real_demuxers_each_one_tested():
    assert set(audio.ACCEPTED_DEMUXERS) <= av.formats_available
    assert {case.values[-1] for case in ACCEPTED} == set(audio.ACCEPTED_DEMUXERS)


# --- the heartbeat ---------------------------------------------------------------------------


class SlowDest(io.BytesIO):
    """A destination that takes its time, so that a short recording decodes for long enough."""

    def write(self, data: Any) -> int:
        time.sleep(0.005)
        return super().write(data)


def test_heartbeat_is_called_while_decoding_at_most_once_per_interval(tmp_path, monkeypatch):
    monkeypatch.setattr(audio, "HEARTBEAT_INTERVAL_SECONDS", 0.05)
    source = wav(tmp_path / "visit.wav", tone(20.0))
    beats: list[float] = []

    audio.recording_normalize(
        source, SlowDest(), max_seconds=3600, heartbeat=lambda: beats.append(time.monotonic())
    )

    assert len(beats) >= 2
    gaps = np.diff(beats)
    assert gaps.min() >= 0.05, gaps


def test_what_the_heartbeat_raises_stops_the_decode_and_propagates(tmp_path, monkeypatch):
    monkeypatch.setattr(audio, "HEARTBEAT_INTERVAL_SECONDS", 0.0)
    source = wav(tmp_path / "visit.wav", tone(20.0))
    dest = io.BytesIO()
    beats = 0

    def heartbeat() -> None:
        nonlocal beats
        beats += 1
        if beats == 3:
            raise LeaseLost("the stage was claimed by another attempt")

    with pytest.raises(LeaseLost):
        audio.recording_normalize(source, dest, max_seconds=3600, heartbeat=heartbeat)

    assert beats == 3
    assert 0 < len(dest.getvalue()) < 20 * RATE * 2


# --- through the upload path -----------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_uploaded_concat_script_fails_the_visit_without_reading_another_visit(
    clinician, other_clinician, private_storage, tmp_path
):
    other_visit = visit_create(clinician=other_clinician, recording=SHORT_VISIT)
    stored_name = Path(other_visit.recording.name).name
    evil = tmp_path / "visit.mp3"
    evil.write_text(f"ffconcat version 1.0\nfile {stored_name}\n")

    visit, doc = process(clinician, evil)

    failing = assert_failed_permanently_at(
        doc, "ingest", code="unreadable_recording", words=(REFUSED, "WAV, MP3")
    )
    assert stored_name not in failing["error"]
    assert str(private_storage) not in failing["error"]
    assert_nothing_half_written(private_storage, visit, "ingest")
    assert visit.current_run.stages.get(name="ingest").output is None


@pytest.mark.django_db(transaction=True)
def test_ingest_stage_passes_its_heartbeat_to_the_decode(
    clinician, private_storage, tmp_path, monkeypatch
):
    monkeypatch.setattr(audio, "HEARTBEAT_INTERVAL_SECONDS", 0.0)
    beating_stages: list[str] = []
    heartbeat = StageContext.heartbeat

    def counted(ctx: StageContext) -> None:
        beating_stages.append(ctx.stage_name)
        heartbeat(ctx)

    monkeypatch.setattr(StageContext, "heartbeat", counted)

    _visit, doc = process(clinician, wav(tmp_path / "visit.wav", tone(2.0)))

    assert stage_doc(doc, "ingest")["status"] == "succeeded"
    assert beating_stages.count("ingest") > 1


# --- decoding in a child process with limits -------------------------------------------------


def isolated(source: Path, dest: Path, **limits: Any) -> audio.DecodedRecording:
    return audio.recording_normalize_isolated(
        source,
        dest,
        max_seconds=3600,
        memory_bytes=limits.pop("memory_bytes", 2048 * 2**20),
        cpu_seconds=limits.pop("cpu_seconds", 600),
        **limits,
    )


def test_a_recording_decodes_in_a_child_exactly_as_in_the_worker(tmp_path: Path):
    in_worker, pcm = normalize(SHORT_VISIT)

    in_child = isolated(SHORT_VISIT, tmp_path / "audio.s16le")

    assert in_child == in_worker
    assert (tmp_path / "audio.s16le").read_bytes() == pcm


def test_a_refusal_in_the_child_keeps_its_class_and_words(tmp_path: Path):
    concat = tmp_path / "visit.mp3"
    concat.write_text(f"ffconcat version 1.0\nfile '{SHORT_VISIT}'\n")

    with pytest.raises(UnreadableRecording, match=REFUSED):
        isolated(concat, tmp_path / "audio.s16le")


def test_a_decode_past_its_cpu_limit_is_stopped_with_a_clear_error(tmp_path: Path):
    # No CPU second at all: the kernel stops the child at its first tick.
    with pytest.raises(UnreadableRecording, match=r"within the limits .* 0 s of CPU"):
        isolated(SAMPLE_VISIT, tmp_path / "audio.s16le", cpu_seconds=0)


def test_a_decode_past_its_memory_limit_is_stopped_with_a_clear_error(tmp_path: Path):
    # Less address space than the interpreter and FFmpeg need: the child cannot even start.
    with pytest.raises(UnreadableRecording, match=r"within the limits .*\(64 MB of memory"):
        isolated(SAMPLE_VISIT, tmp_path / "audio.s16le", memory_bytes=64 * 2**20)


def test_a_lost_lease_stops_the_childs_decode_at_once(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(audio, "HEARTBEAT_INTERVAL_SECONDS", 0.001)

    def lost() -> None:
        raise LeaseLost("the stage was taken over")

    with pytest.raises(LeaseLost):
        isolated(SAMPLE_VISIT, tmp_path / "audio.s16le", heartbeat=lost)

    # The child was stopped, not left decoding for nobody.
    decoding = subprocess.run(["pgrep", "-f", f"visits.speech.audio {SAMPLE_VISIT}"], check=False)
    assert decoding.returncode == 1
