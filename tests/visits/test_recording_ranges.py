"""Seeking in a visit's recording: HTTP byte ranges (RFC 9110 §14) on the recording URL.

The first half goes through the test client and the real URL, so login, object-level access
and middleware all take part. The second half calls `recording_response` directly with a
RequestFactory request, for what the view cannot be asked today (HEAD: the view is GET-only)
and for edges of the Range grammar.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.test import RequestFactory
from django.urls import reverse

from tests.conftest import SHORT_VISIT
from visits.capture.recording_response import BLOCK_SIZE, recording_response
from visits.models import Visit
from visits.services import visit_create

RECORDING = SHORT_VISIT.read_bytes()
SIZE = len(RECORDING)


@pytest.fixture
def visit(clinician) -> Visit:
    created = visit_create(clinician=clinician, recording=SHORT_VISIT)
    # Read back, so `recording` is a closed FieldFile as the view sees it.
    return Visit.objects.get(pk=created.pk)


@pytest.fixture
def url(visit) -> str:
    return reverse("visits:recording", args=[visit.pk])


def body(response: Any) -> bytes:
    if response.streaming:
        return b"".join(response.streaming_content)
    return bytes(response.content)


def assert_common_headers(response: Any, visit: Visit) -> None:
    """What every answer carries, 200, 206 and 416 alike."""
    assert response["Accept-Ranges"] == "bytes"
    assert response["Cache-Control"] == "private, no-store"
    assert response["Content-Type"] == "audio/mpeg"
    assert response["Content-Disposition"] == f'inline; filename="visit-{visit.pk}-recording.mp3"'
    assert response["X-Content-Type-Options"] == "nosniff"


def test_the_fixture_is_larger_than_the_ranges_asked_for():
    assert SIZE > 1000


# --- through the view -------------------------------------------------------------------------


@pytest.mark.django_db
def test_no_range_sends_the_whole_file_with_200_and_accept_ranges(client, clinician, visit, url):
    client.force_login(clinician)

    response = client.get(url)

    assert response.status_code == 200
    assert body(response) == RECORDING
    assert response["Content-Length"] == str(SIZE)
    assert "Content-Range" not in response
    assert_common_headers(response, visit)


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("header", "first", "last"),
    [
        ("bytes=0-99", 0, 99),
        ("bytes=100-", 100, SIZE - 1),
        ("bytes=-50", SIZE - 50, SIZE - 1),
        ("bytes=0-", 0, SIZE - 1),  # what a browser's player asks for first
        (f"bytes=10-{SIZE + 5000}", 10, SIZE - 1),  # a last position past the end is clamped
        (f"bytes=-{SIZE + 5000}", 0, SIZE - 1),  # a suffix longer than the file: all of it
        ("bytes=0-99,", 0, 99),  # an empty list element is allowed and ignored
        ("Bytes=0-99", 0, 99),  # the unit is case-insensitive
    ],
)
def test_single_range_sends_exactly_those_bytes_with_206(
    client, clinician, visit, url, header, first, last
):
    client.force_login(clinician)

    response = client.get(url, headers={"range": header})

    assert response.status_code == 206
    assert response.streaming
    assert body(response) == RECORDING[first : last + 1]
    assert response["Content-Range"] == f"bytes {first}-{last}/{SIZE}"
    assert response["Content-Length"] == str(last - first + 1)
    assert_common_headers(response, visit)


@pytest.mark.django_db
@pytest.mark.parametrize("header", [f"bytes={SIZE}-", f"bytes={SIZE + 1}-{SIZE + 10}", "bytes=-0"])
def test_range_selecting_no_byte_is_416_with_the_size(client, clinician, visit, url, header):
    client.force_login(clinician)

    response = client.get(url, headers={"range": header})

    assert response.status_code == 416
    assert response["Content-Range"] == f"bytes */{SIZE}"
    assert body(response) == b""
    assert_common_headers(response, visit)


@pytest.mark.django_db
@pytest.mark.parametrize(
    "header",
    [
        "bytes=abc",
        "bytes=100-5",  # last before first: invalid, so ignored (RFC 9110 §14.1.1)
        "bytes=-",
        "bytes=1-2-3",
        "bytes 0-99",
        "items=0-99",  # a unit we do not know is ignored
        "bytes=0-9,20-29",  # several ranges are not supported: the whole file
        "bytes=²-9",  # a Unicode digit is not a digit here
    ],
)
def test_malformed_or_multiple_ranges_are_ignored_and_the_whole_file_sent(
    client, clinician, visit, url, header
):
    client.force_login(clinician)

    response = client.get(url, headers={"range": header})

    assert response.status_code == 200
    assert body(response) == RECORDING
    assert "Content-Range" not in response
    assert_common_headers(response, visit)


@pytest.mark.django_db
def test_another_clinician_gets_404_and_no_bytes_even_for_a_range(client, other_clinician, url):
    client.force_login(other_clinician)

    for headers in ({}, {"range": "bytes=0-99"}):
        response = client.get(url, headers=headers)

        assert response.status_code == 404
        assert RECORDING[:100] not in body(response)


@pytest.mark.django_db
def test_anonymous_user_is_sent_to_login_even_for_a_range(client, url):
    response = client.get(url, headers={"range": "bytes=0-99"})

    assert response.status_code == 302
    assert response["Location"] == f"{reverse('login')}?next={url}"


@pytest.mark.django_db
def test_staff_with_the_view_permission_can_seek(client, django_user_model, url):
    from django.contrib.auth.models import Permission

    staff = django_user_model.objects.create_user(username="nurse", password="x", is_staff=True)
    staff.user_permissions.add(Permission.objects.get(codename="view_visit"))
    client.force_login(staff)

    response = client.get(url, headers={"range": "bytes=-50"})

    assert response.status_code == 206
    assert body(response) == RECORDING[-50:]


@pytest.mark.django_db
def test_seeking_back_and_forth_gives_each_range(client, clinician, url):
    """A player seeks back and forth; each answer stands alone."""
    client.force_login(clinician)

    later = client.get(url, headers={"range": "bytes=1000-1099"})
    earlier = client.get(url, headers={"range": "bytes=10-19"})

    assert body(later) == RECORDING[1000:1100]
    assert body(earlier) == RECORDING[10:20]


# --- the function itself ----------------------------------------------------------------------


@pytest.fixture
def call() -> Iterator[Callable[..., Any]]:
    """Calls `recording_response` for a visit and, like a WSGI server, closes what it answered."""
    answered: list[Any] = []

    def respond(visit: Visit, method: str = "GET", **headers: str) -> Any:
        request = getattr(RequestFactory(), method.lower())("/recording/", headers=headers)
        filename = f"visit-{visit.pk}-recording.mp3"
        answered.append(recording_response(request, visit.recording, filename=filename))
        return answered[-1]

    yield respond
    for response in answered:
        response.close()


@pytest.mark.django_db
def test_head_sends_the_headers_of_the_whole_file_and_opens_nothing(visit, call):
    response = call(visit, "HEAD", range="bytes=0-99")  # Range is defined for GET only

    assert response.status_code == 200
    assert response["Content-Length"] == str(SIZE)
    assert body(response) == b""
    assert visit.recording.closed
    assert_common_headers(response, visit)


@pytest.mark.django_db
def test_if_range_means_the_whole_file_since_we_send_no_validator(visit, call):
    response = call(visit, range="bytes=0-99", if_range='"some-etag"')

    assert response.status_code == 200
    assert body(response) == RECORDING
    assert "ETag" not in response
    assert "Last-Modified" not in response


@pytest.mark.django_db
def test_a_416_opens_nothing(visit, call):
    response = call(visit, range=f"bytes={SIZE}-")

    assert response.status_code == 416
    assert visit.recording.closed


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("header", "status", "content_range"),
    [
        ("bytes=" + "9" * 5000 + "-", 416, f"bytes */{SIZE}"),  # past int()'s digit limit
        ("bytes=0-" + "9" * 5000, 206, f"bytes 0-{SIZE - 1}/{SIZE}"),
        ("bytes=-" + "9" * 5000, 206, f"bytes 0-{SIZE - 1}/{SIZE}"),
        ("bytes=" + "0" * 30 + "5-" + "0" * 30 + "9", 206, f"bytes 5-9/{SIZE}"),
    ],
)
def test_very_long_positions_mean_what_they_say(visit, header, status, content_range, call):
    response = call(visit, range=header)

    assert response.status_code == status
    assert response["Content-Range"] == content_range


@pytest.mark.django_db
def test_a_large_range_is_streamed_in_blocks_and_the_file_closed_after(clinician, tmp_path, call):
    source = tmp_path / "long.mp3"
    content = bytes(range(256)) * (5 * BLOCK_SIZE // 256) + b"tail"
    source.write_bytes(content)
    visit = Visit.objects.get(pk=visit_create(clinician=clinician, recording=source).pk)

    response = call(visit, range="bytes=7-")
    blocks = list(response.streaming_content)

    assert response.status_code == 206
    assert len(blocks) > 1
    assert max(len(block) for block in blocks) <= BLOCK_SIZE
    assert b"".join(blocks) == content[7:]
    assert not visit.recording.closed  # still streaming until the server is done
    response.close()
    assert visit.recording.closed


@pytest.mark.django_db
def test_the_file_is_closed_even_if_the_body_is_never_read(visit, call):
    """A player often drops a connection right after the headers when it seeks elsewhere."""
    response = call(visit, range="bytes=100-")

    response.close()

    assert visit.recording.closed


@pytest.mark.parametrize(
    ("extension", "content_type"),
    [
        (".mp3", "audio/mpeg"),
        (".ogg", "audio/ogg"),
        (".oga", "audio/ogg"),
        (".opus", "audio/ogg"),
        (".webm", "audio/webm"),
        (".wav", "audio/wav"),
        (".m4a", "audio/mp4"),
        (".mp4", "audio/mp4"),
        (".flac", "audio/flac"),
        (".aac", "audio/aac"),
        (".MP3", "audio/mpeg"),
        (".xyz", "application/octet-stream"),
        ("", "application/octet-stream"),
    ],
)
def test_content_type_follows_the_extension(tmp_path: Path, extension, content_type):
    from django.core.files import File

    path = tmp_path / "recording.bin"
    path.write_bytes(b"0123456789")
    request = RequestFactory().get("/recording/", headers={"range": "bytes=2-4"})

    with path.open("rb") as handle:
        response = recording_response(request, File(handle), filename=f"visit-1{extension}")
        assert body(response) == b"234"

    assert response["Content-Type"] == content_type


def test_a_file_name_outside_ascii_is_sent_in_the_rfc_6266_form(tmp_path: Path):
    from django.core.files import File

    path = tmp_path / "recording.bin"
    path.write_bytes(b"0123456789")

    with path.open("rb") as handle:
        response = recording_response(RequestFactory().get("/"), File(handle), filename="é.mp3")
        body(response)

    assert re.fullmatch(r"inline; filename\*=utf-8''%C3%A9\.mp3", response["Content-Disposition"])
