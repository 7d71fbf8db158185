"""Reads of the clinical domain: what a page, a command or the API shows about visits."""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from django.contrib.auth.models import AbstractBaseUser
from django.db.models import Prefetch, QuerySet, Sum
from django.db.models.functions import Coalesce

from pipeline.models import Attempt, LLMCall, Stage, StageStatus
from visits.models import NoteSignature, Visit
from visits.schemas import Transcript
from visits.stages import transcript_load

logger = logging.getLogger(__name__)


def visits_visible_to(user: AbstractBaseUser) -> QuerySet[Visit]:
    """A clinician sees their own visits; staff with the view permission see all."""
    visits = Visit.objects.select_related("current_run", "clinician")
    if user.is_staff and user.has_perm("visits.view_visit"):
        return visits
    return visits.filter(clinician=user)


def visits_of_clinician(user: AbstractBaseUser) -> QuerySet[Visit]:
    return Visit.objects.filter(clinician=user).select_related("current_run")


def visit_stages(visit: Visit) -> list[Stage]:
    if visit.current_run_id is None:
        return []
    attempts = Prefetch("attempts", queryset=Attempt.objects.order_by("number"))
    return list(
        Stage.objects.filter(run_id=visit.current_run_id)
        .select_related("reused_from")
        .prefetch_related(attempts)
        .order_by("position")
    )


def visit_usage(visit: Visit) -> dict[str, Any]:
    """Everything ever spent on the visit, over all its runs and attempts."""
    totals = LLMCall.objects.filter(stage__run__subject=visit.subject).aggregate(
        input_tokens=Coalesce(Sum("input_tokens"), 0),
        output_tokens=Coalesce(Sum("output_tokens"), 0),
        cost_usd=Coalesce(Sum("cost_usd"), Decimal(0)),
    )
    audio = Attempt.objects.filter(stage__run__subject=visit.subject).aggregate(
        audio_seconds=Coalesce(Sum("audio_seconds"), 0.0)
    )
    return {
        "input_tokens": int(totals["input_tokens"]),
        "output_tokens": int(totals["output_tokens"]),
        "cost_usd": float(totals["cost_usd"]),
        "audio_seconds": round(float(audio["audio_seconds"]), 3),
    }


def _output(stages: list[Stage], name: str) -> dict[str, Any] | None:
    for stage in stages:
        if stage.name == name and stage.status == StageStatus.SUCCEEDED:
            return stage.output
    return None


def visit_transcript(stages: list[Stage]) -> Transcript | None:
    output = _output(stages, "transcribe")
    if output is None:
        return None
    try:
        return transcript_load(output)
    except OSError:
        # Storage lost a committed artifact: show the rest of the visit, and tell operators.
        logger.error("the transcript file of a succeeded transcribe stage is missing")
        return None


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


def visit_status_document(visit: Visit) -> dict[str, Any]:
    """The status document of `visit_status --json` (and `process_recording --json`)."""
    stages = visit_stages(visit)
    transcript = visit_transcript(stages)
    summary = _output(stages, "summarize")
    note = _output(stages, "note")
    return {
        "visit": visit.pk,
        "status": visit.current_run.status if visit.current_run else "queued",
        "run": visit.current_run_id,
        "stages": [
            {
                "name": stage.name,
                "status": stage.status,
                "error": stage.error_message or None,
                "reused_from_run": stage.reused_from.run_id if stage.reused_from else None,
                "attempts": [
                    {
                        "number": attempt.number,
                        "status": attempt.status,
                        "started_at": _iso(attempt.started_at),
                        "finished_at": _iso(attempt.finished_at),
                        "error": attempt.error_message or None,
                        "error_code": attempt.error_code or None,
                        "worker": attempt.worker,
                        "input_tokens": attempt.input_tokens,
                        "output_tokens": attempt.output_tokens,
                        "cost_usd": float(attempt.cost_usd),
                    }
                    for attempt in stage.attempts.all()
                ],
            }
            for stage in stages
        ],
        "usage": visit_usage(visit),
        "transcript": (
            {
                "text": transcript.text,
                "segments": [segment.model_dump() for segment in transcript.segments],
            }
            if transcript
            else None
        ),
        "summary": summary["summary"] if summary else None,
        "note": note["note"] if note else None,
        "engine": (note or summary or {}).get("engine"),
    }


@dataclass(frozen=True)
class NoteVersion:
    run_id: int
    created_at: Any
    engine: str
    note: dict[str, Any]
    signed_by: str | None
    is_current: bool

    def lines(self) -> list[str]:
        """The note as text lines, for reading and for comparing versions."""
        return note_lines(self.note)


def note_lines(note: dict[str, Any]) -> list[str]:
    lines = []
    for section, items in note["soap"].items():
        lines.append(f"{section.upper()}")
        lines.extend(f"  - {item['text']}" for item in items)
    lines.append("PATIENT SUMMARY")
    lines.extend(f"  - {item['text']}" for item in note["patient_summary"])
    return lines


def visit_note_versions(visit: Visit) -> list[NoteVersion]:
    """Every note the visit's runs produced, oldest first, with who signed which."""
    stages = (
        Stage.objects.filter(run__subject=visit.subject, name="note", status=StageStatus.SUCCEEDED)
        .select_related("run")
        .order_by("run__created_at", "run_id")
    )
    signed = dict(
        NoteSignature.objects.filter(visit=visit).values_list("run_id", "signed_by__username")
    )
    return [
        NoteVersion(
            run_id=stage.run_id,
            created_at=stage.run.created_at,
            engine=stage.output.get("engine", ""),
            note=stage.output["note"],
            signed_by=signed.get(stage.run_id),
            is_current=stage.run_id == visit.current_run_id,
        )
        for stage in stages
    ]


def note_diff(older: NoteVersion, newer: NoteVersion) -> list[tuple[str, str]]:
    """Line-by-line difference: ('-', line) removed, ('+', line) added, (' ', line) kept."""
    return [
        (line[0], line[2:])
        for line in difflib.ndiff(older.lines(), newer.lines())
        if line[0] in "-+ "
    ]
