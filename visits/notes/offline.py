"""The offline engine: a deterministic, rule-based stand-in for the LLM.

It lets a machine with no key and no internet run the whole product. It is not a clinical
model: it picks transcript sentences by keywords and copies them, so everything it says is a
quotation with its evidence. It extracts a value (a dose, a vital sign) only where the sentence
says it plainly, read with its spoken numbers as digits; where a value is ambiguous (a change,
an implausible number, an unknown drug name) it quotes the sentence instead of parsing it. Its
output is labelled as such wherever it is shown."""

from __future__ import annotations

import re
from collections.abc import Iterable

from visits.notes.claims import drugs_in
from visits.notes.spoken_numbers import spoken_numbers_normalize
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
# Read on text whose spoken numbers are digits (`spoken_numbers_normalize`).
_DOSE = re.compile(
    r"\b(?P<name>[a-z][a-z-]{2,})\s*,?\s+(?:for\s+|of\s+)?(?P<amount>\d+(?:\.\d+)?)\s*"
    r"(?P<unit>mg|milligrams?|mcg|micrograms?|units?|ml|milliliters?)\b",
    re.I,
)
_FREQUENCY = re.compile(
    r"\b(once|twice|three times|four times|\d times)\s+(a|per)\s+day\b|\b(daily|every morning|"
    r"every evening|at night|at bedtime|every \d+ hours|as needed)\b",
    re.I,
)
_BLOOD_PRESSURE = re.compile(r"\b(\d{2,3})\s*(?:over|/)\s*(\d{2,3})\b", re.I)
# A vital sign's value follows its name closely ("pulse is 72", "temperature of 98.6"); a
# change ("weight is up 4 pounds") is not a value, and is quoted instead.
_VITAL = re.compile(
    r"\b(?P<name>heart rate|pulse|temperature|oxygen(?: saturation)?|weight)\b"
    r"(?P<between>[^.?!\d]{0,20}?)(?P<value>\d+(?:\.\d+)?)",
    re.I,
)
_CHANGE = re.compile(r"\b(up|down|gained|lost|more|less|increased|decreased|by)\b", re.I)
# Plausible adult ranges: a value outside is more likely a mishearing than a finding.
_PLAUSIBLE = {
    "heart rate": (30, 220),
    "pulse": (30, 220),
    "temperature": (34, 110),  # Celsius or Fahrenheit
    "oxygen": (50, 100),
    "oxygen saturation": (50, 100),
    "weight": (2, 700),  # kilograms or pounds
}
_ASSESSMENT = re.compile(
    r"\b(i think|likely|probably|diagnos\w*|looks like|consistent with|is high|is low)\b", re.I
)
_PLAN = re.compile(
    r"\b(we will|i will|increase|decrease|start|stop|prescrib\w*|follow up|come back|"
    r"recommend|order|schedule|refer)\b",
    re.I,
)


def _matching(
    segments: Iterable[Segment], pattern: re.Pattern[str], doubtful: set[int]
) -> list[Finding]:
    """The sentences `pattern` finds, copied; a doubtful one (`summarize`) only as a quotation
    of what was heard, never as a plain line of the note."""
    return [
        Finding(
            text=f"As heard, not verified: “{s.text}”" if s.id in doubtful else s.text,
            segment_ids=[s.id],
        )
        for s in segments
        if pattern.search(s.text)
    ]


def _medications(segment: Segment, spoken: str) -> tuple[list[Medication], list[Finding]]:
    """Doses of known drugs in one sentence; a dose of a word no lexicon knows is quoted, not
    charted as a drug ("inside 5 milligrams" is what "glipizide" can sound like). So is an
    amount taken at a frequency with no drug named ("15 million rounds once a day" is how
    "meloxicam 15 milligrams" was once heard)."""
    medications, quoted = [], []
    unrecognised = Finding(
        text=f"A medication was mentioned, name not recognised: “{segment.text}”",
        segment_ids=[segment.id],
    )
    doses = list(_DOSE.finditer(spoken))
    taken = _FREQUENCY.search(spoken) and re.search(r"\d", spoken)
    if not doses and taken and not drugs_in(spoken):
        quoted.append(unrecognised)
    for match in doses:
        name = match["name"]
        if not drugs_in(name):
            quoted.append(unrecognised)
            continue
        frequency = _FREQUENCY.search(spoken[match.end() :])
        medications.append(
            Medication(
                name=name,
                dose=f"{match['amount']} {match['unit']}",
                frequency=frequency.group(0) if frequency else None,
                segment_ids=[segment.id],
            )
        )
    return medications, quoted


def _vitals(segment: Segment, spoken: str) -> tuple[list[Vital], list[Vital]]:
    """Vital signs said plainly in one sentence; one said ambiguously is quoted whole. Returns
    (plain, quoted)."""
    vitals, quoted = [], []
    if re.search(r"\b(blood )?pressure\b|\bBP\b", spoken, re.I):
        bp = _BLOOD_PRESSURE.search(spoken)
        if bp and 60 <= int(bp[1]) <= 260 and 30 <= int(bp[2]) <= 160:
            vitals.append(
                Vital(
                    name="blood pressure", value=f"{bp[1]}/{bp[2]} mmHg", segment_ids=[segment.id]
                )
            )
        elif re.search(r"\d", spoken):
            quoted.append(_quoted("blood pressure", segment))
    for match in _VITAL.finditer(spoken):
        name = match["name"].lower()
        low, high = _PLAUSIBLE[name]
        if _CHANGE.search(match["between"]) or not low <= float(match["value"]) <= high:
            quoted.append(_quoted(name, segment))
        else:
            vitals.append(Vital(name=name, value=match["value"], segment_ids=[segment.id]))
    return vitals, quoted


def _quoted(name: str, segment: Segment) -> Vital:
    return Vital(name=f"{name} (as said)", value=f"“{segment.text}”", segment_ids=[segment.id])


def summarize(transcript: Transcript) -> ClinicalSummary:
    segments = transcript.segments
    medications: list[Medication] = []
    unrecognised: list[Finding] = []
    vitals: list[Vital] = []
    # Sentences the engine would not parse (a dose of an unknown word, an ambiguous vital):
    # wherever else they are copied, they are shown only as quotations of what was heard.
    doubtful_ids: set[int] = set()
    for segment in segments:
        spoken = spoken_numbers_normalize(segment.text)
        found, quoted = _medications(segment, spoken)
        medications += found
        unrecognised += quoted
        plain, quoted_vitals = _vitals(segment, spoken)
        vitals += plain + quoted_vitals
        if quoted or quoted_vitals:
            doubtful_ids.add(segment.id)
    complaints = _matching(segments, _COMPLAINT, doubtful_ids)
    # A complaint is what the patient says in answer to the opening question, not the question.
    chief = next((f for f in complaints if "brings you in" not in f.text.lower()), None)
    history = [
        f
        for f in _matching(segments, _HISTORY, doubtful_ids)
        # a doubtful sentence is in the history once, as the quotation that says why
        if f != chief and f.segment_ids[0] not in doubtful_ids
    ]
    return ClinicalSummary(
        chief_complaint=chief,
        history=history + unrecognised,
        medications=medications,
        allergies=_matching(segments, _ALLERGY, doubtful_ids),
        vitals=vitals,
        assessment=_matching(segments, _ASSESSMENT, doubtful_ids),
        plan=_matching(segments, _PLAN, doubtful_ids),
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
