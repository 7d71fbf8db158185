"""A model or prompt migration, measured: each run of a labelled batch (`reprocess
--from-stage ... --model NAME --label L`) against the run it was forked from.

Per visit: the note's lines added, removed and changed between the two drafts, the statements
each leaves unsupported, and the tokens and dollars of the stages the batch ran again (the
reused ones cost the new run nothing and are left out of both sides). Signed notes are not
touched by any of it: a re-run only adds a draft version.
"""

from __future__ import annotations

import csv
import io
from decimal import Decimal

from pydantic import BaseModel

from pipeline import (
    MODEL_INPUT,
    OperationRefused,
    Run,
    output_of,
    run_stages,
    runs_labelled,
    usage_totals,
)
from visits.models import visit_id_of_subject
from visits.notes.versions import note_diff
from visits.refs import NOTE, SUMMARIZE
from visits.schemas import ChartNote


class RunFigures(BaseModel):
    run: int
    model: str  # what drafted its note ("offline engine ..." without a model)
    unsupported: int  # statements flagged in its summary and note
    tokens: int
    cost_usd: Decimal


class VisitComparison(BaseModel):
    visit: int
    old: RunFigures
    new: RunFigures
    added: int  # note lines only the new draft has
    removed: int
    changed: int  # lines reworded (word-level)
    status: str  # the new run's status; a run that did not finish has no note to compare


class LabelComparison(BaseModel):
    label: str
    visits: list[VisitComparison]


def _figures(run: Run, stage_names: set[str]) -> tuple[RunFigures, ChartNote | None]:
    stages = run_stages(run.pk)
    noted = output_of(stages, NOTE)
    summarized = output_of(stages, SUMMARIZE)
    again = [s.pk for s in stages if s.name in stage_names and s.reused_from_id is None]
    spent = usage_totals(stage_ids=again, ledger_only=True)
    figures = RunFigures(
        run=run.pk,
        model=noted.engine if noted else str(run.input.get(MODEL_INPUT, "")),
        unsupported=sum(
            len(found.unsupported) for found in (summarized, noted) if found is not None
        ),
        tokens=spent.total_tokens,
        cost_usd=spent.cost_usd,
    )
    return figures, ChartNote.from_draft(noted.note) if noted else None


def label_compare(label: str) -> LabelComparison:
    """Every run labelled `label` against the run it was forked from."""
    runs = [run for run in runs_labelled(label) if run.forked_from is not None]
    if not runs:
        raise OperationRefused(
            f"No re-run carries the label “{label}”. Make one with `manage.py reprocess "
            f"--from-stage summarize --model NAME --label {label}`."
        )
    compared = []
    for run in runs:
        parent = run.forked_from
        assert parent is not None
        names = set(run.stages.filter(reused_from__isnull=True).values_list("name", flat=True))
        old, old_note = _figures(parent, names)
        new, new_note = _figures(run, names)
        marks: list[str] = []
        if old_note is not None and new_note is not None:
            marks = [line.mark for part in note_diff(old_note, new_note) for line in part.lines]
        compared.append(
            VisitComparison(
                visit=visit_id_of_subject(run.subject),
                old=old,
                new=new,
                added=marks.count("added"),
                removed=marks.count("removed"),
                changed=marks.count("changed"),
                status=run.status,
            )
        )
    return LabelComparison(label=label, visits=compared)


COLUMNS = (
    "visit", "status", "old model", "new model", "added", "removed", "changed",
    "unsupported old", "unsupported new", "tokens old", "tokens new", "$ old", "$ new",
)  # fmt: skip


def _row(first: str, status: str, old: RunFigures, new: RunFigures, diff: list[int]) -> list[str]:
    return [
        first, status, old.model, new.model, *map(str, diff), str(old.unsupported),
        str(new.unsupported), str(old.tokens), str(new.tokens), f"{old.cost_usd:.6f}",
        f"{new.cost_usd:.6f}",
    ]  # fmt: skip


def _summed(sides: list[RunFigures]) -> RunFigures:
    return RunFigures(
        run=0,
        model="",
        unsupported=sum(side.unsupported for side in sides),
        tokens=sum(side.tokens for side in sides),
        cost_usd=sum((side.cost_usd for side in sides), Decimal(0)),
    )


def comparison_rows(comparison: LabelComparison) -> list[list[str]]:
    """A row per visit, then the totals."""
    visits = comparison.visits
    rows = [
        _row(str(v.visit), v.status, v.old, v.new, [v.added, v.removed, v.changed]) for v in visits
    ]
    diff = [sum(v.added for v in visits), sum(v.removed for v in visits)]
    diff.append(sum(v.changed for v in visits))
    old, new = _summed([v.old for v in visits]), _summed([v.new for v in visits])
    rows.append(_row(f"total ({len(visits)})", "", old, new, diff))
    return rows


def comparison_csv(comparison: LabelComparison) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(COLUMNS)
    writer.writerows(comparison_rows(comparison))
    return out.getvalue()


def comparison_table(comparison: LabelComparison) -> list[str]:
    rows = [list(COLUMNS), *comparison_rows(comparison)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
