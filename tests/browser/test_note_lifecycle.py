"""The note's life in a real browser: the pipeline's draft is version 1; the clinician rewords,
removes and adds lines (version 2), compares the two, signs version 2 and watches it reach a
flaky EHR without a reload; then amends it with a reason (version 3), signs that too, prints
the patient's summary and downloads the amended FHIR document.

PostgreSQL only: a real django-q2 cluster makes the note and delivers the signed versions to
the loopback FHIR server (`fhir_server`), whose address the cluster gets from the settings, so
the fixture is set up before any cluster starts."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from playwright.sync_api import Locator, Page, expect

from tests.browser.test_workspace import log_in, processed_on
from tests.conftest import SHORT_VISIT, requires_postgres
from visits.services import visit_create

pytestmark = requires_postgres

DELIVERY_MS = 60_000  # two 503s, then a 201: well under a second of backoff at 1/100 scale
LINE = re.compile(r"^(?P<part>[a-z_]+)-(?P<index>\d+)$")
ADDED = "Recheck blood pressure at the follow-up visit in two weeks."
REASON = "corrected the wording after talking to the patient"


def note_lines(page: Page) -> list[dict[str, object]]:
    """The edit form's lines, in order: field name, text, and the evidence it cites."""
    return page.locator("form.note-edit .note-line").evaluate_all(
        """lines => lines.map(line => {
            const area = line.querySelector("textarea");
            return {
                name: area.name,
                text: area.value,
                cites: [...line.querySelectorAll("a[data-cite]")].map(a => a.dataset.cite),
            };
        })"""
    )


def reworded(text: str) -> str:
    """The same line with its last word replaced: a word-level change (<del> and <ins>)."""
    words = text.split()
    return " ".join([*words[:-1], "(confirmed", "with", "the", "patient)."])


def version_row(page: Page, number: int) -> Locator:
    return page.locator(f'#versions tr[data-note-version="{number}"]')


@pytest.mark.cluster
def test_edit_compare_sign_deliver_then_amend(
    live_server, fhir_server, start_cluster, page: Page, clinician, screenshot
):
    fhir_server.script("503", "503")  # the EHR is down for the first two POSTs
    first = start_cluster()
    visit = processed_on(first, clinician, label="note lifecycle")
    # No worker while version 2 is signed: its delivery certainly waits, so what the page shows
    # after the next cluster starts is a live update.
    first.kill()

    log_in(page, clinician.username)
    page.goto(f"/visits/{visit.pk}/")
    note = page.locator("#note")
    expect(note.get_by_role("heading", level=2).first).to_contain_text("version 1")

    # --- edit version 1: reword a cited line, remove the next, add one --------------------
    note.get_by_role("link", name="Edit", exact=True).click()
    expect(page.get_by_role("heading", name=f"Edit the note · visit #{visit.pk}")).to_be_visible()
    lines = note_lines(page)
    by_part: dict[str, list[dict[str, object]]] = {}
    for line in lines:
        match = LINE.match(str(line["name"]))
        assert match, line
        by_part.setdefault(match["part"], []).append(line)
    part = next(
        (key for key, items in by_part.items() if len(items) >= 2 and items[0]["cites"]), None
    )
    assert part, f"no part of the draft has two lines, the first cited: {lines}"
    kept, removed = by_part[part][0], by_part[part][1]
    new_text = reworded(str(kept["text"]))
    page.locator(f'textarea[name="{kept["name"]}"]').fill(new_text)
    page.locator(f'input[name="{removed["name"]}-remove"]').check()
    page.locator(f'textarea[name="{part}-new"]').fill(ADDED)
    page.locator(f'textarea[name="{kept["name"]}"]').scroll_into_view_if_needed()
    screenshot(page, "note-edit")
    page.get_by_role("button", name="Save as version 2").click()

    expect(page).to_have_url(f"{live_server.url}/visits/{visit.pk}/")
    expect(page.locator(".messages")).to_contain_text("Saved as version 2.")
    expect(note.get_by_role("heading", level=2).first).to_contain_text("version 2")
    added = note.locator("li", has_text=ADDED)
    expect(added).to_have_count(1)
    expect(added.locator(".tag")).to_have_text("clinician-entered")
    expect(added.locator("a[data-cite]")).to_have_count(0)
    edited = note.locator("li", has_text=new_text)
    expect(edited).to_have_count(1)
    expect(edited.locator(".tag")).to_have_text("edited")
    assert [a.get_attribute("data-cite") for a in edited.locator("a[data-cite]").all()] == kept[
        "cites"
    ], "the reworded line lost its evidence"
    expect(note.locator("li", has_text=str(removed["text"]))).to_have_count(0)

    # --- compare version 1 with version 2 -------------------------------------------------
    versions = page.locator("#versions")
    versions.get_by_label("older version").select_option("1")
    versions.get_by_label("newer version").select_option("2")
    versions.get_by_role("button", name="Compare").click()
    expect(page).to_have_url(re.compile(r"\?compare=1&to=2#versions$"))
    expect(versions.get_by_role("heading", name="Version 1 → version 2")).to_be_visible()
    diff = versions.locator(".note-diff")
    expect(diff.locator("li.diff-changed ins")).to_contain_text(["(confirmed with the patient)."])
    expect(diff.locator("li.diff-changed del")).to_have_count(1)
    expect(diff.locator("li.diff-removed del")).to_have_text([str(removed["text"])])
    expect(diff.locator("li.diff-added ins")).to_have_text([ADDED])
    versions.scroll_into_view_if_needed()
    screenshot(page, "note-versions")

    # --- sign version 2; watch the delivery succeed after two 503s, without a reload -------
    page.goto(f"/visits/{visit.pk}/")
    note.get_by_role("button", name="Sign version 2").click()
    expect(page.locator(".messages")).to_contain_text(
        "Version 2 signed. It is being sent to the EHR."
    )
    delivery = version_row(page, 2).locator("[data-delivery-status]")
    expect(delivery).to_have_attribute("data-delivery-status", "queued")
    page.evaluate("window.__marker = 1")

    second = start_cluster()
    try:
        expect(delivery).to_have_attribute("data-delivery-status", "succeeded", timeout=DELIVERY_MS)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- cluster log ---\n{second.log()}") from exc
    assert page.evaluate("window.__marker") == 1, "the page was reloaded"
    expect(page.locator(".refs details")).to_have_count(0)  # signed: the references are frozen
    expect(version_row(page, 2)).to_contain_text("3 attempts")
    expect(version_row(page, 2).locator("[data-note-status]")).to_have_attribute(
        "data-note-status", "signed"
    )
    page.locator("#versions").scroll_into_view_if_needed()
    screenshot(page, "note-delivered")
    identifier = f"visit-{visit.pk}-note-2"
    assert fhir_server.stored_identifiers() == [identifier]
    posts = [r for r in fhir_server.requests if r.method == "POST"]
    assert [(r.identifier, r.status) for r in posts] == [
        (identifier, 503),
        (identifier, 503),
        (identifier, 201),
    ]

    # --- amend: change a line of the patient's summary (or the edited part), with a reason --
    note.get_by_role("link", name="Amend", exact=True).click()
    expect(page.get_by_role("heading", name=f"Amend the note · visit #{visit.pk}")).to_be_visible()
    lines = note_lines(page)
    target = next(
        (line for line in lines if str(line["name"]).startswith("patient_summary-")),
        next(line for line in lines if line["name"] == kept["name"]),
    )
    amended_text = f"{target['text']} Call us if anything gets worse."
    page.locator(f'textarea[name="{target["name"]}"]').fill(amended_text)
    page.locator("#id_reason").fill(REASON)
    page.get_by_role("button", name="Save as version 3").click()
    expect(page.locator(".messages")).to_contain_text(
        "Saved as version 3. Sign it to file the amendment."
    )
    expect(note.locator(".banner")).to_contain_text("The chart holds version 2")
    note.get_by_role("button", name="Sign version 3").click()
    expect(page.locator(".messages")).to_contain_text("Version 3 signed.")

    expect(version_row(page, 3).locator("[data-delivery-status]")).to_have_attribute(
        "data-delivery-status", "succeeded", timeout=DELIVERY_MS
    )
    expect(version_row(page, 3).locator("[data-note-status]")).to_have_attribute(
        "data-note-status", "signed"
    )
    expect(version_row(page, 3)).to_contain_text(REASON)
    expect(version_row(page, 2).locator("[data-note-status]")).to_have_attribute(
        "data-note-status", "superseded"
    )
    expect(version_row(page, 2)).to_contain_text("superseded by 3")
    expect(version_row(page, 3)).to_contain_text("amends 2")
    page.locator("#versions").scroll_into_view_if_needed()
    screenshot(page, "note-amended")
    assert fhir_server.stored_identifiers() == [identifier, f"visit-{visit.pk}-note-3"]

    # --- the patient's summary is signed, not a draft; the FHIR document is amended ---------
    note.get_by_role("link", name="Print it").click()
    expect(page.get_by_role("heading", name=re.compile(r"^Your visit"))).to_be_visible()
    expect(page.locator(".draft-mark")).to_have_count(0)
    expect(page.get_by_text("DRAFT")).to_have_count(0)
    expect(page.locator(".signature")).to_have_text(f"Signed by {clinician.username}.")
    if str(target["name"]).startswith("patient_summary-"):
        expect(page.get_by_text(amended_text)).to_be_visible()
    screenshot(page, "note-summary")

    page.get_by_role("link", name="← Back to the visit").click()
    with page.expect_download() as download_info:
        note.get_by_role("link", name="Download as FHIR (R4 document Bundle)").click()
    download = download_info.value
    assert download.suggested_filename == f"visit-{visit.pk}-note-3.fhir.json"
    bundle = json.loads(Path(download.path()).read_text())
    assert bundle["identifier"]["value"] == f"visit-{visit.pk}-note-3"
    composition = bundle["entry"][0]["resource"]
    assert composition["resourceType"] == "Composition"
    assert composition["status"] == "amended"
    kinds = list(visit.note_versions.order_by("number").values_list("kind", flat=True))
    assert kinds == ["draft", "edit", "amendment"]


def test_the_clinician_corrects_the_ehr_references_before_signing(
    live_server, page: Page, clinician
):
    visit = visit_create(clinician=clinician, recording=SHORT_VISIT, patient_ref="MRN-1")
    log_in(page, clinician.username)
    page.goto(f"/visits/{visit.pk}/")
    refs = page.locator(".refs")
    expect(refs).to_contain_text("MRN-1")

    refs.get_by_text("Change them").click(timeout=3_000)
    refs.get_by_label("Patient reference").fill("MRN-2")
    refs.get_by_role("button", name="Save references").click()

    expect(page.locator(".messages")).to_contain_text("References saved.")
    expect(page.locator(".refs")).to_contain_text("MRN-2")
    visit.refresh_from_db()
    assert visit.patient_ref == "MRN-2"
