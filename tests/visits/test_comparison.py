"""A model migration, measured: re-run a cohort under another model with a label, then compare
each new run with the one it was forked from."""

from __future__ import annotations

import csv
import io
import json

import pytest
from django.core.management import CommandError, call_command

from pipeline.core.models import Run
from tests.conftest import SHORT_VISIT
from tests.fakes.llm_server import default_content
from tests.support.audit import AUDITED
from visits.models import NoteVersion
from visits.notes.versions import note_sign
from visits.services import visit_create, visit_start

pytestmark = pytest.mark.django_db(transaction=True)


def by_model(body: dict) -> str:
    """gpt-4o writes one more plan line than gpt-4o-mini; both cite segment 0."""
    content = json.loads(default_content(body))
    if body["model"] == "gpt-4o" and "soap" in content:
        content["soap"]["plan"].append({"text": "Drink water.", "segment_ids": [0]})
    return json.dumps(content)


@pytest.fixture
def visits(clinician, llm_server):
    llm_server.responder = by_model
    made = []
    for _ in range(2):
        visit = visit_create(clinician=clinician, recording=SHORT_VISIT)
        visit_start(visit=visit, inline=True)
        visit.refresh_from_db()
        made.append(visit)
    note_sign(visit=made[0], clinician=clinician, number=1)
    return made


def run(*args: str) -> str:
    out = io.StringIO()
    call_command(*args, stdout=out, stderr=io.StringIO())
    return out.getvalue()


def test_a_cohort_re_run_under_another_model_is_compared_with_what_it_replaced(visits, llm_server):
    signed = NoteVersion.objects.get(visit=visits[0], number=1)
    ids = [arg for visit in visits for arg in ("--visit", str(visit.pk))]
    run("reprocess", *AUDITED, *ids, "--from-stage", "summarize", "--model", "gpt-4o", "--label",
        "try-4o", "--inline")  # fmt: skip

    forks = list(Run.objects.filter(label="try-4o").order_by("id"))
    assert [fork.input["llm_model"] for fork in forks] == ["gpt-4o", "gpt-4o"]
    assert {r.model for r in llm_server.requests[-4:]} == {"gpt-4o"}  # the new runs asked it
    # The signed version is untouched; the re-run added a draft made by the new model.
    assert NoteVersion.objects.get(pk=signed.pk).content_sha256 == signed.content_sha256
    assert NoteVersion.objects.get(visit=visits[0], number=2).engine == "gpt-4o"

    rows = list(csv.reader(io.StringIO(run("compare", "--label", "try-4o", "--csv"))))
    header, first, second, total = rows
    assert header[:7] == ["visit", "status", "old model", "new model", "added", "removed",
                          "changed"]  # fmt: skip
    for row, visit in ((first, visits[0]), (second, visits[1])):
        named = dict(zip(header, row, strict=True))
        assert named["visit"] == str(visit.pk) and named["status"] == "succeeded"
        assert (named["old model"], named["new model"]) == ("gpt-4o-mini", "gpt-4o")
        assert (named["added"], named["removed"], named["changed"]) == ("1", "0", "0")
        assert int(named["tokens old"]) > 0 and int(named["tokens new"]) > 0
        # gpt-4o costs more per token than gpt-4o-mini (fixtures/prices.json).
        assert float(named["$ new"]) > float(named["$ old"])
    totals = dict(zip(header, total, strict=True))
    assert totals["visit"] == "total (2)" and totals["added"] == "2"

    table = run("compare", "--label", "try-4o").splitlines()
    assert table[0].split()[:2] == ["visit", "status"] and table[-1].startswith("total (2)")


def test_a_model_without_a_price_is_refused_before_anything_runs(visits):
    with pytest.raises(CommandError, match="no price for “gpt-9”"):
        run("reprocess", *AUDITED, "--visit", str(visits[0].pk), "--from-stage", "summarize",
            "--model", "gpt-9", "--inline")  # fmt: skip
    assert not Run.objects.filter(forked_from__isnull=False).exists()


def test_model_and_label_need_a_re_run_and_compare_needs_a_known_label(visits):
    with pytest.raises(CommandError, match="give --from-stage"):
        run("reprocess", *AUDITED, "--visit", str(visits[0].pk), "--model", "gpt-4o")
    with pytest.raises(CommandError, match="No re-run carries the label “nope”"):
        run("compare", "--label", "nope")
