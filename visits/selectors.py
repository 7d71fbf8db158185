"""Reads of the clinical domain: what a page, a command or the API shows about visits."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Literal

from django.conf import settings
from django.db.models import QuerySet
from django.utils import timezone
from pydantic import BaseModel
from textstat.textstat import textstat as readability

from pipeline import (
    OperationRefused,
    StageStatus,
    audit_entries_of_subject,
    output_of,
    run_stages,
    runs_of_subject,
    runs_with_stages,
    stage_units_done,
    usage_totals,
)
from visits.models import AccessEvent, NoteVersion, RecordingConsent, Visit
from visits.refs import DELIVER, INGEST, NOTE, NOTE_DELIVERY, SUMMARIZE, TRANSCRIBE
from visits.schemas import (
    ChartNote,
    ClinicalSummary,
    Doubt,
    NoteItem,
    NoteOutput,
    Segment,
    SummarizeOutput,
    Transcript,
)
from visits.speech.transcription import transcript_load

if TYPE_CHECKING:
    from django.contrib.auth.models import User

    from pipeline import Stage

logger = logging.getLogger(__name__)


def visits_visible_to(user: User) -> QuerySet[Visit]:
    """A clinician sees their own visits; staff with the view permission see all."""
    visits = Visit.objects.select_related(
        "current_run", "clinician", "consent", "consent__attested_by"
    )
    if user.is_staff and user.has_perm("visits.view_visit"):
        return visits
    return visits.filter(clinician=user)


def visits_of_clinician(user: User) -> QuerySet[Visit]:
    return Visit.objects.filter(clinician=user).select_related("current_run", "consent")


def visit_stages(visit: Visit) -> list[Stage]:
    """The stages of the visit's current run, with their attempts."""
    return run_stages(visit.current_run_id) if visit.current_run_id else []


def visit_transcript(stages: list[Stage]) -> Transcript | None:
    transcribed = output_of(stages, TRANSCRIBE)
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
    ingested = output_of(stages, INGEST)
    if (
        running is None
        or ingested is None
        or ingested.duration_seconds is None  # live: its length is known only at Stop
        or not running.progress_total
    ):
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


class SegmentDoc(Segment):
    # "clinician", "patient", "other" where the model could tell from the words; "unknown"
    # otherwise (always, with the offline engine: it does not guess).
    speaker: str = "unknown"


class TranscriptDoc(BaseModel):
    text: str
    segments: list[SegmentDoc]


class DeliveryDoc(BaseModel):
    """One signed version's delivery to the EHR (the `note_delivery` workflow)."""

    version: int
    run: int
    status: str
    error: str | None
    location: str | None  # where the EHR filed it, once delivered
    attempts: list[AttemptDoc]


class ConsentDoc(BaseModel):
    method: str
    attested_by: str | None
    attested_at: str
    others_present: str
    status: Literal["active", "withdrawn"]
    withdrawn_at: str | None


def consent_doc(visit: Visit) -> ConsentDoc | None:
    consent: RecordingConsent | None = getattr(visit, "consent", None)
    if consent is None:  # a visit from before consent was recorded
        return None
    return ConsentDoc(
        method=consent.method,
        attested_by=consent.attested_by.get_username() if consent.attested_by else None,
        attested_at=consent.attested_at.isoformat(),
        others_present=consent.others_present,
        status="active" if consent.active else "withdrawn",
        withdrawn_at=_iso(consent.withdrawn_at),
    )


RecordingState = Literal["recording", "interrupted", "stopped", "withdrawn"]


def recording_state(visit: Visit, *, now: datetime | None = None) -> RecordingState | None:
    """Where a browser recording stands (None for an upload): *interrupted* when its pieces
    stopped coming `RECORDING_IDLE_MINUTES` ago and it was not stopped."""
    if visit.recording_session is None:
        return None
    consent = getattr(visit, "consent", None)
    if consent is not None and not consent.active:
        return "withdrawn"
    if visit.recording_stopped_at is not None:
        return "stopped"
    last = visit.pieces_received_at or visit.created_at
    idle = ((now or timezone.now()) - last).total_seconds()
    return "interrupted" if idle > settings.RECORDING_IDLE_MINUTES * 60 else "recording"


class LiveTranscript(BaseModel):
    """What a visit being recorded has transcribed so far (the finished chunks, in order)."""

    state: RecordingState | None
    segments: list[Segment]
    heard_seconds: float  # the end of the last segment heard


def live_transcript(visit: Visit) -> LiveTranscript:
    chunks = stage_units_done(visit.current_run_id, TRANSCRIBE) if visit.current_run_id else []
    segments = [
        Segment(id=i, **raw) for i, raw in enumerate(raw for chunk in chunks for raw in chunk)
    ]
    return LiveTranscript(
        state=recording_state(visit),
        segments=segments,
        heard_seconds=segments[-1].end if segments else 0.0,
    )


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
    # Statements of the summary its cited segments do not bear out (flagged, not facts).
    summary_unsupported: list[Doubt]
    # The latest version of the note (the clinician's edits included), and where it stands.
    note: ChartNote | None
    note_version: int | None
    note_status: str | None
    engine: str | None
    deliveries: list[DeliveryDoc]
    # When the visit's PHI was deleted under the retention policy (`visits.privacy.retention`).
    purged_at: str | None = None
    consent: ConsentDoc | None = None
    recording: RecordingState | None = None  # a browser recording's state; None for an upload

    def summary_lines(self) -> list[str]:
        """A short human reading: the visit's state, each stage, what it cost."""
        lines = [f"visit {self.visit}: {self.status}"]
        if self.purged_at is not None:
            lines.append(
                f"  purged on {self.purged_at[:10]} under the retention policy: recording, "
                "transcript and summary deleted"
            )
        for stage in self.stages:
            line = f"  {stage.name:<11} {stage.status:<10} {len(stage.attempts)} attempt(s)"
            if stage.error:
                line += f"  {stage.error}"
            lines.append(line)
        if self.note_version is not None:
            lines.append(f"  note: version {self.note_version}, {self.note_status}")
        if self.recording is not None:
            lines.append(f"  recording: {self.recording}")
        if self.consent is not None:
            lines.append(
                f"  consent: {self.consent.method}, {self.consent.status}"
                + (f" since {self.consent.withdrawn_at[:16]}" if self.consent.withdrawn_at else "")
            )
        for delivery in self.deliveries:
            lines.append(
                f"  delivery of version {delivery.version}: {delivery.status}, "
                f"{len(delivery.attempts)} attempt(s)"
                + (f"  {delivery.error}" if delivery.error else "")
            )
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


def _attempt_docs(stage: Stage) -> list[AttemptDoc]:
    return [
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
    ]


def visit_deliveries(visit: Visit) -> list[DeliveryDoc]:
    """Each delivery of a signed version to the EHR, oldest first, with its attempts."""
    documents = []
    for run in runs_with_stages(visit.subject, workflow=NOTE_DELIVERY):
        stage = run.stages.all()[0]
        delivered = output_of([stage], DELIVER)
        documents.append(
            DeliveryDoc(
                version=run.input["version"],
                run=run.pk,
                status=run.status,
                error=stage.error_message or None,
                location=delivered.location if delivered else None,
                attempts=_attempt_docs(stage),
            )
        )
    return documents


def visit_status_document(
    visit: Visit,
    stages: list[Stage] | None = None,
    history: list[NoteEntry] | None = None,
) -> VisitStatus:
    """The status document; pass the current run's `stages` and the note's `history` when
    already loaded."""
    stages = visit_stages(visit) if stages is None else stages
    history = note_history(visit) if history is None else history
    latest_note = history[-1] if history else None
    # A purged visit's files are gone and its summary and draft are empty placeholders: its
    # stages are shown, their content is not read.
    content = stages if visit.purged_at is None else []
    transcript = visit_transcript(content)
    summarized = output_of(content, SUMMARIZE)
    noted = output_of(content, NOTE)
    latest: NoteOutput | SummarizeOutput | None = noted or summarized
    # One lookup per segment: this document is rebuilt on every poll of the visit page.
    speakers = summarized.summary.speakers_by_segment() if summarized else {}
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
                attempts=_attempt_docs(stage),
            )
            for stage in stages
        ],
        usage=visit_usage(visit),
        transcript=(
            TranscriptDoc(
                text=transcript.text,
                segments=[
                    SegmentDoc(**segment.model_dump(), speaker=speakers.get(segment.id, "unknown"))
                    for segment in transcript.segments
                ],
            )
            if transcript
            else None
        ),
        summary=summarized.summary if summarized else None,
        summary_unsupported=summarized.unsupported if summarized else [],
        note=latest_note.version.note if latest_note else None,
        note_version=latest_note.version.number if latest_note else None,
        note_status=latest_note.status if latest_note else None,
        engine=latest.engine if latest else None,
        deliveries=visit_deliveries(visit),
        purged_at=_iso(visit.purged_at),
        consent=consent_doc(visit),
        recording=recording_state(visit),
    )


# --- note versions ---------------------------------------------------------------------------

NoteStatus = Literal["draft", "earlier draft", "signed", "superseded"]


@dataclass(frozen=True)
class NoteEntry:
    """A note version in its history: where it stands among the others."""

    version: NoteVersion
    status: NoteStatus  # the latest unsigned version is the draft; earlier ones stay readable
    amends: int | None  # for a signed version: the signed version it replaced
    superseded_by: int | None  # for a signed version: the signed version that replaced it
    is_latest: bool

    @property
    def fhir_status(self) -> str:
        """The FHIR Composition status: preliminary, final, or amended."""
        if not self.version.is_signed:
            return "preliminary"
        return "amended" if self.amends is not None else "final"


def note_history(visit: Visit) -> list[NoteEntry]:
    """Every version of the visit's note, oldest first (one query)."""
    versions = list(
        NoteVersion.objects.filter(visit=visit)
        .select_related("author", "signed_by")
        .order_by("number")
    )
    for version in versions:
        version.visit = visit  # spare a query per version for what every reader needs
    signed = [v.number for v in versions if v.is_signed]
    entries = []
    for version in versions:
        is_latest = version is versions[-1]
        if version.is_signed:
            place = signed.index(version.number)
            later = signed[place + 1] if place + 1 < len(signed) else None
            entries.append(
                NoteEntry(
                    version=version,
                    status="signed" if later is None else "superseded",
                    amends=signed[place - 1] if place else None,
                    superseded_by=later,
                    is_latest=is_latest,
                )
            )
        else:
            status: NoteStatus = "draft" if is_latest else "earlier draft"
            entries.append(NoteEntry(version, status, None, None, is_latest))
    return entries


def note_entry_pick(visit: Visit, number: str | int | None) -> NoteEntry:
    """Version `number` of the visit's note, or the latest when None or empty."""
    history = note_history(visit)
    if number in (None, ""):
        found = history[-1] if history else None
    else:
        found = next((e for e in history if str(e.version.number) == str(number).strip()), None)
    if found is None:
        have = ", ".join(str(e.version.number) for e in history) or "none yet"
        raise OperationRefused(
            f"Visit {visit.pk} has no note version {number or '(latest)'}; versions: {have}."
        )
    return found


def visit_note_signed(visit: Visit) -> bool:
    """Whether any version of the visit's note is signed (the chart holds it)."""
    return NoteVersion.objects.filter(visit=visit, signed_at__isnull=False).exists()


# --- the visit's history ---------------------------------------------------------------------


@dataclass(frozen=True)
class HistoryEvent:
    at: datetime
    who: str
    what: str
    detail: str = ""


_TIMELINE_ACCESS = (
    AccessEvent.Action.EXPORT_FHIR,
    AccessEvent.Action.PRINT_SUMMARY,
    AccessEvent.Action.CHANGE_REFS,
    AccessEvent.Action.PURGE,
)


def visit_history(visit: Visit) -> list[HistoryEvent]:
    """Everything that happened to a visit, newest first: the upload, each run, what operators
    did, each note version (drafted, edited, amended, signed), each delivery attempt to the
    EHR, and each time the note left the application (exported, printed)."""
    clinician = visit.clinician.get_username()
    events = [HistoryEvent(visit.created_at, clinician, "uploaded the recording")]
    for run in runs_of_subject(visit.subject):
        if run.workflow == NOTE_DELIVERY:
            continue
        started = (
            "started the pipeline"
            if run.forked_from_id is None
            else (f"re-ran from {run.fork_stage} (run {run.pk}, from run {run.forked_from_id})")
        )
        events.append(HistoryEvent(run.created_at, "pipeline", started))
        if run.finished_at:
            events.append(HistoryEvent(run.finished_at, "pipeline", f"run {run.pk} {run.status}"))
    for entry in audit_entries_of_subject(visit.subject):
        what = f"{entry.get_action_display().lower()} on run {entry.run_id}"
        events.append(HistoryEvent(entry.created_at, entry.actor_label, what, entry.reason))
    for note in note_history(visit):
        version = note.version
        author = version.author.get_username() if version.author else version.engine
        events.append(
            HistoryEvent(
                version.created_at,
                author,
                f"wrote version {version.number} of the note ({version.get_kind_display()})",
                version.reason if version.kind == NoteVersion.Kind.AMENDMENT else "",
            )
        )
        if version.signed_at and version.signed_by:
            what = f"signed version {version.number}"
            if note.amends is not None:
                what += f", amending version {note.amends}"
            events.append(
                HistoryEvent(
                    version.signed_at, version.signed_by.get_username(), what, version.reason
                )
            )
    for delivery in visit_deliveries(visit):
        for attempt in delivery.attempts:
            if attempt.finished_at is None:
                continue
            outcome = "delivered" if attempt.status == "succeeded" else "failed to deliver"
            events.append(
                HistoryEvent(
                    datetime.fromisoformat(attempt.finished_at),
                    "EHR delivery",
                    f"{outcome} version {delivery.version} (attempt {attempt.number})",
                    attempt.error or "",
                )
            )
    # Looks at the visit are the privacy officer's (the admin's audit trail); edits, signatures
    # and operations are told above from their own records.
    for access in visit.access_events.filter(action__in=_TIMELINE_ACCESS):
        what = access.get_action_display()
        if access.note_version:
            what += f" (version {access.note_version})"
        if access.outcome == AccessEvent.Outcome.REFUSED:
            what += ": refused"
        events.append(HistoryEvent(access.created_at, access.actor_label, what, access.detail))
    return sorted(events, key=lambda event: event.at, reverse=True)


# --- the after-visit summary for the patient -------------------------------------------------

_CHANGED = re.compile(r"\b(increase|decrease|start|stop|change|switch|prescrib\w*|new)\b", re.I)
_COME_BACK = re.compile(
    r"\b(follow[- ]up|come back|return|see you|next visit|in \w+ (days?|weeks?|months?))\b", re.I
)


@dataclass(frozen=True)
class AfterVisitSummary:
    """The note in the patient's words, under the four questions a patient asks."""

    found: list[NoteItem]  # what we found
    changed: list[NoteItem]  # what we changed
    to_do: list[NoteItem]  # what to do
    come_back: list[NoteItem]  # when to come back
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
    # A patient-summary line that repeats a plan line ("What we agreed: follow up in two
    # weeks") is said once, under the plan's heading.
    found = [
        item
        for item in note.patient_summary
        if not any(line.text.lower() in item.text.lower() for line in plan)
    ]
    text = " ".join(item.text for item in [*found, *changed, *to_do, *come_back])
    return AfterVisitSummary(
        found=found,
        changed=changed,
        to_do=to_do,
        come_back=come_back,
        reading_grade=float(readability.flesch_kincaid_grade(text)) if text.strip() else 0.0,
        signed_by=version.signed_by.get_username() if version.signed_by else None,
    )
