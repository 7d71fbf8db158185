"""The offline engine: a deterministic, rule-based stand-in for the LLM.

It lets a machine with no key and no internet run the whole product. It is not a clinical
model: it picks transcript sentences by keywords and copies them, so everything it says is a
quotation with its evidence. Its output is labelled as such wherever it is shown."""

from __future__ import annotations

import re
from collections.abc import Iterable

from visits.schemas import (
    ClinicalSummary,
    Finding,
    Medication,
    PostVisitNote,
    Segment,
    SOAPNote,
    Transcript,
    Vital,
)

ENGINE_LABEL = "offline engine (keyword rules, no language model)"

_COMPLAINT = re.compile(
    r"\b(pain|ache|aches|headache|headaches|cough|fever|hurts?|sore|dizzy|tired|nausea|"
    r"rash|swelling|bleeding|brings you in)\b",
    re.I,
)
_HISTORY = re.compile(r"\b(since|ago|weeks?|days?|months?|years?|started|worse|better)\b", re.I)
_ALLERGY = re.compile(r"\ballerg", re.I)
_MEDICATION = re.compile(
    r"\b(?P<name>[a-z][a-z-]{2,})\s*,?\s+(?:for\s+)?(?P<amount>\d+(?:\.\d+)?)\s*"
    r"(?P<unit>mg|milligrams?|mcg|micrograms?|units?|ml)\b",
    re.I,
)
_FREQUENCY = re.compile(
    r"\b(once|twice|three times|four times)\s+(a|per)\s+day\b|\b(daily|every morning|"
    r"at night|every \w+ hours)\b",
    re.I,
)
_BLOOD_PRESSURE = re.compile(r"\b(\d{2,3})\s*(?:over|/)\s*(\d{2,3})\b", re.I)
_OTHER_VITALS = re.compile(
    r"\b(heart rate|pulse|temperature|oxygen|weight)\b\D{0,20}(\d+(?:\.\d+)?)", re.I
)
_ASSESSMENT = re.compile(
    r"\b(i think|likely|probably|diagnos\w*|looks like|consistent with|is high|is low)\b", re.I
)
_PLAN = re.compile(
    r"\b(we will|i will|increase|decrease|start|stop|prescrib\w*|follow up|come back|"
    r"recommend|order|schedule|refer)\b",
    re.I,
)
_NOT_A_DRUG = {"take", "about", "with", "for", "and", "the", "than", "only"}


def _matching(segments: Iterable[Segment], pattern: re.Pattern[str]) -> list[Finding]:
    return [Finding(text=s.text, segment_ids=[s.id]) for s in segments if pattern.search(s.text)]


def summarize(transcript: Transcript) -> ClinicalSummary:
    segments = transcript.segments
    complaints = _matching(segments, _COMPLAINT)
    medications = []
    for segment in segments:
        for match in _MEDICATION.finditer(segment.text):
            if match["name"].lower() in _NOT_A_DRUG:
                continue
            frequency = _FREQUENCY.search(segment.text[match.end() :])
            medications.append(
                Medication(
                    name=match["name"],
                    dose=f"{match['amount']} {match['unit']}",
                    frequency=frequency.group(0) if frequency else None,
                    segment_ids=[segment.id],
                )
            )
    vitals = []
    for segment in segments:
        if "pressure" in segment.text.lower() and (bp := _BLOOD_PRESSURE.search(segment.text)):
            vitals.append(
                Vital(
                    name="blood pressure", value=f"{bp[1]}/{bp[2]} mmHg", segment_ids=[segment.id]
                )
            )
        vitals.extend(
            Vital(name=m[1].lower(), value=m[2], segment_ids=[segment.id])
            for m in _OTHER_VITALS.finditer(segment.text)
        )
    # A complaint is what the patient says in answer to the opening question, not the question.
    chief = next((f for f in complaints if "brings you in" not in f.text.lower()), None)
    return ClinicalSummary(
        chief_complaint=chief,
        history=[f for f in _matching(segments, _HISTORY) if chief is None or f != chief],
        medications=medications,
        allergies=_matching(segments, _ALLERGY),
        vitals=vitals,
        assessment=_matching(segments, _ASSESSMENT),
        plan=_matching(segments, _PLAN),
    )


def write_note(summary: ClinicalSummary) -> PostVisitNote:
    subjective = [summary.chief_complaint] if summary.chief_complaint else []
    subjective += summary.history
    subjective += [
        Finding(
            text=f"Takes {m.name}"
            + (f" {m.dose}" if m.dose else "")
            + (f" {m.frequency}" if m.frequency else "")
            + ".",
            segment_ids=m.segment_ids,
        )
        for m in summary.medications
    ]
    subjective += summary.allergies
    objective = [
        Finding(text=f"{v.name.capitalize()}: {v.value}.", segment_ids=v.segment_ids)
        for v in summary.vitals
    ]
    patient = []
    if summary.chief_complaint:
        patient.append(
            Finding(
                text=f"You came in because: {summary.chief_complaint.text}",
                segment_ids=summary.chief_complaint.segment_ids,
            )
        )
    patient += [
        Finding(text=f"What we agreed: {item.text}", segment_ids=item.segment_ids)
        for item in summary.plan
    ]
    return PostVisitNote(
        soap=SOAPNote(
            subjective=subjective,
            objective=objective,
            assessment=summary.assessment,
            plan=summary.plan,
        ),
        patient_summary=patient,
    )
