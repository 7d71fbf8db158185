"""The clinician's pages cost a fixed number of queries, however many visits there are.

The visit list with 50 visits runs the same queries as with 5; the visit page of a finished
visit (with re-runs, attempts and note versions) stays under a small bound. On failure pytest
prints the queries."""

from __future__ import annotations

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from pipeline.core import executor, store
from tests.conftest import SHORT_VISIT
from visits.models import Visit
from visits.services import visit_create, visit_rerun_from
from visits.stages import VISIT_WORKFLOW

# The finished visit runs the pipeline inline, whose heartbeat needs committed rows.
pytestmark = pytest.mark.django_db(transaction=True)

LIST_QUERIES = 3  # session, user, the visits with their runs
DETAIL_QUERIES = 9  # visit, stages, attempts, usage (2), note versions (2), session, user
AUDIT_WRITE = 1  # opening the page (not its polls) writes who looked into the audit trail


def add_visits(clinician, count: int) -> None:
    runs = [
        store.run_create(workflow=VISIT_WORKFLOW, subject=f"visit:bulk-{i}", input={})
        for i in range(count)
    ]
    Visit.objects.bulk_create(
        Visit(
            clinician=clinician,
            recording=f"recordings/{i}.mp3",
            recording_name=f"{i}.mp3",
            recording_bytes=1,
            current_run=run,
        )
        for i, run in enumerate(runs)
    )


def list_queries(client) -> int:
    with CaptureQueriesContext(connection) as queries:
        response = client.get(reverse("visits:list"))
    assert response.status_code == 200
    return len(queries)


def test_the_visit_list_does_not_grow_with_the_number_of_visits(client, clinician):
    client.force_login(clinician)
    add_visits(clinician, 5)
    with_five = list_queries(client)
    add_visits(clinician, 45)
    with_fifty = list_queries(client)
    assert with_fifty == with_five <= LIST_QUERIES
    assert Visit.objects.filter(clinician=clinician).count() == 50


def test_the_visit_page_of_a_finished_visit_with_a_rerun_is_bounded(
    client, clinician, django_assert_max_num_queries
):
    visit = visit_create(clinician=clinician, recording=SHORT_VISIT)
    executor.run_execute_inline(visit.current_run)
    visit_rerun_from(visit=visit, stage="summarize", actor=None, reason="test", inline=True)
    add_visits(clinician, 49)
    client.force_login(clinician)
    url = reverse("visits:detail", args=[visit.pk])

    with django_assert_max_num_queries(DETAIL_QUERIES + AUDIT_WRITE):
        response = client.get(url)

    assert response.status_code == 200
    page = response.content.decode()
    assert "SOAP note" in page and "Note versions" in page


def test_each_poll_of_a_live_visit_and_of_the_list_is_bounded(
    client, clinician, django_assert_max_num_queries
):
    add_visits(clinician, 50)
    visit = Visit.objects.filter(clinician=clinician).first()
    client.force_login(clinician)

    with django_assert_max_num_queries(DETAIL_QUERIES):
        fragment = client.get(reverse("visits:live", args=[visit.pk]), headers={"HX-Request": "1"})
    with django_assert_max_num_queries(LIST_QUERIES):
        rows = client.get(reverse("visits:list_rows"), headers={"HX-Request": "1"})

    assert fragment.status_code == rows.status_code == 200
    assert "hx-trigger" in fragment.content.decode()  # queued: the poll goes on
    assert rows.content.decode().count("data-visit-status") == 50
