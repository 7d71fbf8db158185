"""The clinician's web UI in a real browser: log in, upload, watch the pipeline finish without a
reload, refused files, other clinicians' visits, citations that play the recording.

PostgreSQL only: an upload only enqueues work, and a real django-q2 cluster (child processes on
the test database, as in tests/pipeline/test_cluster.py) does it while the page is open."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import pytest
from playwright.sync_api import Page, TimeoutError as PlaywrightTimeoutError, expect

from pipeline.core.states import RunStatus
from tests.conftest import SHORT_VISIT, requires_postgres
from tests.support.cluster import Cluster, wait_for
from visits.models import Visit
from visits.services import visit_create, visit_start

if TYPE_CHECKING:
    from django.contrib.auth.models import User

pytestmark = requires_postgres

PASSWORD = "pw-ada-12345!"  # the `clinician` fixture's
FINISH_MS = 120_000  # transcription and the LLM stages on 2 shared cores: ~5-20 s, CI slower
RECORDING_INPUT = 'input[type="file"][name="recording"]'  # the upload form's
FINAL = (RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED)


def processed_on(cluster: Cluster, clinician: User, **visit_fields: str) -> Visit:
    """A visit of SHORT_VISIT started on `cluster` and waited for; its run must succeed."""
    visit = visit_create(clinician=clinician, recording=SHORT_VISIT, **visit_fields)
    visit_start(visit=visit)

    def final() -> bool:
        assert visit.current_run is not None
        visit.current_run.refresh_from_db()
        return visit.current_run.status in FINAL

    wait_for(final, timeout=FINISH_MS / 1000, what="the pipeline to finish")
    assert visit.current_run is not None
    assert visit.current_run.status == RunStatus.SUCCEEDED, cluster.log()
    return visit


def log_in(page: Page, username: str, password: str = PASSWORD) -> None:
    page.goto("/accounts/login/")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("heading", name="My visits")).to_be_visible()


def test_log_in_through_the_form_lands_on_the_visit_list(live_server, page: Page, clinician):
    page.goto("/")
    expect(page).to_have_url(re.compile(r"/accounts/login/\?next=/$"))

    log_in(page, clinician.username)

    expect(page).to_have_url(f"{live_server.url}/")
    expect(page.locator("header nav")).to_contain_text(clinician.username)
    expect(page.get_by_text("No visits yet.")).to_be_visible()


@pytest.mark.cluster
def test_upload_then_watch_the_run_succeed_without_a_reload(
    live_server, start_cluster, page: Page, clinician, screenshot
):
    log_in(page, clinician.username)
    page.get_by_role("link", name="New visit").click()
    page.locator('input[name="label"]').fill("browser test")
    page.locator(RECORDING_INPUT).set_input_files(SHORT_VISIT)
    screenshot(page, "upload")
    page.get_by_role("button", name="Upload and process").click()

    expect(page).to_have_url(re.compile(r"/visits/\d+/$"))
    expect(page.get_by_text("Recording received; the pipeline has started.")).to_be_visible()
    status = page.locator("[data-visit-status]")
    # No worker yet: the run is certainly still waiting, so what follows is a live update.
    expect(status).to_have_text("queued")
    page.evaluate("window.__marker = 1")
    screenshot(page, "visit-live")

    cluster = start_cluster()
    try:
        expect(status).to_have_text("succeeded", timeout=FINISH_MS)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- cluster log ---\n{cluster.log()}") from exc

    assert page.evaluate("window.__marker") == 1, "the page was reloaded"
    expect(page.get_by_role("heading", name="Transcript")).to_be_visible()
    expect(page.locator("[data-segment-id]").first).to_be_visible()
    assert Visit.objects.get().label == "browser test"


def test_a_text_file_is_refused_with_its_message_on_the_upload_page(
    live_server, page: Page, clinician
):
    log_in(page, clinician.username)
    page.goto("/visits/new/")
    page.locator(RECORDING_INPUT).set_input_files(
        files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not a recording\n"}]
    )
    page.get_by_role("button", name="Upload and process").click()

    expect(page).to_have_url(re.compile(r"/visits/new/$"))
    expect(page.locator(".errorlist")).to_contain_text(
        "“.txt” is not a recording format we accept."
    )
    assert not Visit.objects.exists()


def test_another_clinicians_visit_answers_404(live_server, page: Page, clinician, other_clinician):
    theirs = visit_create(clinician=other_clinician, recording=SHORT_VISIT, label="not yours")
    log_in(page, clinician.username)

    for url in (f"/visits/{theirs.pk}/", f"/visits/{theirs.pk}/recording/"):
        response = page.goto(url)
        assert response is not None
        assert response.status == 404, url
        expect(page.get_by_text("not yours")).to_have_count(0)


@pytest.mark.cluster
def test_a_citation_highlights_its_segment_and_seeks_the_recording(
    live_server, start_cluster, page: Page, clinician, screenshot
):
    visit = processed_on(start_cluster(), clinician)

    log_in(page, clinician.username)
    page.goto(f"/visits/{visit.pk}/")
    expect(page.locator("[data-visit-status]")).to_have_text("succeeded")
    cites = page.locator("a[data-cite]")
    expect(cites.first).to_be_visible()

    # Follow the citation of the latest segment: seeking to it proves more than to 0 s.
    starts = {
        segment.get_attribute("data-segment-id"): float(segment.get_attribute("data-start"))
        for segment in page.locator("[data-segment-id]").all()
    }
    cited = [cite.get_attribute("data-cite") for cite in cites.all()]
    assert set(cited) <= set(starts), "a citation points at no transcript segment"
    target = max(cited, key=lambda segment_id: starts[segment_id])
    start = starts[target]
    assert start > 0.5, f"every citation is at the very start ({starts})"

    page.locator(f'a[data-cite="{target}"]').first.click()

    segment = page.locator(f'[data-segment-id="{target}"]')
    expect(segment).to_have_attribute("aria-current", "true")
    try:
        page.wait_for_function(
            """([start]) => {
                const audio = document.getElementById("recording-player");
                return audio !== null && Math.abs(audio.currentTime - start) <= 0.5;
            }""",
            arg=[start],
            timeout=10_000,
        )
    except PlaywrightTimeoutError:
        now = page.evaluate('document.getElementById("recording-player")?.currentTime')
        pytest.fail(f"the player is at {now} s, not at segment {target}'s start ({start} s)")

    # The page scrolls (smoothly) to the evidence: wait until the line is on screen and not
    # under the sticky player, which also makes the picture below show it.
    page.wait_for_function(
        """([id]) => {
            const line = document.querySelector(`[data-segment-id="${id}"]`);
            const box = line.getBoundingClientRect();
            const seen = document.elementFromPoint(box.left + 5, box.top + box.height / 2);
            return seen !== null && line.contains(seen);
        }""",
        arg=[target],
        timeout=10_000,
    )
    screenshot(page, "visit-finished")
