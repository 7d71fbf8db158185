"""The note's life after the pipeline: the model's draft becomes version 1, each save by the
clinician makes the next version, signing seals one, and a change after signing is an
amendment with a reason, signed again. Earlier versions are never changed.

Every write takes the visit's row lock first, so that two tabs (or a re-run finishing while
the clinician saves) are put in order: the second save sees that the note moved on and is
refused in words (`NoteChanged`), never silently overwriting the first.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from django.conf import settings
from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.db.models import Max
from django.utils import timezone

from pipeline import OperationRefused, stage_output
from visits.models import NoteVersion, Visit, visit_id_of_subject
from visits.notes import claims
from visits.notes.delivery import delivery_start
from visits.privacy.audit import Action, audit_record
from visits.refs import TRANSCRIBE
from visits.schemas import (
    ITEM_MAX_CHARS,
    NOTE_PARTS,
    ChartNote,
    NoteItem,
    NoteOutput,
)
from visits.speech.transcription import transcript_load

if TYPE_CHECKING:
    from django.contrib.auth.models import User

    from pipeline import Run

AMENDMENT_REASON_MIN_CHARS = 5


class NoteChanged(OperationRefused):
    """The note moved on since the clinician opened it (another tab, another person, a re-run
    finishing): saving would silently undo that version."""

    code = "note_changed"

    def __init__(self, message: str, *, latest: NoteVersion) -> None:
        super().__init__(message)
        self.latest = latest


def _locked_visit(visit: Visit) -> Visit:
    return Visit.objects.select_for_update().get(pk=visit.pk)


def _latest_as_expected(
    visit: Visit, number: int, *, doing: str, otherwise: str
) -> tuple[Visit, NoteVersion]:
    """Lock the visit; its latest note version, which must be version `number` (the one the
    clinician was looking at), else `NoteChanged` saying who moved it on."""
    visit = _locked_visit(visit)
    latest = _latest(visit)
    if latest is None:
        raise OperationRefused(f"There is no note to {doing} yet: the pipeline has not made one.")
    if not latest.is_intact:
        raise OperationRefused(
            f"Version {latest.number} changed after it was signed, so it cannot be the base of "
            "a new version. Tell your privacy officer."
        )
    if latest.number != number:
        who = latest.author.get_username() if latest.author else "a re-run of the pipeline"
        raise NoteChanged(
            f"The note changed since you opened version {number}: version {latest.number} "
            f"was saved by {who} at {timezone.localtime(latest.created_at):%H:%M:%S}. " + otherwise,
            latest=latest,
        )
    return visit, latest


def _latest(visit: Visit) -> NoteVersion | None:
    return (
        NoteVersion.objects.filter(visit=visit)
        .select_related("author", "signed_by")
        .order_by("-number")
        .first()
    )


def _next_number(visit: Visit) -> int:
    highest = NoteVersion.objects.filter(visit=visit).aggregate(n=Max("number"))["n"]
    return (highest or 0) + 1


def note_draft_record(run: Run, output: NoteOutput) -> None:
    """The note stage's success hook: its draft becomes the visit's next note version, in the
    transaction that commits the stage (so a failed or discarded attempt leaves none)."""
    visit = _locked_visit(Visit(pk=visit_id_of_subject(run.subject)))
    NoteVersion.objects.create(
        visit=visit,
        number=_next_number(visit),
        kind=NoteVersion.Kind.DRAFT,
        run=run,
        engine=output.engine,
        content=ChartNote.from_draft(output.note, output.unsupported).model_dump(mode="json"),
    )


# --- edit --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ItemEdit:
    """What the clinician left of one line: `index` is the line's place in the version they
    edited (None for a line they added); an empty `text` removes the line; `confirmed` says
    they checked an unsupported line against the recording and stand by it."""

    index: int | None
    text: str
    confirmed: bool = False


# Problems of a reworded line against its evidence (empty: supported); see `visits.notes.claims`.
Recheck = Callable[[str, list[int]], list[str]]


def _owner(visit: Visit, user: User, doing: str) -> None:
    if visit.clinician_id != user.pk:
        raise PermissionDenied(f"Only the visit's clinician can {doing} its note.")


def _items_after(
    base: list[NoteItem], edits: list[ItemEdit], title: str, recheck: Recheck
) -> list[NoteItem]:
    items: list[NoteItem] = []
    for edit in edits:
        text = " ".join(edit.text.split())
        if not text:
            continue
        if len(text) > ITEM_MAX_CHARS:
            raise OperationRefused(
                f"A line of {title} has {len(text)} characters; the most is {ITEM_MAX_CHARS}. "
                "Split it into shorter lines."
            )
        if edit.index is None:
            items.append(NoteItem(text=text, source="clinician"))
            continue
        if not 0 <= edit.index < len(base):
            raise OperationRefused(
                f"A line of {title} refers to a line the note does not have; reload the note."
            )
        item = base[edit.index]
        if text != " ".join(item.text.split()):  # the form gives back spacing it was sent
            # A reworded line is checked again against the evidence it keeps: correcting a
            # value to what was said makes it supported; a value that was not said must be
            # confirmed by the clinician.
            problems = recheck(text, item.segment_ids) if item.segment_ids else []
            item = item.model_copy(
                update={
                    "text": text,
                    "edited": True,
                    "supported": not problems,
                    "doubt": "; ".join(problems),
                    "confirmed": False,
                }
            )
        if edit.confirmed and not item.supported:
            item = item.model_copy(update={"confirmed": True})
        items.append(item)
    return items


def note_apply_edits(
    note: ChartNote, edits: dict[str, list[ItemEdit]], recheck: Recheck
) -> ChartNote:
    """The note as the clinician left it; a part without edits is unchanged."""
    return ChartNote.from_parts(
        {
            key: _items_after(note.part(key), edits[key], title, recheck)
            if key in edits
            else note.part(key)
            for key, title in NOTE_PARTS
        }
    )


def note_recheck(version: NoteVersion) -> Recheck:
    """How lines of `version` are checked against the transcript of the run they came from."""
    transcribed = stage_output(version.run, TRANSCRIBE)
    try:
        transcript = transcript_load(transcribed) if transcribed else None
    except OSError:
        transcript = None

    def recheck(text: str, segment_ids: list[int]) -> list[str]:
        if transcript is None:
            return ["its transcript could not be read to check it"]
        return claims.line_problems(text, segment_ids, transcript)

    return recheck


def note_save(
    *,
    visit: Visit,
    clinician: User,
    base_number: int,
    edits: dict[str, list[ItemEdit]],
    reason: str = "",
) -> NoteVersion:
    """Save the clinician's edit of version `base_number` as the next version.

    Refused when the note has moved on since that version (`NoteChanged`), when nothing
    changed, and, for a change to a signed note (an amendment), without a reason."""
    _owner(visit, clinician, "edit")
    with transaction.atomic():
        visit, base = _latest_as_expected(
            visit,
            base_number,
            doing="edit",
            otherwise="Your changes were not saved; they are still in the form below. Compare "
            "them with the newer version, then save again.",
        )
        note = base.note
        content = note_apply_edits(note, edits, note_recheck(base))
        if content == note:
            raise OperationRefused("Nothing changed, so no new version was saved.")
        reason = " ".join(reason.split())
        amending = base.is_signed
        if amending and len(reason) < AMENDMENT_REASON_MIN_CHARS:
            raise OperationRefused(
                f"Version {base.number} is signed: changing it is an amendment, which needs a "
                "reason (for example “corrected the dose of metformin”)."
            )
        version = NoteVersion.objects.create(
            visit=visit,
            number=base.number + 1,
            kind=NoteVersion.Kind.AMENDMENT if amending else NoteVersion.Kind.EDIT,
            run=base.run,
            based_on=base,
            engine=base.engine,
            content=content.model_dump(mode="json"),
            author=clinician,
            reason=reason if amending else "",
        )
        audit_record(
            Action.AMEND_NOTE if amending else Action.EDIT_NOTE,
            user=clinician,
            visit=visit,
            version=version.number,
            reason=version.reason,
        )
        return version


# --- sign --------------------------------------------------------------------------------------


def note_sign(*, visit: Visit, clinician: User, number: int, reason: str = "") -> NoteVersion:
    """The clinician signs version `number`, which must be the latest: its content is sealed
    (SHA-256) and it becomes what the chart holds. Signing after an earlier signature is an
    amendment and needs a reason, given now or when the change was saved. With
    `FHIR_BASE_URL` set, the signed version is then delivered to the EHR."""
    _owner(visit, clinician, "sign")
    with transaction.atomic():
        visit, version = _latest_as_expected(
            visit, number, doing="sign", otherwise="Nothing was signed: read that version first."
        )
        if version.is_signed:
            raise OperationRefused(f"Version {number} of the note is already signed.")
        unresolved = version.note.unsupported()
        if unresolved:
            listed = "; ".join(f"{title}: “{item.text}”" for title, item in unresolved[:5])
            raise OperationRefused(
                f"{len(unresolved)} line(s) state a number or drug their evidence does not show "
                f"({listed}). Edit the note to correct, confirm or remove them, then sign."
            )
        signed_before = NoteVersion.objects.filter(visit=visit, signed_at__isnull=False).exists()
        reason = " ".join(reason.split()) or version.reason
        if signed_before and len(reason) < AMENDMENT_REASON_MIN_CHARS:
            raise OperationRefused(
                "An earlier version is signed, so signing this one amends the chart: say why."
            )
        version.reason = reason if signed_before else version.reason
        version.signed_by = clinician
        version.signed_at = timezone.now()
        version.content_sha256 = version.seal()
        version.save(update_fields=["reason", "signed_by", "signed_at", "content_sha256"])
        audit_record(
            Action.SIGN_NOTE,
            user=clinician,
            visit=visit,
            version=version.number,
            reason=version.reason if signed_before else "",
        )
        if settings.FHIR_BASE_URL:
            delivery_start(version)
    return version


# --- compare -----------------------------------------------------------------------------------

Mark = Literal["same", "added", "removed", "changed"]


@dataclass(frozen=True)
class LineDiff:
    mark: Mark
    # (op, text) runs: "=" kept, "-" removed, "+" added; word-level for a changed line.
    words: list[tuple[str, str]]


@dataclass(frozen=True)
class PartDiff:
    title: str
    lines: list[LineDiff]

    @property
    def changed(self) -> bool:
        return any(line.mark != "same" for line in self.lines)


def _word_diff(old: str, new: str) -> list[tuple[str, str]]:
    a, b = old.split(), new.split()
    runs: list[tuple[str, str]] = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if op == "equal":
            runs.append(("=", " ".join(a[i1:i2])))
            continue
        if i2 > i1:
            runs.append(("-", " ".join(a[i1:i2])))
        if j2 > j1:
            runs.append(("+", " ".join(b[j1:j2])))
    return runs


def _part_diff(old: list[str], new: list[str]) -> list[LineDiff]:
    lines: list[LineDiff] = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=old, b=new, autojunk=False).get_opcodes():
        if op == "equal":
            lines += [LineDiff("same", [("=", text)]) for text in old[i1:i2]]
            continue
        # A replaced block pairs lines in order (word-level); what is left over was removed
        # or added whole.
        paired = min(i2 - i1, j2 - j1) if op == "replace" else 0
        for k in range(paired):
            lines.append(LineDiff("changed", _word_diff(old[i1 + k], new[j1 + k])))
        lines += [LineDiff("removed", [("-", text)]) for text in old[i1 + paired : i2]]
        lines += [LineDiff("added", [("+", text)]) for text in new[j1 + paired : j2]]
    return lines


def note_diff(older: ChartNote, newer: ChartNote) -> list[PartDiff]:
    """The difference between two versions, part by part; word by word where a line changed."""
    return [
        PartDiff(
            title,
            _part_diff([i.text for i in older.part(key)], [i.text for i in newer.part(key)]),
        )
        for key, title, _ in older.parts()
    ]
