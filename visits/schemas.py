"""The documents that cross a boundary: transcript files, and what the LLM must return.

Every clinical statement carries `segment_ids`, the transcript segments it came from, so that
a clinician can check any sentence against the recording."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Segment(BaseModel):
    id: int
    start: float
    end: float
    text: str


class Transcript(BaseModel):
    model: str
    duration_seconds: float
    segments: list[Segment]

    @property
    def text(self) -> str:
        return " ".join(segment.text for segment in self.segments)

    @property
    def word_count(self) -> int:
        return len(self.text.split())


class _Evidenced(BaseModel):
    model_config = ConfigDict(extra="forbid")

    segment_ids: list[int] = Field(
        min_length=1, description="ids of the transcript segments this statement comes from"
    )


class Finding(_Evidenced):
    text: str = Field(min_length=1)


class Medication(_Evidenced):
    name: str = Field(min_length=1)
    dose: str | None = Field(description="e.g. '10 mg', or null if not stated")
    frequency: str | None = Field(description="e.g. 'once a day', or null if not stated")


class Vital(_Evidenced):
    name: str = Field(min_length=1, description="e.g. 'blood pressure'")
    value: str = Field(min_length=1, description="as stated, e.g. '150/95 mmHg'")


Speaker = Literal["clinician", "patient", "other"]


class SpeakerTurn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    segment_id: int
    speaker: Speaker = Field(
        description="who says this segment, judged from what is said: the clinician, the "
        "patient, or another person (a parent, an interpreter)"
    )


class ClinicalSummary(BaseModel):
    """Structured facts of the visit, each tied to its evidence. Empty lists, never guesses."""

    model_config = ConfigDict(extra="forbid")

    chief_complaint: Finding | None
    history: list[Finding]
    medications: list[Medication]
    allergies: list[Finding]
    vitals: list[Vital]
    assessment: list[Finding]
    plan: list[Finding]
    # Only for segments whose speaker the words make clear; the rest stay unknown.
    speakers: list[SpeakerTurn] = Field(
        default_factory=list,
        description="the speaker of each segment whose words make it clear; leave out a "
        "segment whose speaker you cannot tell",
    )

    def speakers_by_segment(self) -> dict[int, str]:
        """Who says each segment the model could place; a segment missing is "unknown"."""
        return {turn.segment_id: turn.speaker for turn in self.speakers}


class SOAPNote(BaseModel):
    model_config = ConfigDict(extra="forbid")

    subjective: list[Finding]
    objective: list[Finding]
    assessment: list[Finding]
    plan: list[Finding]

    def sections(self) -> list[tuple[str, list[Finding]]]:
        """(section name, items) in SOAP order, for pages and text renderings."""
        return [(name, getattr(self, name)) for name in type(self).model_fields]


class PostVisitNote(BaseModel):
    """The chart's SOAP note and the patient's plain-language after-visit summary."""

    model_config = ConfigDict(extra="forbid")

    soap: SOAPNote
    patient_summary: list[Finding] = Field(
        description="short plain-language sentences for the patient, no jargon"
    )


# --- the note in the chart: what a clinician edits, signs and amends --------------------------

ITEM_MAX_CHARS = 2000


class NoteItem(BaseModel):
    """One line of a note version. A model's line keeps its evidence when a clinician edits its
    text; a line the clinician adds has none and says so (`source`). A line whose evidence
    does not bear out a number or drug it states is `supported: false`, with the reason in
    `doubt`, until the clinician rewords it so that it does, confirms it, or removes it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    text: str = Field(min_length=1, max_length=ITEM_MAX_CHARS)
    segment_ids: list[int] = Field(default_factory=list)
    source: Literal["model", "clinician"] = "model"
    edited: bool = False  # a model's line whose text a clinician changed
    supported: bool = True
    doubt: str = ""
    confirmed: bool = False  # the clinician checked an unsupported line against the recording

    @property
    def clinician_entered(self) -> bool:
        return self.source == "clinician"


class ChartSOAP(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    subjective: list[NoteItem]
    objective: list[NoteItem]
    assessment: list[NoteItem]
    plan: list[NoteItem]

    def sections(self) -> list[tuple[str, list[NoteItem]]]:
        """(section name, items) in SOAP order."""
        return [(name, getattr(self, name)) for name in type(self).model_fields]


# The parts of a note a clinician edits, in reading order: (key, title).
NOTE_PARTS: tuple[tuple[str, str], ...] = (
    ("subjective", "Subjective"),
    ("objective", "Objective"),
    ("assessment", "Assessment"),
    ("plan", "Plan"),
    ("patient_summary", "Patient summary"),
)


class ChartNote(BaseModel):
    """A version of the note as the chart keeps it: the SOAP note and the patient's summary."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    soap: ChartSOAP
    patient_summary: list[NoteItem]

    @classmethod
    def from_draft(cls, draft: PostVisitNote, doubts: Sequence[Doubt] = ()) -> ChartNote:
        """The model's draft as version 1; the lines in `doubts` are marked unsupported."""
        why = {doubt.where: doubt.why for doubt in doubts}

        def items(where: str, findings: list[Finding]) -> list[NoteItem]:
            return [
                NoteItem(
                    text=f.text,
                    segment_ids=f.segment_ids,
                    supported=f"{where}[{i}]" not in why,
                    doubt=why.get(f"{where}[{i}]", ""),
                )
                for i, f in enumerate(findings)
            ]

        return cls(
            soap=ChartSOAP(
                **{name: items(f"soap.{name}", found) for name, found in draft.soap.sections()}
            ),
            patient_summary=items("patient_summary", draft.patient_summary),
        )

    def unsupported(self) -> list[tuple[str, NoteItem]]:
        """(part title, line) of every line still unsupported and not confirmed."""
        return [
            (title, item)
            for _, title, items in self.parts()
            for item in items
            if not item.supported and not item.confirmed
        ]

    @classmethod
    def from_parts(cls, parts: dict[str, list[NoteItem]]) -> ChartNote:
        soap = {key: parts[key] for key, _ in NOTE_PARTS if key != "patient_summary"}
        return cls(soap=ChartSOAP(**soap), patient_summary=parts["patient_summary"])

    def part(self, key: str) -> list[NoteItem]:
        return self.patient_summary if key == "patient_summary" else getattr(self.soap, key)

    def parts(self) -> list[tuple[str, str, list[NoteItem]]]:
        """(key, title, items) for every part, in reading order."""
        return [(key, title, self.part(key)) for key, title in NOTE_PARTS]


# --- what each stage of the visit workflow returns (stored as JSON, read back as these) -------


class _StageOutput(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class IngestOutput(_StageOutput):
    """A recording decoded whole (an upload), or accepted as a live stream of pieces, which
    `transcribe` decodes as they arrive: then the audio and its length are its to say."""

    audio: str | None = Field(description="artifact reference of the 16 kHz mono PCM")
    sample_rate: int
    duration_seconds: float | None
    source_format: str
    source_bytes: int | None
    live: bool = False


class TranscribeOutput(_StageOutput):
    transcript: str = Field(description="artifact reference of the Transcript JSON")
    # A live recording's audio, decoded here as it arrived (an upload's is the ingest's).
    audio: str | None = None
    model: str
    segments: int
    words: int
    chunks: int
    chunks_reused: int


class Doubt(BaseModel):
    """A statement its cited evidence does not bear out (`visits.notes.claims`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    where: str = Field(description="e.g. 'medications[0]', 'soap.objective[1]'")
    text: str
    why: str
    # "unsupported": a number or drug its evidence does not show (the model is asked to
    # repair it); "unknown_drug": a medication no lexicon knows (flagged for review only).
    kind: Literal["unsupported", "unknown_drug"] = "unsupported"

    def __str__(self) -> str:
        return f"{self.where} (“{self.text}”): {self.why}"


class SummarizeOutput(_StageOutput):
    engine: str
    summary: ClinicalSummary
    # Statements still unsupported after the model was asked to repair them: shown flagged.
    unsupported: list[Doubt] = Field(default_factory=list)


class NoteOutput(_StageOutput):
    engine: str
    note: PostVisitNote
    unsupported: list[Doubt] = Field(default_factory=list)


class DeliveryOutput(_StageOutput):
    identifier: str = Field(description="the Bundle's identifier value (visit and version)")
    status_code: int
    created: bool = Field(description="False when the EHR already had it (conditional create)")
    location: str


def cited_ids(document: BaseModel) -> set[int]:
    """Every segment id a summary or note cites, wherever it sits."""
    found: set[int] = set()

    def walk(value: object) -> None:
        if isinstance(value, _Evidenced):
            found.update(value.segment_ids)
        if isinstance(value, BaseModel):
            for field in type(value).model_fields:
                walk(getattr(value, field))
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk(document)
    return found


def evidence_check(document: BaseModel, transcript: Transcript) -> None:
    """Refuse a document that cites (or names the speaker of) segments the transcript does
    not have."""
    named = cited_ids(document)
    if isinstance(document, ClinicalSummary):
        named |= {turn.segment_id for turn in document.speakers}
    unknown = named - {segment.id for segment in transcript.segments}
    if unknown:
        raise ValueError(
            f"it cites transcript segment ids {sorted(unknown)} that do not exist "
            f"(valid ids are 0..{len(transcript.segments) - 1})"
        )
