"""An accessibility pass over the clinician's pages with axe-core, run inside the page.

axe.min.js comes with the `axe-playwright-python` package (a dev dependency): nothing is
fetched. A violation of impact "serious" or "critical" fails the test; milder ones are printed
(run with -s) so that they are seen without blocking."""

from __future__ import annotations

from axe_playwright_python.sync_playwright import Axe
from playwright.sync_api import Page, expect

from pipeline.core.states import RunStatus
from tests.browser.test_workspace import log_in
from tests.conftest import SHORT_VISIT, requires_postgres
from visits.services import visit_create, visit_start

pytestmark = requires_postgres

BLOCKING = ("serious", "critical")


def assert_accessible(page: Page, what: str) -> None:
    violations = Axe().run(page).response["violations"]
    report = [
        f"- {violation['id']} ({violation['impact']}): {violation['help']}\n"
        + "".join(f"    {', '.join(map(str, node['target']))}\n" for node in violation["nodes"])
        for violation in violations
    ]
    if report:
        print(f"axe on {what}:\n{''.join(report)}")
    blocking = [
        line
        for line, violation in zip(report, violations, strict=True)
        if violation["impact"] in BLOCKING
    ]
    assert not blocking, f"axe on {what}: serious or critical violations:\n{''.join(blocking)}"


def test_the_login_page_is_accessible(live_server, page: Page):
    page.goto("/accounts/login/")
    expect(page.get_by_role("button", name="Log in")).to_be_visible()
    assert_accessible(page, "the login page")

    # And as it answers a wrong password: its error text is checked too (contrast).
    page.get_by_label("Username").fill("nobody")
    page.get_by_label("Password").fill("wrong")
    page.get_by_role("button", name="Log in").click()
    expect(page.locator(".errorlist")).to_be_visible()
    assert_accessible(page, "the login page with an error")


def test_the_workspace_pages_are_accessible(live_server, page: Page, clinician):
    # One finished visit serves the list and the visit page. It is processed here, inline (the
    # same stages a worker runs, without a cluster's start-up): the pages only read it.
    visit = visit_create(clinician=clinician, recording=SHORT_VISIT, label="axe check")
    visit_start(visit=visit, inline=True)
    visit.current_run.refresh_from_db()
    assert visit.current_run.status == RunStatus.SUCCEEDED

    log_in(page, clinician.username)
    expect(page.get_by_role("link", name=f"#{visit.pk}")).to_be_visible()
    assert_accessible(page, "the visit list")

    page.goto("/visits/new/")
    record = page.get_by_role("button", name="Record", exact=True)
    expect(record).to_be_visible()
    assert_accessible(page, "the upload page")

    # The same page showing both of its errors: a refused file, and the recorder's message
    # (this browser has no microphone at all).
    page.locator('input[type="file"][name="recording"]').set_input_files(
        files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not a recording\n"}]
    )
    page.get_by_role("button", name="Upload and process").click()
    expect(page.locator(".errorlist")).to_be_visible()
    record.click()
    expect(page.locator("[data-recorder-message]")).to_have_class("error")
    assert_accessible(page, "the upload page with its errors")

    page.goto(f"/visits/{visit.pk}/")
    expect(page.locator("[data-visit-status]")).to_have_text("succeeded")
    expect(page.locator("[data-segment-id]").first).to_be_visible()
    assert_accessible(page, "a finished visit's page")
