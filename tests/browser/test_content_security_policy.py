"""Every page works under the Content-Security-Policy, in a real browser: nothing it needs is
blocked (no inline script or style, no eval), and the pages that poll still poll.

A listener for `securitypolicyviolation`, installed before any page script runs, collects what
the browser refused; each page must leave it empty."""

from __future__ import annotations

from playwright.sync_api import Page, expect

from tests.browser.test_workspace import PASSWORD, log_in
from tests.conftest import SHORT_VISIT, requires_postgres
from visits.services import visit_create, visit_start

pytestmark = requires_postgres

COLLECT = """
window.__refused = [];
document.addEventListener("securitypolicyviolation", (event) => {
  const where = `${event.sourceFile}:${event.lineNumber}`;
  window.__refused.push(`${event.violatedDirective} ${event.blockedURI} ${where}`);
});
"""


def refused(page: Page) -> list[str]:
    return page.evaluate("window.__refused")


def test_every_page_works_under_the_policy_and_polling_still_polls(
    live_server, page: Page, clinician, django_user_model
):
    finished = visit_create(clinician=clinician, recording=SHORT_VISIT, label="finished")
    visit_start(visit=finished, inline=True)
    waiting = visit_create(clinician=clinician, recording=SHORT_VISIT, label="waiting")
    page.add_init_script(COLLECT)
    log_in(page, clinician.username)

    # The list and a visit still in the queue poll; the poll reaches the server.
    with page.expect_request(lambda r: "/visits/rows/" in r.url, timeout=10_000):
        pass
    assert refused(page) == [], "the visit list"
    page.goto(f"/visits/{waiting.pk}/")
    with page.expect_request(lambda r: f"/visits/{waiting.pk}/live/" in r.url, timeout=10_000):
        pass
    assert refused(page) == [], "a visit in the queue"

    for url in (
        f"/visits/{finished.pk}/",
        f"/visits/{finished.pk}/history/",
        f"/visits/{finished.pk}/note/1/",
        f"/visits/{finished.pk}/note/edit/",
        f"/visits/{finished.pk}/after-visit-summary/",
        "/visits/new/",
    ):
        response = page.goto(url)
        assert response is not None and response.status == 200, url
        assert "script-src 'self'" in response.headers["content-security-policy"]
        assert refused(page) == [], url
    # The recorder's page: its script runs (the Record button answers).
    page.get_by_role("button", name="Record", exact=True).click()
    expect(page.locator("[data-recorder-message]")).not_to_be_empty()
    assert refused(page) == [], "the recorder"

    django_user_model.objects.create_superuser(username="root_admin", password=PASSWORD)
    page.get_by_role("button", name="Log out").click()
    log_in(page, "root_admin")
    for url in (
        "/ops/dashboard/",
        "/admin/",
        "/admin/visits/visit/",
        f"/admin/visits/visit/{finished.pk}/change/",
        "/admin/visits/accessevent/",
        f"/admin/pipeline/run/{finished.current_run_id}/change/",
    ):
        response = page.goto(url)
        assert response is not None and response.status == 200, url
        assert refused(page) == [], url
