"""A recording made in the browser is a visit from its first second: Record creates the visit
and its run, the pieces are transcribed while they arrive, and Stop leaves only the tail.
Nothing is lost to a piece sent twice, a piece still missing, or a start or finish sent twice;
and the transcript is the one the same recording gets when uploaded after the visit."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from django.db import connection
from django.test import Client
from django.urls import reverse
from django.utils import timezone
from django_q.models import OrmQ, Schedule

from pipeline import artifact_path, stage_output
from pipeline.core import executor
from pipeline.core.states import RunStatus
from tests.conftest import SAMPLE_VISIT, requires_postgres
from visits.capture.browser_recordings import PIECE_MAX_BYTES, recordings_abandoned_finish
from visits.models import AccessEvent, Visit
from visits.refs import TRANSCRIBE
from visits.schedules import ABANDONED_SCHEDULE_NAME, schedules_ensure
from visits.selectors import live_transcript, visit_stages, visit_status_document, visit_transcript
from visits.services import visit_create
from visits.speech import audio, transcription

# The recording is transcribed inline, whose heartbeat needs committed rows.
pytestmark = pytest.mark.django_db(transaction=True)

MIME = "audio/ogg;codecs=opus"
PIECES = 14  # the 42 s sample: about 3 s a piece, as the recorder sends them


def pieces_of(data: bytes, count: int) -> list[bytes]:
    """`data` cut at arbitrary byte offsets, as MediaRecorder's timeslices are."""
    size = -(-len(data) // count)
    return [data[i : i + size] for i in range(0, len(data), size)]


def start(client: Client, session: uuid.UUID, mime: str = MIME, **fields: str):
    return client.post(reverse("visits:recording_start", args=[session]), {"mime": mime, **fields})


def send_piece(client: Client, session: uuid.UUID, index: int, data: bytes):
    return client.post(
        reverse("visits:recording_piece", args=[session, index]),
        data=data,
        content_type="application/octet-stream",
    )


def finish(client: Client, session: uuid.UUID, pieces: int):
    return client.post(reverse("visits:recording_finish", args=[session]), {"pieces": pieces})


@pytest.fixture
def recorded() -> list[bytes]:
    return pieces_of(SAMPLE_VISIT.read_bytes(), PIECES)


def test_record_creates_the_visit_and_starts_its_run_at_once(client, clinician):
    client.force_login(clinician)
    session = uuid.uuid4()

    response = start(client, session)
    again = start(client, session)

    assert response.status_code == 200, response.content
    visit = Visit.objects.get()
    assert (
        response.json()
        == again.json()
        == {
            "visit": visit.pk,
            "url": reverse("visits:detail", args=[visit.pk]),
            "transcript_url": reverse("visits:live_transcript", args=[visit.pk]),
        }
    )
    assert (visit.clinician, visit.recording_session, visit.recording.name) == (
        clinician,
        session,
        "",
    )
    assert OrmQ.objects.count() == 1  # the run is on the cluster's queue from the first second
    assert visit_status_document(visit).recording == "recording"
    assert AccessEvent.objects.filter(visit=visit, action=AccessEvent.Action.RECORD).count() == 1
    page = client.get(reverse("visits:detail", args=[visit.pk]))
    assert b'data-recording-state="recording"' in page.content


def _transcript_as_uploaded(clinician, visit: Visit, run) -> None:
    """The live visit's transcript is the one the same recording gets uploaded afterwards, cut
    into the same chunks."""
    assert run.status == RunStatus.SUCCEEDED, run.error
    visit.refresh_from_db()
    transcribed = stage_output(run, TRANSCRIBE)
    assert transcribed is not None and transcribed.audio is not None
    pcm = audio.pcm_load(artifact_path(transcribed.audio))
    assert transcribed.chunks == len(transcription.chunk_bounds(pcm, 10.0)) > 1
    live = visit_transcript(visit_stages(visit))

    uploaded = visit_create(clinician=clinician, recording=SAMPLE_VISIT)
    assert executor.run_execute_inline(uploaded.current_run).status == RunStatus.SUCCEEDED
    after = visit_transcript(visit_stages(uploaded))
    assert live is not None and after is not None
    assert [(s.start, s.end, s.text) for s in live.segments] == [
        (s.start, s.end, s.text) for s in after.segments
    ]
    assert live.duration_seconds == pytest.approx(after.duration_seconds, abs=0.05)


@pytest.fixture
def same_chunks(settings) -> None:
    # Live and after the fact cut at the same length: the transcripts must then be the same.
    settings.TRANSCRIBE_LIVE_CHUNK_SECONDS = settings.TRANSCRIBE_CHUNK_SECONDS = 10.0


def test_a_recording_stopped_before_its_run_starts_is_still_transcribed_as_if_uploaded(
    client, clinician, recorded, same_chunks
):
    client.force_login(clinician)
    session = uuid.uuid4()
    visit = Visit.objects.get(pk=start(client, session).json()["visit"])
    for index, piece in enumerate(recorded):
        assert send_piece(client, session, index, piece).status_code == 200
    assert finish(client, session, len(recorded)).status_code == 200

    run = executor.run_execute_inline(visit.current_run)

    visit.refresh_from_db()
    with visit.recording.open("rb") as stored:
        assert stored.read() == b"".join(recorded)
    _transcript_as_uploaded(clinician, visit, run)


# The pieces arrive in one thread while the run goes on in another: SQLite's in-memory test
# database locks whole tables across threads, the production database does not.
@requires_postgres
def test_a_visit_is_transcribed_while_its_pieces_arrive(client, clinician, recorded, same_chunks):
    client.force_login(clinician)
    session = uuid.uuid4()
    visit = Visit.objects.get(pk=start(client, session).json()["visit"])
    heard_before_stop: list[int] = []
    failures: list[BaseException] = []

    def record() -> None:
        try:
            sender = Client()
            sender.force_login(clinician)
            for index, piece in enumerate(recorded):
                assert send_piece(sender, session, index, piece).status_code == 200
                time.sleep(0.2)
            # Before Stop, the workers have already heard the visit's first chunks.
            deadline = time.monotonic() + 120
            while not (heard := live_transcript(visit).segments) and time.monotonic() < deadline:
                time.sleep(0.2)
            heard_before_stop.append(len(heard))
            assert finish(sender, session, len(recorded)).status_code == 200
        except BaseException as exc:
            failures.append(exc)
        finally:
            connection.close()

    recorder = threading.Thread(target=record)
    recorder.start()
    run = executor.run_execute_inline(visit.current_run)
    recorder.join()

    assert not failures, failures
    assert heard_before_stop and heard_before_stop[0] > 0
    _transcript_as_uploaded(clinician, visit, run)


def test_a_piece_sent_twice_is_kept_once(client, clinician, recorded):
    client.force_login(clinician)
    session = uuid.uuid4()
    start(client, session)

    first = send_piece(client, session, 0, recorded[0]).json()
    again = send_piece(client, session, 0, recorded[0]).json()
    second = send_piece(client, session, 1, recorded[1]).json()

    assert first == again == {"index": 0, "bytes": len(recorded[0])}
    assert second["bytes"] == len(recorded[0]) + len(recorded[1])


def test_a_piece_of_a_recording_not_started_is_refused(client, clinician, recorded):
    client.force_login(clinician)

    response = send_piece(client, uuid.uuid4(), 0, recorded[0])

    assert response.status_code == 400
    assert "press Record again" in response.json()["error"]


def test_stop_with_a_piece_missing_waits_for_it_and_then_seals(client, clinician, recorded):
    client.force_login(clinician)
    session = uuid.uuid4()
    start(client, session)
    for index, piece in enumerate(recorded):
        if index != 3:
            send_piece(client, session, index, piece)

    early = finish(client, session, len(recorded))
    assert early.status_code == 409
    assert early.json()["code"] == "recording_incomplete"
    assert "(3)" in early.json()["error"] and "kept in the browser" in early.json()["error"]
    assert Visit.objects.get().recording_stopped_at is None

    send_piece(client, session, 3, recorded[3])
    late = finish(client, session, len(recorded))
    assert late.status_code == 200
    assert Visit.objects.get().recording_stopped_at is not None


def test_a_stop_sent_twice_seals_once_and_later_pieces_are_refused(client, clinician, recorded):
    client.force_login(clinician)
    session = uuid.uuid4()
    start(client, session)
    for index, piece in enumerate(recorded):
        send_piece(client, session, index, piece)

    first, second = finish(client, session, len(recorded)), finish(client, session, len(recorded))

    assert first.json() == second.json()
    visit = Visit.objects.get()
    assert (
        AccessEvent.objects.filter(visit=visit, action=AccessEvent.Action.STOP_RECORDING).count()
        == 1
    )
    late_piece = send_piece(client, session, 0, recorded[0])
    assert late_piece.status_code == 400
    assert "stopped" in late_piece.json()["error"]


@pytest.mark.parametrize(
    ("mime", "message"),
    [
        ("video/x-unknown", "cannot take"),
        ("", "unknown format"),
        ("audio/mp4", "cannot be transcribed while it is recorded"),
    ],
)
def test_a_format_we_cannot_stream_is_refused_in_words_before_anything_is_recorded(
    client, clinician, mime, message
):
    client.force_login(clinician)

    response = start(client, uuid.uuid4(), mime=mime)

    assert response.status_code == 400
    assert message in response.json()["error"]
    assert not Visit.objects.exists()


def test_bad_pieces_and_counts_are_refused_with_a_reason(client, clinician):
    client.force_login(clinician)
    session = uuid.uuid4()
    start(client, session)

    empty = send_piece(client, session, 0, b"")
    huge = send_piece(client, session, 0, b"x" * (PIECE_MAX_BYTES + 1))
    no_count = client.post(reverse("visits:recording_finish", args=[session]), {})
    absurd = finish(client, session, 10**9)

    assert [r.status_code for r in (empty, huge, no_count, absurd)] == [400] * 4
    assert "empty" in empty.json()["error"]
    assert "at most" in huge.json()["error"]
    assert "how many pieces" in no_count.json()["error"]


def test_a_recording_past_the_size_limit_is_stopped_with_a_reason(client, clinician, settings):
    settings.RECORDING_MAX_BYTES = 1000
    client.force_login(clinician)
    session = uuid.uuid4()
    start(client, session)

    assert send_piece(client, session, 0, b"a" * 600).status_code == 200
    over = send_piece(client, session, 1, b"b" * 600)

    assert over.status_code == 400
    assert "limit" in over.json()["error"]


def test_another_clinician_can_neither_add_to_nor_stop_nor_read_the_recording(
    client, clinician, other_clinician, recorded
):
    session = uuid.uuid4()
    client.force_login(clinician)
    visit_id = start(client, session).json()["visit"]
    send_piece(client, session, 0, recorded[0])

    client.force_login(other_clinician)
    piece = send_piece(client, session, 1, recorded[1])
    stop = finish(client, session, 1)
    transcript = client.get(reverse("visits:live_transcript", args=[visit_id]))

    assert (piece.status_code, stop.status_code, transcript.status_code) == (400, 400, 404)
    assert Visit.objects.get().recording_stopped_at is None


def test_an_interrupted_recording_says_so_and_finishes_with_what_arrived(
    client, clinician, recorded, settings
):
    client.force_login(clinician)
    session = uuid.uuid4()
    visit_id = start(client, session).json()["visit"]
    for index in (0, 1, 2, 4):  # piece 3 never came: the recording ends at the gap
        send_piece(client, session, index, recorded[index])
    settings.RECORDING_IDLE_MINUTES = 0

    page = client.get(reverse("visits:detail", args=[visit_id]))
    assert b'data-recording-state="interrupted"' in page.content
    done = client.post(reverse("visits:recording_finish_arrived", args=[visit_id]))

    assert done.status_code == 302
    visit = Visit.objects.get()
    assert visit.recording_stopped_at is not None
    with visit.recording.open("rb") as stored:
        assert stored.read() == b"".join(recorded[:3])
    run = executor.run_execute_inline(visit.current_run)
    assert run.status == RunStatus.SUCCEEDED, run.error


def test_the_live_transcript_is_recorded_in_the_audit_trail_once_per_session(client, clinician):
    client.force_login(clinician)
    visit_id = start(client, uuid.uuid4()).json()["visit"]
    url = reverse("visits:live_transcript", args=[visit_id])

    polls = [client.get(url) for _ in range(3)]

    assert [p.json() for p in polls] == [
        {"state": "recording", "segments": [], "heard_seconds": 0.0}
    ] * 3
    looks = AccessEvent.objects.filter(visit_id=visit_id, action=AccessEvent.Action.VIEW_VISIT)
    assert looks.count() == 1


def test_pieces_need_a_login_and_a_csrf_token(clinician, recorded):
    session = uuid.uuid4()
    assert send_piece(Client(), session, 0, recorded[0]).status_code == 302  # to the login
    assert start(Client(), session).status_code == 302

    strict = Client(enforce_csrf_checks=True)
    strict.force_login(clinician)
    assert send_piece(strict, session, 0, recorded[0]).status_code == 403
    assert start(strict, session).status_code == 403


def test_the_pieces_folder_is_the_clinicians_own(clinician, client):
    client.force_login(clinician)
    session = uuid.uuid4()
    start(client, session)
    send_piece(client, session, 0, b"abc")

    folder = artifact_path(Visit.objects.get().current_run.input["recording_pieces"])

    assert isinstance(folder, Path) and (folder / "000000.piece").read_bytes() == b"abc"
    assert str(clinician.pk) in folder.parts


def test_a_recording_nobody_came_back_to_is_finished_with_what_arrived(
    client, clinician, recorded, settings
):
    client.force_login(clinician)
    kept, empty, live = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    for session in (kept, empty, live):
        start(client, session)
    for index in range(3):
        send_piece(client, kept, index, recorded[index])
    settings.RECORDING_ABANDON_MINUTES = 0
    send_piece(client, live, 0, recorded[0])
    Visit.objects.filter(recording_session=live).update(
        pieces_received_at=timezone.now() + timedelta(minutes=5)
    )

    finished = recordings_abandoned_finish()

    by_session = {v.recording_session: v for v in Visit.objects.all()}
    assert sorted(finished) == sorted([by_session[kept].pk, by_session[empty].pk])
    assert by_session[live].recording_stopped_at is None  # its pieces are still coming
    with by_session[kept].recording.open("rb") as stored:
        assert stored.read() == b"".join(recorded[:3])
    stop = AccessEvent.objects.get(visit=by_session[kept], action=AccessEvent.Action.STOP_RECORDING)
    assert stop.actor is None and "abandoned" in stop.detail
    assert executor.run_execute_inline(by_session[kept].current_run).status == RunStatus.SUCCEEDED
    # No audio ever came: the run ends, saying so, rather than wait for the rest of the day.
    failed = executor.run_execute_inline(by_session[empty].current_run)
    assert failed.status == RunStatus.FAILED
    assert "before any audio arrived" in failed.error
    assert recordings_abandoned_finish() == []


def test_the_schedules_finish_abandoned_recordings_every_minute():
    schedules_ensure()

    schedule = Schedule.objects.get(name=ABANDONED_SCHEDULE_NAME)
    assert schedule.func == "visits.capture.browser_recordings.recordings_abandoned_finish"
    assert (schedule.schedule_type, schedule.minutes, schedule.repeats) == (Schedule.MINUTES, 1, -1)
