"""Reads of the clinical domain: what a page, a command or the API shows about visits."""

from __future__ import annotations

import difflib
import logging
import re
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from django.db.models import QuerySet
from django.utils import timezone
from pydantic import BaseModel
from textstat.textstat import textstat as readability

from pipeline.errors import OperationRefused
from pipeline.selectors import (
    output_of,
    run_stages,
    stage_outputs_of_subject,
    usage_totals,
)
from pipeline.states import StageStatus
from visits.models import NoteSignature, Visit
from visits.schemas import (
    ClinicalSummary,
    Finding,
    IngestOutput,
    NoteOutput,
    PostVisitNote,
    Segment,
    SummarizeOutput,
    TranscribeOutput,
    Transcript,
)
from visits.stages import transcript_load

if TYPE_CHECKING:
    from django.contrib.auth.models import User

    from pipeline.models import Stage

logger = logging.getLogger(__name__)


def visits_visible_to(user: User) -> QuerySet[Visit]:
    """A clinician sees their own visits; staff with the view permission see all."""
    visits = Visit.objects.select_related("current_run", "clinician")
    if user.is_staff and user.has_perm("visits.view_visit"):
        return visits
    return visits.filter(clinician=user)


def visits_of_clinician(user: User) -> QuerySet[Visit]:
    return Visit.objects.filter(clinician=user).select_related("current_run")


def visit_note_signed(visit: Visit) -> bool:
    """Whether the note of the visit's current run is signed (and so final)."""
    run_id = visit.current_run_id
    return run_id is not None and NoteSignature.objects.filter(run_id=run_id).exists()


def visit_stages(visit: Visit) -> list[Stage]:
    """The stages of the visit's current run, with their attempts."""
    return run_stages(visit.current_run_id) if visit.current_run_id else []


def visit_transcript(stages: list[Stage]) -> Transcript | None:
    transcribed = output_of(stages, "transcribe", TranscribeOutput)
    if transcribed is None:
        return None
    try:
        return transcript_load(transcribed)
    except OSError:
        # Storage lost a committed artifact: show the rest of the visit, and tell operators.
        logger.error("the transcript file of a succeeded transcribe stage is missing")
        return None


@dataclass(frozen=True)
class TranscriptionProgress:
    """How far a running transcription has got, from its chunk checkpoints."""

    chunks_done: int
    chunks_total: int
    audio_minutes_done: float
    audio_minutes_total: float
    seconds_left: float | None  # None until a chunk is done

    @property
    def percent(self) -> int:
        return round(100 * self.chunks_done / self.chunks_total) if self.chunks_total else 0


def transcription_progress(
    stages: list[Stage], *, now: datetime | None = None
) -> TranscriptionProgress | None:
    """The progress of the transcribe stage while it runs; None when it is not running."""
    running = next(
        (s for s in stages if s.name == "transcribe" and s.status == StageStatus.RUNNING), None
    )
    ingested = output_of(stages, "ingest", IngestOutput)
    if running is None or ingested is None or not running.progress_total:
        return None
    done, total = running.progress_done, running.progress_total
    attempts = list(running.attempts.all())
    started = attempts[-1].started_at if attempts else None
    minutes_total = ingested.duration_seconds / 60
    seconds_left = None
    if done and started is not None:
        elapsed = ((now or timezone.now()) - started).total_seconds()
        seconds_left = max(0.0, elapsed / done * (total - done))
    return TranscriptionProgress(
        chunks_done=done,
        chunks_total=total,
        audio_minutes_done=round(minutes_total * done / total, 1),
        audio_minutes_total=round(minutes_total, 1),
        seconds_left=seconds_left,
    )


# --- the status document of `visit_status --json` --------------------------------------------


class AttemptDoc(BaseModel):
    number: int
    status: str
    started_at: str | None
    finished_at: str | None
    error: str | None
    error_code: str | None
    worker: str
    input_tokens: int
    output_tokens: int
    cost_usd: float


class StageDoc(BaseModel):
    name: str
    status: str
    error: str | None
    # "permanent" or "exhausted" when the stage failed; None otherwise.
    failure: str | None
    reused_from_run: int | None
    attempts: list[AttemptDoc]


class UsageDoc(BaseModel):
    input_tokens: int
    output_tokens: int
    cost_usd: float
    audio_seconds: float


class TranscriptDoc(BaseModel):
    text: str
    segments: list[Segment]


class VisitStatus(BaseModel):
    """Everything about a visit's pipeline and its results, as one document."""

    visit: int
    patient_ref: str
    encounter_ref: str
    status: str
    run: int | None
    stages: list[StageDoc]
    usage: UsageDoc
    transcript: TranscriptDoc | None
    summary: ClinicalSummary | None
    note: PostVisitNote | None
    engine: str | None

    def summary_lines(self) -> list[str]:
        """A short human reading: the visit's state, each stage, what it cost."""
        lines = [f"visit {self.visit}: {self.status}"]
        for stage in self.stages:
            line = f"  {stage.name:<11} {stage.status:<10} {len(stage.attempts)} attempt(s)"
            if stage.error:
                line += f"  {stage.error}"
            lines.append(line)
        usage = self.usage
        lines.append(
            f"  usage: {usage.input_tokens} tokens in, {usage.output_tokens} out, "
            f"${usage.cost_usd:.4f}, {usage.audio_seconds:.1f} s of audio"
        )
        return lines


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def visit_usage(visit: Visit) -> UsageDoc:
    """Everything ever spent on the visit, over all its runs and attempts."""
    spent = usage_totals(subjects=[visit.subject])
    return UsageDoc(
        input_tokens=spent.input_tokens,
        output_tokens=spent.output_tokens,
        cost_usd=float(spent.cost_usd),
        audio_seconds=round(spent.audio_seconds, 3),
    )


def visit_status_document(visit: Visit, stages: list[Stage] | None = None) -> VisitStatus:
    """The status document; pass the current run's `stages` when already loaded."""
    stages = visit_stages(visit) if stages is None else stages
    transcript = visit_transcript(stages)
    summarized = output_of(stages, "summarize", SummarizeOutput)
    noted = output_of(stages, "note", NoteOutput)
    latest: NoteOutput | SummarizeOutput | None = noted or summarized
    return VisitStatus(
        visit=visit.pk,
        patient_ref=visit.patient_ref,
        encounter_ref=visit.encounter_ref,
        status=visit.current_run.status if visit.current_run else "queued",
        run=visit.current_run_id,
        stages=[
            StageDoc(
                name=stage.name,
                status=stage.status,
                error=stage.error_message or None,
                failure=stage.failure_kind or None,
                reused_from_run=stage.reused_from.run_id if stage.reused_from else None,
                attempts=[
                    AttemptDoc(
                        number=attempt.number,
                        status=attempt.status,
                        started_at=_iso(attempt.started_at),
                        finished_at=_iso(attempt.finished_at),
                        error=attempt.error_message or None,
                        error_code=attempt.error_code or None,
                        worker=attempt.worker,
                        input_tokens=attempt.input_tokens,
                        output_tokens=attempt.output_tokens,
                        cost_usd=float(attempt.cost_usd),
                    )
                    for attempt in stage.attempts.all()
                ],
            )
            for stage in stages
        ],
        usage=visit_usage(visit),
        transcript=(
            TranscriptDoc(text=transcript.text, segments=transcript.segments)
            if transcript
            else None
        ),
        summary=summarized.summary if summarized else None,
        note=noted.note if noted else None,
        engine=latest.engine if latest else None,
    )


# --- note versions ---------------------------------------------------------------------------


@dataclass(frozen=True)
class NoteVersion:
    number: int  # 1 for the visit's first note, in the order the runs were made
    run_id: int
    created_at: datetime
    engine: str
    note: PostVisitNote
    signed_by: str | None
    signed_at: datetime | None
    is_current: bool

    def lines(self) -> list[str]:
        """The note as text lines, for reading and for comparing versions."""
        return note_lines(self.note)


def note_lines(note: PostVisitNote) -> list[str]:
    lines = []
    for section, items in note.soap.sections():
        lines.append(section.upper())
        lines.extend(f"  - {item.text}" for item in items)
    lines.append("PATIENT SUMMARY")
    lines.extend(f"  - {item.text}" for item in note.patient_summary)
    return lines


def visit_note_versions(visit: Visit) -> list[NoteVersion]:
    """Every note the visit's runs produced, oldest first, with who signed which."""
    signed = {
        run_id: (username, signed_at)
        for run_id, username, signed_at in NoteSignature.objects.filter(visit=visit).values_list(
            "run_id", "signed_by__username", "signed_at"
        )
    }
    return [
        NoteVersion(
            number=number,
            run_id=version.run_id,
            created_at=version.created_at,
            engine=version.output.engine,
            note=version.output.note,
            signed_by=signed.get(version.run_id, (None, None))[0],
            signed_at=signed.get(version.run_id, (None, None))[1],
            is_current=version.run_id == visit.current_run_id,
        )
        for number, version in enumerate(
            stage_outputs_of_subject(visit.subject, "note", NoteOutput), start=1
        )
    ]


def note_version_pick(visit: Visit, number: str | int | None) -> NoteVersion:
    """Version `number` of the visit's note (1 is the first), or the current one when None."""
    versions = visit_note_versions(visit)
    if number in (None, ""):
        found = next((v for v in versions if v.is_current), None)
    else:
        found = next((v for v in versions if str(v.number) == str(number).strip()), None)
    if found is None:
        have = ", ".join(str(v.number) for v in versions) or "none yet"
        raise OperationRefused(
            f"Visit {visit.pk} has no note version {number or '(current)'}; versions: {have}."
        )
    return found


def note_diff(older: NoteVersion, newer: NoteVersion) -> list[tuple[str, str]]:
    """Line-by-line difference: ('-', line) removed, ('+', line) added, (' ', line) kept."""
    return [
        (line[0], line[2:])
        for line in difflib.ndiff(older.lines(), newer.lines())
        if line[0] in "-+ "
    ]


# --- the after-visit summary for the patient -------------------------------------------------

_CHANGED = re.compile(r"\b(increase|decrease|start|stop|change|switch|prescrib\w*|new)\b", re.I)
_COME_BACK = re.compile(
    r"\b(follow[- ]up|come back|return|see you|next visit|in \w+ (days?|weeks?|months?))\b", re.I
)


@dataclass(frozen=True)
class AfterVisitSummary:
    """The note in the patient's words, under the four questions a patient asks."""

    found: list[Finding]  # what we found
    changed: list[Finding]  # what we changed
    to_do: list[Finding]  # what to do
    come_back: list[Finding]  # when to come back
    reading_grade: float  # Flesch-Kincaid grade of all of it; aim at 8 or below
    signed_by: str | None  # None: a draft, printed as such

    @property
    def is_draft(self) -> bool:
        return self.signed_by is None


def after_visit_summary(version: NoteVersion) -> AfterVisitSummary:
    """Sort a note version's plain-language summary and plan under the patient's questions."""
    note = version.note
    plan = note.soap.plan
    come_back = [item for item in plan if _COME_BACK.search(item.text)]
    changed = [item for item in plan if item not in come_back and _CHANGED.search(item.text)]
    to_do = [item for item in plan if item not in come_back and item not in changed]
    found = list(note.patient_summary)
    text = " ".join(item.text for item in [*found, *changed, *to_do, *come_back])
    return AfterVisitSummary(
        found=found,
        changed=changed,
        to_do=to_do,
        come_back=come_back,
        reading_grade=float(readability.flesch_kincaid_grade(text)) if text.strip() else 0.0,
        signed_by=version.signed_by,
    )
