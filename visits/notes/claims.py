"""Never invent a value: every number and every drug a summary or note states must be in the
transcript segments it cites.

A wrong vital sign in a chart is worse than none. Whatever drafted the document (a language
model, the offline rules), its medications, doses, frequencies, vital signs, allergies and
any other line carrying a number or a drug name are checked against the words of the segments
they cite, both read through `spoken_numbers` ("one forty two over ninety" is 142/90). A drug
name that is in no lexicon is flagged for review as well, rather than charted as a drug.

The checks are pure; the stages decide what a finding costs (a repair request to the model,
then a flag the clinician must resolve before the note can be signed or exported).
"""

from __future__ import annotations

import re
from functools import cache

from pydantic import BaseModel

from visits.notes.spoken_numbers import numbers_in
from visits.schemas import (
    ClinicalSummary,
    Doubt,
    Finding,
    Medication,
    PostVisitNote,
    Transcript,
    Vital,
)

_WORD = re.compile(r"[a-z][a-z0-9-]*")


@cache
def _drug_finder():  # type: ignore[no-untyped-def]
    # Imported on first use: loading its dictionary takes seconds, and only the LLM stages and
    # the note's checks need it.
    from drug_named_entity_recognition import find_drugs

    return find_drugs


def drugs_in(text: str) -> set[str]:
    """Canonical names of the drugs `text` names (brand names map to the generic)."""
    words = _WORD.findall(text.lower())
    return {found[0]["name"].lower() for found in _drug_finder()(words)}


def _cited_text(segment_ids: list[int], transcript: Transcript) -> str:
    by_id = {segment.id: segment.text for segment in transcript.segments}
    return " ".join(by_id.get(i, "") for i in segment_ids)


def line_problems(stated: str, segment_ids: list[int], transcript: Transcript) -> list[str]:
    """What `stated` says that its cited segments do not: numbers, then drugs."""
    cited = _cited_text(segment_ids, transcript)
    heard = set(numbers_in(cited))
    missing = [n for n in numbers_in(stated) if n not in heard]
    problems = []
    if missing:
        problems.append(
            f"the number{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
            f"{'are' if len(missing) > 1 else 'is'} not in its cited segments {segment_ids}"
        )
    unheard = drugs_in(stated) - drugs_in(cited)
    if unheard:
        problems.append(f"{', '.join(sorted(unheard))} is not named in its cited segments")
    return problems


def _medication_problems(medication: Medication, transcript: Transcript) -> list[str]:
    stated = " ".join(filter(None, [medication.dose, medication.frequency]))
    problems = line_problems(stated, medication.segment_ids, transcript)
    named = drugs_in(medication.name)
    if named and not named & drugs_in(_cited_text(medication.segment_ids, transcript)):
        problems.append(f"{medication.name} is not named in its cited segments")
    return problems


def _unknown_drugs(summary: ClinicalSummary) -> list[Doubt]:
    return [
        Doubt(
            where=f"medications[{i}]",
            text=medication.name,
            why=f"“{medication.name}” is not a drug we know: check the recording",
            kind="unknown_drug",
        )
        for i, medication in enumerate(summary.medications)
        if not drugs_in(medication.name)
    ]


def _item_problems(item: BaseModel, transcript: Transcript) -> list[str]:
    if isinstance(item, Medication):
        return _medication_problems(item, transcript)
    if isinstance(item, Vital):
        return line_problems(item.value, item.segment_ids, transcript)
    if isinstance(item, Finding):
        return line_problems(item.text, item.segment_ids, transcript)
    raise TypeError(f"not an evidenced item: {type(item).__name__}")


def _label(item: BaseModel) -> str:
    if isinstance(item, Medication):
        return " ".join(filter(None, [item.name, item.dose, item.frequency]))
    if isinstance(item, Vital):
        return f"{item.name}: {item.value}"
    return item.text if isinstance(item, Finding) else ""


def summary_unsupported(summary: ClinicalSummary, transcript: Transcript) -> list[Doubt]:
    """The summary's statements that their cited segments do not bear out, and its
    medications no lexicon knows."""
    items: list[tuple[str, BaseModel]] = []
    if summary.chief_complaint is not None:
        items.append(("chief_complaint", summary.chief_complaint))
    for field in ("history", "medications", "allergies", "vitals", "assessment", "plan"):
        items += [(f"{field}[{i}]", item) for i, item in enumerate(getattr(summary, field))]
    unsupported = [
        Doubt(where=where, text=_label(item), why="; ".join(problems))
        for where, item in items
        if (problems := _item_problems(item, transcript))
    ]
    return unsupported + _unknown_drugs(summary)


def note_unsupported(note: PostVisitNote, transcript: Transcript) -> list[Doubt]:
    """The note's lines that their cited segments do not bear out."""
    items = [
        (f"soap.{section}[{i}]", item)
        for section, found in note.soap.sections()
        for i, item in enumerate(found)
    ]
    items += [(f"patient_summary[{i}]", item) for i, item in enumerate(note.patient_summary)]
    return [
        Doubt(where=where, text=item.text, why="; ".join(problems))
        for where, item in items
        if (problems := _item_problems(item, transcript))
    ]


def unsupported_as_repair(doubts: list[Doubt]) -> str | None:
    """The words of a repair request about the unsupported statements among `doubts`, or
    None if there is nothing to repair (an unknown drug name is for a person to check)."""
    found = [doubt for doubt in doubts if doubt.kind == "unsupported"]
    if not found:
        return None
    listed = "; ".join(str(item) for item in found[:20])
    return (
        f"{len(found)} statement(s) are not supported by the segments they cite: {listed}. "
        "State only numbers and drug names that were said in the cited segments; quote the "
        "segment instead of guessing a value, or leave the statement out"
    )
