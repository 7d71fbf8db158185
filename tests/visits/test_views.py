"""The clinician's pages through Django's test client: login, upload, access to one's own
visits only, and PHI kept out of URLs."""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.http import FileResponse
from django.test import Client
from django.urls import reverse
from django_q.models import OrmQ

from pipeline.backends.djangoq import TASK_STAGE_EXECUTE
from pipeline.core.models import Stage
from tests.conftest import SHORT_VISIT
from visits.models import Visit
from visits.selectors import visit_status_document
from visits.services import visit_create, visit_start

RATE = 16_000


def tone_mp3(path: Path, seconds: float = 1.0) -> Path:
    """A real, small MP3 (a 440 Hz tone) encoded with PyAV's libmp3lame."""
    samples = (
        0.3 * 32767 * np.sin(2 * np.pi * 440 * np.arange(int(seconds * RATE)) / RATE)
    ).astype(np.int16)
    with av.open(str(path), mode="w", format="mp3") as container:
        stream = container.add_stream("libmp3lame", rate=RATE, layout="mono")
        stream.codec_context.open()
        ctx = stream.codec_context
        resampler = av.AudioResampler(
            format=ctx.format.name, layout="mono", rate=RATE, frame_size=ctx.frame_size
        )
        frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = RATE
        frame.pts = 0
        for out in [*resampler.resample(frame), *resampler.resample(None)]:
            container.mux(stream.encode(out))
        container.mux(stream.encode(None))
    return path


def upload(name: str, content: bytes) -> SimpleUploadedFile:
    return SimpleUploadedFile(name, content, content_type="application/octet-stream")


@pytest.fixture
def recording(tmp_path) -> bytes:
    return tone_mp3(tmp_path / "tone.mp3").read_bytes()


@pytest.fixture
def visit(clinician, tmp_path) -> Visit:
    """A stored visit of `clinician`, not processed."""
    return visit_create(clinician=clinician, recording=tone_mp3(tmp_path / "visit.mp3"))


def page(response: Any) -> str:
    return response.content.decode()


# --- login -----------------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("name", ["list", "upload", "detail", "recording"])
def test_anonymous_user_is_sent_to_login(client, visit, name):
    url = reverse(
        f"visits:{name}", **({"args": [visit.pk]} if name in ("detail", "recording") else {})
    )

    response = client.get(url)

    assert response.status_code == 302
    assert response["Location"] == f"{reverse('login')}?next={url}"


@pytest.mark.django_db
def test_anonymous_post_to_upload_is_sent_to_login_and_stores_nothing(
    client, recording, private_storage
):
    response = client.post(reverse("visits:upload"), {"recording": upload("v.mp3", recording)})

    assert response.status_code == 302
    assert response["Location"].startswith(reverse("login"))
    assert Visit.objects.count() == 0
    assert [path for path in private_storage.rglob("*") if path.is_file()] == []


# --- upload ----------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_upload_creates_visit_and_enqueues_pipeline_without_running_it(
    client, clinician, recording
):
    client.force_login(clinician)

    response = client.post(
        reverse("visits:upload"),
        {"label": "follow-up", "recording": upload("visit.mp3", recording)},
    )

    visit = Visit.objects.get()
    assert response.status_code == 302
    assert response["Location"] == reverse("visits:detail", args=[visit.pk])
    assert visit.clinician == clinician
    assert visit.label == "follow-up"
    assert visit.recording_bytes == len(recording)
    with visit.recording.open("rb") as stored:
        assert stored.read() == recording
    # Enqueued on the ORM broker after commit, not run: no attempt exists yet.
    ingest = Stage.objects.get(run=visit.current_run, name="ingest")
    assert ingest.attempt_count == 0
    assert ingest.enqueued_at is not None
    assert visit_status_document(visit).model_dump(mode="json")["status"] == "queued"
    (message,) = OrmQ.objects.all()
    task = message.task
    assert task["func"] == TASK_STAGE_EXECUTE
    assert tuple(task["args"]) == (ingest.id,)


@pytest.mark.django_db
def test_upload_page_renders_form(client, clinician):
    client.force_login(clinician)

    response = client.get(reverse("visits:upload"))

    assert response.status_code == 200
    assert 'enctype="multipart/form-data"' in page(response)
    assert 'name="recording"' in page(response)


@pytest.mark.django_db
def test_upload_of_text_file_is_a_form_error(client, clinician, private_storage):
    client.force_login(clinician)

    response = client.post(
        reverse("visits:upload"), {"recording": upload("notes.txt", b"not audio at all")}
    )

    assert response.status_code == 400
    assert "not a recording format we accept" in html.unescape(page(response))
    assert response.context["form"].errors["recording"]
    assert Visit.objects.count() == 0
    assert [path for path in private_storage.rglob("*") if path.is_file()] == []


@pytest.mark.django_db
def test_upload_without_a_file_is_a_form_error(client, clinician):
    client.force_login(clinician)

    response = client.post(reverse("visits:upload"), {"label": "no file"})

    assert response.status_code == 400
    assert "This field is required." in page(response)
    assert Visit.objects.count() == 0


@pytest.mark.django_db
def test_upload_of_empty_file_is_a_form_error(client, clinician):
    client.force_login(clinician)

    response = client.post(reverse("visits:upload"), {"recording": upload("visit.mp3", b"")})

    assert response.status_code == 400
    assert response.context["form"].errors["recording"]
    assert Visit.objects.count() == 0


@pytest.mark.django_db
@pytest.mark.parametrize("max_bytes", [1000, 2**20])
def test_oversized_upload_is_refused_with_the_size_limit(
    client, clinician, settings, private_storage, max_bytes
):
    settings.RECORDING_MAX_BYTES = max_bytes
    client.force_login(clinician)

    response = client.post(
        reverse("visits:upload"), {"recording": upload("visit.mp3", b"\xff" * (max_bytes + 70_000))}
    )

    assert response.status_code == 400
    text = html.unescape(page(response))
    assert "limit" in text
    assert "Split the recording" in text
    if max_bytes == 2**20:
        assert "1.0\xa0MB limit" in text
    assert Visit.objects.count() == 0
    assert [path for path in private_storage.rglob("*") if path.is_file()] == []


@pytest.mark.django_db
def test_oversized_upload_says_so_once_and_not_that_the_file_is_missing(
    client, clinician, settings
):
    settings.RECORDING_MAX_BYTES = 2**20
    client.force_login(clinician)

    response = client.post(
        reverse("visits:upload"), {"recording": upload("visit.mp3", b"\xff" * (2**20 + 70_000))}
    )

    assert response.status_code == 400
    text = html.unescape(page(response))
    # The clinician did choose a file: the page must say it is too large, once, and not
    # contradict itself with "This field is required." for the file they just picked.
    assert html.unescape(text).count("larger than the 1.0\xa0MB limit") == 1
    assert "This field is required." not in text


@pytest.mark.django_db
def test_upload_post_without_csrf_token_is_refused(clinician, recording, private_storage):
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(clinician)

    response = browser.post(reverse("visits:upload"), {"recording": upload("v.mp3", recording)})

    assert response.status_code == 403
    assert Visit.objects.count() == 0
    assert [path for path in private_storage.rglob("*") if path.is_file()] == []


def _csrf_token(browser: Client) -> str:
    form = browser.get(reverse("visits:upload"))
    assert form.status_code == 200
    match = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page(form))
    assert match, "the upload form carries no CSRF token"
    return match.group(1)


@pytest.mark.django_db
def test_upload_post_with_csrf_token_is_accepted(
    clinician, recording, django_capture_on_commit_callbacks
):
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(clinician)
    token = _csrf_token(browser)

    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        response = browser.post(
            reverse("visits:upload"),
            {"csrfmiddlewaretoken": token, "recording": upload("v.mp3", recording)},
        )

    visit = Visit.objects.get()
    assert response.status_code == 302
    assert response["Location"] == reverse("visits:detail", args=[visit.pk])
    assert len(callbacks) == 1  # the wake-up message, sent once the upload commits


@pytest.mark.django_db
def test_oversized_upload_with_csrf_enforced_is_a_form_error_not_403(
    clinician, settings, private_storage
):
    # A browser sends the token first (it comes first in the form), then the file.
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(clinician)
    token = _csrf_token(browser)
    settings.RECORDING_MAX_BYTES = 1000

    response = browser.post(
        reverse("visits:upload"),
        {"csrfmiddlewaretoken": token, "recording": upload("v.mp3", b"\xff" * 200_000)},
    )

    assert response.status_code == 400
    assert "Split the recording" in html.unescape(page(response))
    assert Visit.objects.count() == 0


# --- object-level access ---------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("name", ["detail", "recording"])
def test_other_clinician_gets_404_for_someone_elses_visit(client, other_clinician, visit, name):
    client.force_login(other_clinician)

    response = client.get(reverse(f"visits:{name}", args=[visit.pk]))

    assert response.status_code == 404


@pytest.mark.django_db
def test_owner_gets_the_recording_bytes_never_cached(client, clinician, visit):
    client.force_login(clinician)

    response = client.get(reverse("visits:recording", args=[visit.pk]))

    assert response.status_code == 200
    assert isinstance(response, FileResponse)
    assert response.streaming
    with visit.recording.open("rb") as stored:
        assert b"".join(response.streaming_content) == stored.read()
    assert "no-store" in response["Cache-Control"]
    assert "private" in response["Cache-Control"]


@pytest.mark.django_db
def test_staff_see_other_visits_only_with_the_view_permission(client, django_user_model, visit):
    from django.contrib.auth.models import Permission

    staff = django_user_model.objects.create_user(username="nurse", password="x", is_staff=True)
    client.force_login(staff)
    url = reverse("visits:detail", args=[visit.pk])
    assert client.get(url).status_code == 404

    staff.user_permissions.add(Permission.objects.get(codename="view_visit"))
    client.force_login(django_user_model.objects.get(pk=staff.pk))

    assert client.get(url).status_code == 200
    assert client.get(reverse("visits:recording", args=[visit.pk])).status_code == 200


@pytest.mark.django_db
def test_list_shows_only_the_users_own_visits(client, clinician, other_clinician, tmp_path):
    mine = visit_create(clinician=clinician, recording=tone_mp3(tmp_path / "a.mp3"), label="mine-1")
    theirs = visit_create(
        clinician=other_clinician, recording=tone_mp3(tmp_path / "b.mp3"), label="theirs-1"
    )
    client.force_login(clinician)

    response = client.get(reverse("visits:list"))

    assert response.status_code == 200
    text = page(response)
    assert reverse("visits:detail", args=[mine.pk]) in text
    assert "mine-1" in text
    assert reverse("visits:detail", args=[theirs.pk]) not in text
    assert "theirs-1" not in text
    assert list(response.context["visits"]) == [mine]


# --- what the detail page shows --------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_detail_of_processed_visit_shows_transcript_summary_note_and_offline_banner(
    client, clinician
):
    visit = visit_create(clinician=clinician, recording=SHORT_VISIT)
    visit_start(visit=visit, inline=True)
    doc = visit_status_document(visit).model_dump(mode="json")
    assert doc["status"] == "succeeded", doc
    client.force_login(clinician)

    response = client.get(reverse("visits:detail", args=[visit.pk]))

    assert response.status_code == 200
    text = html.unescape(page(response))
    assert "ibuprofen" in text.lower()
    for segment in doc["transcript"]["segments"]:
        assert segment["text"] in text
    assert "Clinical summary" in text
    assert doc["summary"]["chief_complaint"]["text"] in text
    assert "SOAP note" in text
    soap_items = [item for items in doc["note"]["soap"].values() for item in items]
    assert soap_items
    for item in soap_items + doc["note"]["patient_summary"]:
        assert item["text"] in text
    assert "Offline engine." in text
    assert "No language model was used" in text
    assert "hx-trigger" not in text  # finished: the page stops polling
    # Every citation is a link to its segment, and every cited segment is on the page.
    cited = set(re.findall(r'data-cite="(\d+)"', text))
    assert cited and cited <= set(re.findall(r'data-segment-id="(\d+)"', text))
    assert 'id="recording-player"' in text


@pytest.mark.django_db(transaction=True)
def test_detail_of_failed_visit_shows_the_failure_message(client, clinician, tmp_path):
    source = tmp_path / "visit.mp3"
    source.write_text("this is a text file, not a recording\n" * 20)
    visit = visit_create(clinician=clinician, recording=source)
    visit_start(visit=visit, inline=True)
    client.force_login(clinician)

    response = client.get(reverse("visits:detail", args=[visit.pk]))

    assert response.status_code == 200
    text = html.unescape(page(response))
    assert "could not be read as audio" in text
    assert "failed" in text
    assert "Transcript" not in text
    assert "SOAP note" not in text


@pytest.mark.django_db
def test_a_queued_visit_polls_its_live_fragment_instead_of_reloading(client, clinician, visit):
    client.force_login(clinician)
    live_url = reverse("visits:live", args=[visit.pk])

    text = page(client.get(reverse("visits:detail", args=[visit.pk])))
    fragment = client.get(live_url, headers={"HX-Request": "true"})

    assert 'http-equiv="refresh"' not in text
    assert f'hx-get="{live_url}"' in text and "every 2s" in text
    assert fragment.status_code == 200
    body = page(fragment)
    assert "<html" not in body  # the fragment alone, swapped in place
    assert re.search(r"data-visit-status>queued<", body)
    assert f'hx-get="{live_url}"' in body  # still polling: the run is not final


@pytest.mark.django_db
def test_the_live_fragment_is_private_to_the_visit(client, other_clinician, visit):
    client.force_login(other_clinician)
    assert client.get(reverse("visits:live", args=[visit.pk])).status_code == 404


# --- PHI never in URLs -----------------------------------------------------------------------


@pytest.mark.django_db
def test_stored_name_and_urls_never_carry_the_original_filename(
    client, clinician, recording, settings
):
    original = "Jane_Roe_DOB_1961-04-02.MP3"
    client.force_login(clinician)

    response = client.post(reverse("visits:upload"), {"recording": upload(original, recording)})

    visit = Visit.objects.get()
    assert response.status_code == 302
    assert "Jane" not in response["Location"]
    assert visit.recording_name == original  # kept in the database for the clinician
    assert re.fullmatch(r"recordings/[0-9a-f]{32}\.mp3", visit.recording.name)
    assert "Jane" not in visit.recording.name
    assert "1961" not in visit.recording.name

    detail = page(client.get(response["Location"]))
    hrefs = re.findall(r'(?:href|src)="([^"]*)"', detail)
    recording_url = reverse("visits:recording", args=[visit.pk])
    assert recording_url in hrefs
    assert not any("Jane" in href or visit.recording.name in href for href in hrefs)
    assert client.get(recording_url).status_code == 200

    # No public media URL maps to the private storage.
    for public in (f"/{visit.recording.name}", f"/media/{visit.recording.name}"):
        assert client.get(public).status_code == 404
    if settings.MEDIA_URL:
        assert client.get(f"{settings.MEDIA_URL}{visit.recording.name}").status_code == 404
