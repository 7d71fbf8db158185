"""A recording made in the browser arrives in pieces while the clinician records; nothing is
lost to a piece sent twice, a piece still missing, or a finish sent twice."""

from __future__ import annotations

import uuid

import pytest
from django.test import Client
from django.urls import reverse
from django_q.models import OrmQ

from pipeline.core import executor
from pipeline.core.states import RunStatus
from tests.conftest import SAMPLE_VISIT
from visits.capture.browser_recordings import PIECE_MAX_BYTES
from visits.models import Visit

# The finished recording is transcribed inline, whose heartbeat needs committed rows.
pytestmark = pytest.mark.django_db(transaction=True)


def pieces_of(data: bytes, count: int) -> list[bytes]:
    """`data` cut at arbitrary byte offsets, as MediaRecorder's timeslices are."""
    size = -(-len(data) // count)
    return [data[i : i + size] for i in range(0, len(data), size)]


def send_piece(client: Client, session: uuid.UUID, index: int, data: bytes):
    return client.post(
        reverse("visits:recording_piece", args=[session, index]),
        data=data,
        content_type="application/octet-stream",
    )


def finish(client: Client, session: uuid.UUID, pieces: int, mime: str = "audio/ogg;codecs=opus"):
    return client.post(
        reverse("visits:recording_finish", args=[session]), {"pieces": pieces, "mime": mime}
    )


@pytest.fixture
def recorded() -> list[bytes]:
    return pieces_of(SAMPLE_VISIT.read_bytes(), 7)


def test_pieces_become_one_recording_and_a_visit_whose_pipeline_runs(client, clinician, recorded):
    client.force_login(clinician)
    session = uuid.uuid4()

    for index, piece in enumerate(recorded):
        response = send_piece(client, session, index, piece)
        assert response.status_code == 200, response.content
    done = finish(client, session, len(recorded))

    assert done.status_code == 200, done.content
    visit = Visit.objects.get()
    assert done.json() == {"visit": visit.pk, "url": reverse("visits:detail", args=[visit.pk])}
    assert (visit.clinician, visit.recording_session) == (clinician, session)
    with visit.recording.open("rb") as stored:
        assert stored.read() == b"".join(recorded)
    assert OrmQ.objects.count() == 1  # the pipeline was started on the cluster's queue
    run = executor.run_execute_inline(visit.current_run)
    assert run.status == RunStatus.SUCCEEDED, run.error


def test_a_piece_sent_twice_is_kept_once(client, clinician, recorded):
    client.force_login(clinician)
    session = uuid.uuid4()

    first = send_piece(client, session, 0, recorded[0]).json()
    again = send_piece(client, session, 0, recorded[0]).json()
    second = send_piece(client, session, 1, recorded[1]).json()

    assert first == again == {"index": 0, "bytes": len(recorded[0])}
    assert second["bytes"] == len(recorded[0]) + len(recorded[1])


def test_finishing_with_a_piece_missing_waits_for_it_and_then_succeeds(client, clinician, recorded):
    client.force_login(clinician)
    session = uuid.uuid4()
    for index, piece in enumerate(recorded):
        if index != 3:
            send_piece(client, session, index, piece)

    early = finish(client, session, len(recorded))
    assert early.status_code == 409
    assert early.json()["code"] == "recording_incomplete"
    assert "(3)" in early.json()["error"] and "kept in the browser" in early.json()["error"]
    assert not Visit.objects.exists()

    send_piece(client, session, 3, recorded[3])
    late = finish(client, session, len(recorded))
    assert late.status_code == 200
    assert Visit.objects.count() == 1


def test_a_finish_sent_twice_makes_one_visit(client, clinician, recorded):
    client.force_login(clinician)
    session = uuid.uuid4()
    for index, piece in enumerate(recorded):
        send_piece(client, session, index, piece)

    first, second = finish(client, session, len(recorded)), finish(client, session, len(recorded))

    assert first.json() == second.json()
    assert Visit.objects.count() == 1
    late_piece = send_piece(client, session, 0, recorded[0])
    assert late_piece.status_code == 400
    assert "already sent" in late_piece.json()["error"]


@pytest.mark.parametrize(
    ("mime", "message"),
    [("video/x-unknown", "cannot take"), ("", "unknown format")],
)
def test_a_format_we_cannot_decode_is_refused_in_words(client, clinician, recorded, mime, message):
    client.force_login(clinician)
    session = uuid.uuid4()
    send_piece(client, session, 0, recorded[0])

    response = finish(client, session, 1, mime=mime)

    assert response.status_code == 400
    assert message in response.json()["error"]
    assert not Visit.objects.exists()


def test_bad_pieces_are_refused_with_a_reason(client, clinician):
    client.force_login(clinician)
    session = uuid.uuid4()

    empty = send_piece(client, session, 0, b"")
    huge = send_piece(client, session, 0, b"x" * (PIECE_MAX_BYTES + 1))
    no_count = client.post(
        reverse("visits:recording_finish", args=[session]), {"mime": "audio/ogg"}
    )

    assert (empty.status_code, huge.status_code, no_count.status_code) == (400, 400, 400)
    assert "empty" in empty.json()["error"]
    assert "at most" in huge.json()["error"]


def test_a_recording_past_the_size_limit_is_stopped_with_a_reason(client, clinician, settings):
    settings.RECORDING_MAX_BYTES = 1000
    client.force_login(clinician)
    session = uuid.uuid4()

    assert send_piece(client, session, 0, b"a" * 600).status_code == 200
    over = send_piece(client, session, 1, b"b" * 600)

    assert over.status_code == 400
    assert "limit" in over.json()["error"]


def test_another_clinician_cannot_finish_or_see_the_pieces(
    client, clinician, other_clinician, recorded
):
    session = uuid.uuid4()
    client.force_login(clinician)
    for index, piece in enumerate(recorded):
        send_piece(client, session, index, piece)

    client.force_login(other_clinician)
    response = finish(client, session, len(recorded))

    assert response.status_code == 409  # nothing of theirs under that session
    assert not Visit.objects.exists()


def test_pieces_need_a_login_and_a_csrf_token(clinician, recorded):
    session = uuid.uuid4()
    assert send_piece(Client(), session, 0, recorded[0]).status_code == 302  # to the login

    strict = Client(enforce_csrf_checks=True)
    strict.force_login(clinician)
    assert send_piece(strict, session, 0, recorded[0]).status_code == 403
