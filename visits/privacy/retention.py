"""Retention: a visit's PHI is deleted a while after its note is signed (or, never signed, after
its upload), and the visit, its signed note, the ledger's figures and the audit trail stay.

What goes: the recording, every artifact of every run of the visit (the decoded audio, the
transcript), the transcription's chunk checkpoints, the bodies of the model's answers, and the
stage outputs that hold the visit's content (summary and draft note, replaced by an empty one
of the same model so every reader still loads them). What stays: the `Visit` row (marked
`purged_at`), every `NoteVersion` (the chart's record, its seal intact), the tokens and cost of
every call and attempt, the runs and their stages' figures, and the audit trail, which gains a
`purge` row.

A re-run's stages reuse the outputs, and so the artifacts, of the run they were forked from.
All runs of one visit are purged together; a file that a run of a visit not purged (or of a
subject that is no visit) still needs is kept, and the purge says so."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path, PurePath
from typing import TYPE_CHECKING

from django.conf import settings
from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.db.models import Max, Q, QuerySet
from django.utils import timezone
from pydantic import BaseModel

from pipeline import (
    OperationRefused,
    artifact_path,
    run_input_users,
    run_input_values,
    runs_erasable,
    runs_erase,
    runs_of_subject,
    stage_dirs_delete,
    stage_dirs_of_subject,
)
from visits.models import Visit, visit_id_of_subject, visit_subject
from visits.privacy.audit import Action, audit_record
from visits.schemas import ClinicalSummary, NoteOutput, PostVisitNote, SOAPNote, SummarizeOutput

if TYPE_CHECKING:
    from django.contrib.auth.models import AnonymousUser, User

logger = logging.getLogger(__name__)

# Purging is deleting, in the admin's terms: whoever may delete a visit may purge one.
PURGE_PERMISSION = "visits.delete_visit"

PURGED_ENGINE = "purged under the retention policy"

# What each stage's output becomes. Those below hold references and figures only (where the
# audio and transcript were, durations, counts, the EHR's receipt): no PHI, and the pages and
# the comparison still read them. A stage named in neither list has its output set to null.
OUTPUTS_WITHOUT_PHI = frozenset({"ingest", "transcribe", "deliver"})
# The visit's content, replaced by the same model left empty: every reader still loads it.
PURGED_OUTPUTS: dict[str, BaseModel] = {
    "summarize": SummarizeOutput(
        engine=PURGED_ENGINE,
        summary=ClinicalSummary(
            chief_complaint=None,
            history=[],
            medications=[],
            allergies=[],
            vitals=[],
            assessment=[],
            plan=[],
        ),
    ),
    "note": NoteOutput(
        engine=PURGED_ENGINE,
        note=PostVisitNote(
            soap=SOAPNote(subjective=[], objective=[], assessment=[], plan=[]),
            patient_summary=[],
        ),
    ),
}


class VisitAlreadyPurged(OperationRefused):
    code = "visit_already_purged"


# --- which visits are due ---------------------------------------------------------------------


def visits_due_for_purge(now: datetime) -> QuerySet[Visit]:
    """Visits not yet purged whose latest signature is `RETENTION_DAYS` old, or which were
    never signed and were uploaded `RETENTION_UNSIGNED_DAYS` ago; oldest first. An amendment
    signed later starts the clock again: someone was still working on the visit."""
    signed_before = now - timedelta(days=settings.RETENTION_DAYS)
    uploaded_before = now - timedelta(days=settings.RETENTION_UNSIGNED_DAYS)
    return (
        Visit.objects.filter(purged_at__isnull=True)
        .annotate(last_signed_at=Max("note_versions__signed_at"))
        .filter(
            Q(last_signed_at__lte=signed_before)
            | Q(last_signed_at__isnull=True, created_at__lte=uploaded_before)
        )
        .order_by("created_at", "id")
    )


# --- what a purge deletes -----------------------------------------------------------------------


@dataclass(frozen=True)
class PurgePlan:
    """What purging one visit deletes, and which of its files it keeps for another visit."""

    visit_id: int
    run_ids: list[int]
    recordings: list[Path]
    artifacts: list[Path]  # stage folders (every attempt's files) under the runs' folders
    kept: list[Path]  # files and folders a run of another, live visit still needs
    checkpoints: int
    llm_calls: int
    outputs: int

    @property
    def files(self) -> list[Path]:
        """Everything the purge deletes from disk."""
        return [*self.recordings, *self.artifacts]

    def summary(self) -> str:
        """One line for the command's output and the audit row."""
        line = (
            f"{len(self.run_ids)} run(s); {len(self.files)} file(s) or folder(s), "
            f"{self.checkpoints} checkpoint(s), {self.llm_calls} model answer(s), "
            f"{self.outputs} stage output(s)"
        )
        if self.kept:
            line += f"; {len(self.kept)} kept for other visits"
        return line


def _live_subjects(subjects: Iterable[str]) -> set[str]:
    """Those of `subjects` whose runs still count: any subject but a purged visit's."""
    subjects = set(subjects)
    visit_ids = {
        visit_id_of_subject(subject) for subject in subjects if subject.startswith("visit:")
    }
    purged = Visit.objects.filter(pk__in=visit_ids, purged_at__isnull=False)
    return subjects - {visit_subject(pk) for pk in purged.values_list("pk", flat=True)}


def _recordings(visit: Visit) -> tuple[set[Path], set[Path]]:
    """(to delete, to keep): the visit's recording, unless a live visit or run uses it too."""
    names = {visit.recording.name} if visit.recording.name else set()
    names |= run_input_values(visit.subject, "recording")
    shared = set(
        Visit.objects.exclude(pk=visit.pk)
        .filter(recording__in=names, purged_at__isnull=True)
        .values_list("recording", flat=True)
    )
    used = run_input_users("recording", names, other_than=visit.subject)
    live = _live_subjects(subject for _, subject in used)
    shared |= {name for name, subject in used if subject in live}
    # A browser recording's pieces, kept for its live transcription: no other visit has them.
    names |= run_input_values(visit.subject, "recording_pieces")
    delete = {artifact_path(name) for name in names - shared}
    keep = {artifact_path(name) for name in names & shared}
    return {path for path in delete if path.exists()}, {path for path in keep if path.exists()}


def visit_purge_plan(visit: Visit) -> PurgePlan:
    """What `visit_purge` would delete now (for --dry-run, and what it then does)."""
    run_ids = [run.pk for run in runs_of_subject(visit.subject)]
    artifacts, kept_artifacts = stage_dirs_of_subject(visit.subject, subjects_live=_live_subjects)
    recordings, kept_recordings = _recordings(visit)
    erasable = runs_erasable(run_ids, outputs_kept=sorted(OUTPUTS_WITHOUT_PHI))
    return PurgePlan(
        visit_id=visit.pk,
        run_ids=run_ids,
        recordings=sorted(recordings),
        artifacts=sorted(artifacts),
        kept=sorted(kept_recordings | kept_artifacts),
        checkpoints=erasable.checkpoints,
        llm_calls=erasable.llm_answers,
        outputs=erasable.outputs,
    )


# --- the purge ----------------------------------------------------------------------------------


def _purger_check(actor: User | AnonymousUser | None, visit: Visit) -> None:
    """A command line or the schedule (actor None), or a user who may delete visits; anyone
    else is refused, and the refusal is recorded."""
    if actor is None or (actor.is_active and actor.is_staff and actor.has_perm(PURGE_PERMISSION)):
        return
    refusal = "Purging a visit needs the permission to delete visits."
    audit_record(Action.PURGE, user=actor, visit=visit, refused=refusal)
    raise PermissionDenied(refusal)


def _delete(plan: PurgePlan) -> None:
    for path in plan.recordings:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    stage_dirs_delete(plan.artifacts)


def visit_purge(
    visit: Visit,
    *,
    reason: str,
    actor: User | AnonymousUser | None = None,
    permitted: bool = False,
) -> PurgePlan:
    """Delete the visit's PHI now and mark it purged; record it in the audit trail.
    `permitted` says the caller has already decided that `actor` may (the clinician whose
    patient withdrew consent, `privacy.consent`).

    The rows change in one transaction, and the files are deleted last inside it: if a
    deletion fails, nothing is marked and the next purge tries the whole visit again."""
    if not permitted:
        _purger_check(actor, visit)
    if not reason.strip():
        raise OperationRefused("Say why the visit is purged: the audit trail keeps the reason.")
    with transaction.atomic():
        locked = Visit.objects.select_for_update().get(pk=visit.pk)
        if locked.purged_at is not None:
            raise VisitAlreadyPurged(
                f"Visit {visit.pk} was purged on {locked.purged_at:%Y-%m-%d}; nothing is left "
                "to delete."
            )
        plan = visit_purge_plan(locked)
        # A run still going would read what is about to go; none should be, this late.
        runs_erase(
            run_ids=plan.run_ids,
            outputs_kept=sorted(OUTPUTS_WITHOUT_PHI),
            placeholders={
                name: placeholder.model_dump(mode="json")
                for name, placeholder in PURGED_OUTPUTS.items()
            },
            reason="the visit was purged (retention policy)",
        )
        locked.purged_at = timezone.now()
        locked.recording.name = ""
        # The uploaded file's own name may name the patient: only its extension stays.
        locked.recording_name = f"(purged){PurePath(locked.recording_name).suffix[:8]}"
        locked.save(update_fields=["purged_at", "recording", "recording_name"])
        audit_record(Action.PURGE, user=actor, visit=locked, reason=reason, detail=plan.summary())
        _delete(plan)
    visit.purged_at, visit.recording.name = locked.purged_at, ""
    visit.recording_name = locked.recording_name
    return plan


def visits_purge_due(
    *, reason: str = "retention policy (scheduled purge)", dry_run: bool = False
) -> list[PurgePlan]:
    """Purge every visit that is due (with `dry_run`, only say what would go): the plans of
    those purged. A visit that fails is logged and left, unchanged, for the next purge."""
    plans = []
    for visit in visits_due_for_purge(timezone.now()):
        if dry_run:
            plans.append(visit_purge_plan(visit))
            continue
        try:
            plans.append(visit_purge(visit, reason=reason))
        except (OSError, OperationRefused):
            logger.exception("purging visit %s failed; the next purge tries again", visit.pk)
    return plans


def purge_task() -> int:
    """The daily schedule's django-q2 task. It returns a count, which django-q2 keeps."""
    return len(visits_purge_due())
