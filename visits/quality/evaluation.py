"""How good is the pipeline on recordings whose words we know: `manage.py evaluate`.

An evaluation set is a directory of pairs: a recording (`<slug>.ogg`, or any other extension
an upload may have, `services.RECORDING_EXTENSIONS`) and `<slug>.json`, the script that was
read into it:

    {"slug": "...", "specialty": "...", "title": "...",
     "lines": [{"speaker": "doctor", "text": "..."}, ...],
     "key_terms": ["lisinopril", "150 over 95", ...],
     "facts": [{"kind": ..., "name": ..., "value": ...}], "changes": [...]}

Other files in the directory (a README) are ignored. Each recording goes through the real
pipeline in this process (`visit_start(inline=True)`), as a visit of a dedicated user, and is
scored against its script (the lines' texts joined with spaces):

- WER of the transcript (jiwer), both sides read through `text_normalize`;
- key-term recall: the share of `key_terms` found, whole words or phrases, in the normalized
  transcript;
- the share of summary and note items with valid evidence: citing only segments that exist
  and not flagged unsupported by `visits.notes.claims`;
- unsupported items (doubts of kind "unsupported" in the summary's and note's stage outputs)
  and unknown drugs (kind "unknown_drug"), counted apart;
- wrong numbers: numbers the note states that the script never says; counted apart, those
  inside a quotation of what was heard (“…”, as the offline engine quotes a sentence it will
  not parse): a misheard number quoted as heard is the transcript's error, shown as a quote,
  not a value the note states;
- seconds of wall time per minute of audio, the models loaded beforehand (`warm_up`).

The overall WER is jiwer's over every reference and transcript together (total errors over
total reference words), not an average of the recordings' WERs; recall and evidence are
likewise over all terms and items.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jiwer
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pipeline import PipelineError, StageStatus, output_of
from visits.errors import RecordingRejected
from visits.notes import claims
from visits.notes.spoken_numbers import numbers_in, spoken_numbers_normalize
from visits.privacy.consent import SYNTHETIC_CONSENT
from visits.refs import INGEST, NOTE, SUMMARIZE
from visits.schemas import (
    ClinicalSummary,
    Doubt,
    NoteOutput,
    PostVisitNote,
    SummarizeOutput,
    Transcript,
)
from visits.selectors import visit_stages, visit_transcript
from visits.services import (
    RECORDING_EXTENSIONS,
    recording_validate,
    service_clinician,
    visit_create,
    visit_start,
)
from visits.speech import transcription
from visits.speech.vocabulary import vocabulary_prompt

if TYPE_CHECKING:
    from django.contrib.auth.models import User

EVALUATION_CLINICIAN = "evaluation"


class EvaluationRefused(PipelineError):
    """An evaluation set (or a clinician) the evaluation cannot use; nothing was run."""

    code = "evaluation_refused"


# --- normalizing text for comparison -----------------------------------------------------------

_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")
_RATIO = re.compile(r"(?<=\d)\s*/\s*(?=\d)")
_APOSTROPHE = re.compile(r"['\u2019]")
# A word is a run of letters and digits ("3rd", "b12"); a number keeps its decimal point.
_TOKEN = re.compile(r"(?:[^\W_]|(?<=\d)\.(?=\d))+")


def text_normalize(text: str) -> str:
    """`text` as Whisper-style evaluations compare it: lowercase, numbers as digits (through
    `spoken_numbers`, so "one forty two over ninety", "142/90" and "142 over 90" agree),
    no punctuation ("it's" is "its", "follow-up" is "follow up"), single spaces."""
    text = spoken_numbers_normalize(text.lower())
    text = _THOUSANDS.sub("", text)
    text = _RATIO.sub(" over ", text)
    text = _APOSTROPHE.sub("", text.replace("%", " percent "))
    return " ".join(_TOKEN.findall(text))


# --- scoring, pure -----------------------------------------------------------------------------


def word_error_rate(reference: str, hypothesis: str) -> float:
    """jiwer's WER of `hypothesis` against `reference`, both normalized first."""
    return float(jiwer.wer(text_normalize(reference), text_normalize(hypothesis)))


def key_terms_found(terms: Iterable[str], transcript: str) -> list[str]:
    """The terms said in `transcript`: each normalized, matched as whole words or a phrase."""
    said = f" {text_normalize(transcript)} "
    return [term for term in terms if f" {text_normalize(term)} " in said]


# A quotation of what was heard, as the offline engine and the templates mark one.
QUOTATION = re.compile(r"“[^”]*”")


def wrong_numbers(note_lines: Iterable[str], script: str) -> tuple[list[str], list[str]]:
    """The numbers the note's lines state that the script never says, each once, in order;
    and, apart, those inside quotations of what was heard."""
    said = set(numbers_in(script))
    lines = list(note_lines)
    stated = [QUOTATION.sub(" ", line) for line in lines]
    quoted = [" ".join(QUOTATION.findall(line)) for line in lines]
    return _never_said(stated, said), _never_said(quoted, said)


def _never_said(texts: Iterable[str], said: set[str]) -> list[str]:
    wrong: list[str] = []
    for text in texts:
        wrong += [n for n in numbers_in(text) if n not in said and n not in wrong]
    return wrong


def note_lines(note: PostVisitNote) -> list[str]:
    """Every line of the note: the SOAP sections, then the patient's summary."""
    lines = [item.text for _, items in note.soap.sections() for item in items]
    return lines + [item.text for item in note.patient_summary]


def _summary_items(summary: ClinicalSummary) -> list[tuple[str, list[int]]]:
    # (where, cited segment ids), with the places `claims.summary_unsupported` names.
    items: list[tuple[str, list[int]]] = []
    if summary.chief_complaint is not None:
        items.append(("chief_complaint", summary.chief_complaint.segment_ids))
    for field in ("history", "medications", "allergies", "vitals", "assessment", "plan"):
        items += [
            (f"{field}[{i}]", item.segment_ids) for i, item in enumerate(getattr(summary, field))
        ]
    return items


def _note_items(note: PostVisitNote) -> list[tuple[str, list[int]]]:
    items = [
        (f"soap.{section}[{i}]", item.segment_ids)
        for section, found in note.soap.sections()
        for i, item in enumerate(found)
    ]
    return items + [
        (f"patient_summary[{i}]", item.segment_ids) for i, item in enumerate(note.patient_summary)
    ]


def evidence_counts(
    transcript: Transcript | None,
    summarized: SummarizeOutput | None,
    noted: NoteOutput | None,
) -> tuple[int, int]:
    """(items, items with valid evidence) over the summary and the note: an item's evidence is
    valid when it cites at least one segment, only segments the transcript has, and
    `visits.notes.claims` did not flag it unsupported (an unknown drug name is not an evidence
    problem: it is counted apart)."""
    segment_ids = {s.id for s in transcript.segments} if transcript else set()
    documents: list[tuple[list[tuple[str, list[int]]], list[Doubt]]] = []
    if summarized is not None:
        documents.append((_summary_items(summarized.summary), summarized.unsupported))
    if noted is not None:
        documents.append((_note_items(noted.note), noted.unsupported))
    items = valid = 0
    for document_items, doubts in documents:
        flagged = {doubt.where for doubt in doubts if doubt.kind == "unsupported"}
        for where, cited in document_items:
            items += 1
            if cited and set(cited) <= segment_ids and where not in flagged:
                valid += 1
    return items, valid


def _share(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def _per_audio_minute(wall_seconds: float, audio_seconds: float | None) -> float | None:
    return round(wall_seconds / (audio_seconds / 60), 3) if audio_seconds else None


# --- the set -----------------------------------------------------------------------------------


class ScriptLine(BaseModel):
    speaker: str
    text: str


class EvaluationCase(BaseModel):
    """One `<slug>.json` of an evaluation set. Facts and changes are kept, not scored."""

    slug: str = Field(min_length=1)
    specialty: str = ""
    title: str = ""
    lines: list[ScriptLine] = Field(min_length=1)
    key_terms: list[str] = Field(default_factory=list)
    facts: list[dict[str, Any]] = Field(default_factory=list)
    changes: list[Any] = Field(default_factory=list)

    @field_validator("key_terms")
    @classmethod
    def _terms_have_words(cls, terms: list[str]) -> list[str]:
        for term in terms:
            if not text_normalize(term):
                raise ValueError(f"the key term {term!r} has no words")
        return terms

    @property
    def script(self) -> str:
        """The reference: what was read into the recording, the lines joined with spaces."""
        return " ".join(line.text for line in self.lines)


@dataclass(frozen=True)
class EvaluationItem:
    recording: Path
    case: EvaluationCase


def _case_load(path: Path) -> EvaluationCase:
    try:
        case = EvaluationCase.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EvaluationRefused(f"{path}: not a readable JSON file ({exc}).") from exc
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or '(top)'}: {error['msg']}"
            for error in exc.errors()[:5]
        )
        raise EvaluationRefused(f"{path}: not an evaluation script ({problems}).") from exc
    if case.slug != path.stem:
        raise EvaluationRefused(
            f"{path}: its slug {case.slug!r} is not its file name; name the pair "
            f"{case.slug}.json and {case.slug}.<ext>, or fix the slug."
        )
    if not text_normalize(case.script):
        raise EvaluationRefused(f"{path}: its lines have no words to compare with.")
    return case


def evaluation_set_load(directory: Path) -> list[EvaluationItem]:
    """The pairs of `directory`, by slug; refused whole if anything is missing or invalid."""
    if not directory.is_dir():
        raise EvaluationRefused(f"{directory}: no such directory (the evaluation set).")
    files = sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith("."))
    recordings: dict[str, list[Path]] = {}
    for path in files:
        if path.suffix.lower() in RECORDING_EXTENSIONS:
            recordings.setdefault(path.stem, []).append(path)
    scripts = {path.stem: path for path in files if path.suffix.lower() == ".json"}
    problems = [
        f"{len(paths)} recordings for {slug}: {', '.join(p.name for p in paths)}"
        for slug, paths in recordings.items()
        if len(paths) > 1
    ]
    problems += [
        f"{paths[0].name} has no {slug}.json"
        for slug, paths in recordings.items()
        if slug not in scripts
    ]
    problems += [
        f"{path.name} has no recording ({slug}.ogg or another audio extension)"
        for slug, path in scripts.items()
        if slug not in recordings
    ]
    if problems:
        raise EvaluationRefused(
            f"The evaluation set {directory} is incomplete: {'; '.join(problems)}."
        )
    if not recordings:
        raise EvaluationRefused(
            f"The evaluation set {directory} is empty: it needs pairs <slug>.ogg + <slug>.json."
        )
    items = []
    for slug, (recording,) in sorted(recordings.items()):
        try:
            recording_validate(name=recording.name, size=recording.stat().st_size)
        except RecordingRejected as exc:
            raise EvaluationRefused(f"{recording}: {exc}") from exc
        items.append(EvaluationItem(recording=recording, case=_case_load(scripts[slug])))
    return items


# --- the report --------------------------------------------------------------------------------


class RecordingScore(BaseModel):
    """How the pipeline did on one recording of the set."""

    model_config = ConfigDict(extra="forbid")

    slug: str
    title: str
    specialty: str
    recording: str  # the file's name
    visit: int
    status: str  # the run's final status
    error: str | None  # the failed stage and its message
    transcription_model: str | None
    engine: str | None  # what wrote the summary and note
    audio_seconds: float | None
    wall_seconds: float
    seconds_per_audio_minute: float | None
    reference: str  # the script, normalized
    hypothesis: str  # the transcript, normalized ("" without one)
    reference_words: int
    wer: float
    key_terms: int
    key_terms_found: int
    key_term_recall: float | None  # None when the script names no key terms
    missed_terms: list[str]
    items: int  # summary and note items
    items_with_valid_evidence: int
    valid_evidence_share: float | None
    unsupported: int
    unknown_drugs: int
    doubts: list[Doubt]  # of the summary and the note, both kinds
    wrong_numbers: list[str]  # stated by the note
    quoted_wrong_numbers: list[str]  # inside its quotations of what was heard


class OverallScore(BaseModel):
    model_config = ConfigDict(extra="forbid")

    recordings: int
    succeeded: int
    reference_words: int
    wer: float  # jiwer over every reference and transcript together
    key_terms: int
    key_terms_found: int
    key_term_recall: float | None
    items: int
    items_with_valid_evidence: int
    valid_evidence_share: float | None
    unsupported: int
    unknown_drugs: int
    wrong_numbers: int
    quoted_wrong_numbers: int
    audio_seconds: float
    wall_seconds: float
    seconds_per_audio_minute: float | None


class EvaluationReport(BaseModel):
    model_config = ConfigDict(extra="forbid")

    evaluation_set: str
    warm_up_seconds: float  # loading the models, before any recording's clock starts
    recordings: list[RecordingScore]
    overall: OverallScore

    @classmethod
    def from_scores(
        cls, scores: list[RecordingScore], *, evaluation_set: str, warm_up_seconds: float = 0.0
    ) -> EvaluationReport:
        terms = sum(s.key_terms for s in scores)
        found = sum(s.key_terms_found for s in scores)
        items = sum(s.items for s in scores)
        valid = sum(s.items_with_valid_evidence for s in scores)
        audio = sum(s.audio_seconds or 0.0 for s in scores)
        # A failed ingest has no duration: its time is left out with its audio.
        timed = sum(s.wall_seconds for s in scores if s.audio_seconds)
        overall = OverallScore(
            recordings=len(scores),
            succeeded=sum(s.status == "succeeded" for s in scores),
            reference_words=sum(s.reference_words for s in scores),
            wer=(
                float(jiwer.wer([s.reference for s in scores], [s.hypothesis for s in scores]))
                if scores
                else 0.0
            ),
            key_terms=terms,
            key_terms_found=found,
            key_term_recall=_share(found, terms),
            items=items,
            items_with_valid_evidence=valid,
            valid_evidence_share=_share(valid, items),
            unsupported=sum(s.unsupported for s in scores),
            unknown_drugs=sum(s.unknown_drugs for s in scores),
            wrong_numbers=sum(len(s.wrong_numbers) for s in scores),
            quoted_wrong_numbers=sum(len(s.quoted_wrong_numbers) for s in scores),
            audio_seconds=round(audio, 3),
            wall_seconds=round(sum(s.wall_seconds for s in scores), 3),
            seconds_per_audio_minute=_per_audio_minute(timed, audio),
        )
        return cls(
            evaluation_set=evaluation_set,
            warm_up_seconds=round(warm_up_seconds, 3),
            recordings=scores,
            overall=overall,
        )


def recording_score(
    case: EvaluationCase,
    *,
    recording: str,
    visit: int,
    status: str,
    error: str | None = None,
    wall_seconds: float,
    audio_seconds: float | None,
    transcript: Transcript | None,
    summarized: SummarizeOutput | None,
    noted: NoteOutput | None,
) -> RecordingScore:
    """Score what the pipeline made of one recording against its script. A missing
    transcript counts as an empty one (every word deleted)."""
    wall_seconds = round(wall_seconds, 3)
    reference = text_normalize(case.script)
    hypothesis = text_normalize(transcript.text) if transcript else ""
    found = key_terms_found(case.key_terms, transcript.text if transcript else "")
    doubts = (summarized.unsupported if summarized else []) + (noted.unsupported if noted else [])
    latest: NoteOutput | SummarizeOutput | None = noted or summarized
    items, valid = evidence_counts(transcript, summarized, noted)
    stated, quoted = wrong_numbers(note_lines(noted.note), case.script) if noted else ([], [])
    return RecordingScore(
        slug=case.slug,
        title=case.title,
        specialty=case.specialty,
        recording=recording,
        visit=visit,
        status=status,
        error=error,
        transcription_model=transcript.model if transcript else None,
        engine=latest.engine if latest else None,
        audio_seconds=audio_seconds,
        wall_seconds=wall_seconds,
        seconds_per_audio_minute=_per_audio_minute(wall_seconds, audio_seconds),
        reference=reference,
        hypothesis=hypothesis,
        reference_words=len(reference.split()),
        wer=float(jiwer.wer(reference, hypothesis)),
        key_terms=len(case.key_terms),
        key_terms_found=len(found),
        key_term_recall=_share(len(found), len(case.key_terms)),
        missed_terms=[term for term in case.key_terms if term not in found],
        items=items,
        items_with_valid_evidence=valid,
        valid_evidence_share=_share(valid, items),
        unsupported=sum(doubt.kind == "unsupported" for doubt in doubts),
        unknown_drugs=sum(doubt.kind == "unknown_drug" for doubt in doubts),
        doubts=doubts,
        wrong_numbers=stated,
        quoted_wrong_numbers=quoted,
    )


# --- running it --------------------------------------------------------------------------------


def warm_up() -> float:
    """Load the Whisper model and the drug lexicon (seconds each) before any clock starts, so
    that the first recording is not charged for them; the seconds it took."""
    started = time.monotonic()
    transcription.whisper_model()
    claims.drugs_in("aspirin")
    return time.monotonic() - started


def recording_evaluate(
    item: EvaluationItem, *, clinician: User, vocabulary: bool = False
) -> RecordingScore:
    """Run the pipeline on one recording, here and to the end, and score it; with
    `vocabulary`, transcription is told the lexicon of the recording's specialty."""
    visit = visit_create(
        clinician=clinician,
        recording=item.recording,
        label=f"evaluation: {item.case.slug}",
        consent=SYNTHETIC_CONSENT,
        whisper_prompt=vocabulary_prompt(item.case.specialty, []) if vocabulary else "",
    )
    started = time.monotonic()
    visit_start(visit=visit, inline=True)
    wall_seconds = time.monotonic() - started
    visit.refresh_from_db()
    stages = visit_stages(visit)
    failed = next((s for s in stages if s.status == StageStatus.FAILED), None)
    ingested = output_of(stages, INGEST)
    return recording_score(
        item.case,
        recording=item.recording.name,
        visit=visit.pk,
        status=visit.current_run.status if visit.current_run else "queued",
        error=f"{failed.name}: {failed.error_message}" if failed else None,
        wall_seconds=wall_seconds,
        audio_seconds=ingested.duration_seconds if ingested else None,
        transcript=visit_transcript(stages),
        summarized=output_of(stages, SUMMARIZE),
        noted=output_of(stages, NOTE),
    )


def evaluate(
    directory: Path,
    *,
    clinician: str | None = None,
    vocabulary: bool = False,
    progress: Callable[[int, int, RecordingScore], None] | None = None,
) -> EvaluationReport:
    """Evaluate every recording of the set in `directory` as visits of `clinician` (a
    username; default the "evaluation" account); `progress(done, total, score)` after each.
    The whole set and the user are checked before anything is created or run."""
    items = evaluation_set_load(directory)
    owner = service_clinician(clinician, service_account=EVALUATION_CLINICIAN)
    warm_up_seconds = warm_up()
    scores = []
    for done, item in enumerate(items, start=1):
        scores.append(recording_evaluate(item, clinician=owner, vocabulary=vocabulary))
        if progress is not None:
            progress(done, len(items), scores[-1])
    return EvaluationReport.from_scores(
        scores, evaluation_set=str(directory), warm_up_seconds=warm_up_seconds
    )


# --- rendering ---------------------------------------------------------------------------------


def _percent(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def _ratio(part: int, whole: int, share: float | None) -> str:
    return f"{part}/{whole} {_percent(share)}" if whole else "—"


def _duration(seconds: float | None) -> str:
    return "—" if seconds is None else f"{int(seconds // 60)}:{round(seconds % 60):02d}"


def _speed(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


# Names and words to the left, figures to the right.
_LEFT = (0, 1, 8, 9)
COLUMNS = (
    "recording",
    "status",
    "audio",
    "WER",
    "key terms",
    "valid evidence",
    "unsupported",
    "unknown drugs",
    "wrong numbers",
    "quoted, misheard",
    "s / audio min",
)


def report_rows(report: EvaluationReport) -> list[list[str]]:
    """The table's cells: a row per recording, then the overall row."""
    rows = [
        [
            score.slug,
            score.status,
            _duration(score.audio_seconds),
            _percent(score.wer),
            _ratio(score.key_terms_found, score.key_terms, score.key_term_recall),
            _ratio(score.items_with_valid_evidence, score.items, score.valid_evidence_share),
            str(score.unsupported),
            str(score.unknown_drugs),
            ", ".join(score.wrong_numbers) or "—",
            ", ".join(score.quoted_wrong_numbers) or "—",
            _speed(score.seconds_per_audio_minute),
        ]
        for score in report.recordings
    ]
    overall = report.overall
    rows.append(
        [
            f"overall ({overall.recordings})",
            f"{overall.succeeded}/{overall.recordings} ok",
            _duration(overall.audio_seconds),
            _percent(overall.wer),
            _ratio(overall.key_terms_found, overall.key_terms, overall.key_term_recall),
            _ratio(overall.items_with_valid_evidence, overall.items, overall.valid_evidence_share),
            str(overall.unsupported),
            str(overall.unknown_drugs),
            str(overall.wrong_numbers),
            str(overall.quoted_wrong_numbers),
            _speed(overall.seconds_per_audio_minute),
        ]
    )
    return rows


def report_table(report: EvaluationReport) -> list[str]:
    """The report as aligned text lines: header, a row per recording, a rule, overall."""
    rows = [list(COLUMNS), *report_rows(report)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]

    def line(row: list[str]) -> str:
        return "  ".join(
            cell.ljust(width) if i in _LEFT else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ).rstrip()

    lines = [line(row) for row in rows]
    rule = "-" * max(len(text) for text in lines)
    return [lines[0], rule, *lines[1:-1], rule, lines[-1]]


def report_markdown(report: EvaluationReport) -> str:
    """The report as a Markdown table (for BENCHMARKS.md), the overall row in bold."""
    rows = report_rows(report)
    *per_recording, overall = rows
    aligned = ["---" if i in _LEFT else "---:" for i in range(len(COLUMNS))]
    table = [COLUMNS, aligned, *per_recording, [f"**{cell}**" for cell in overall]]
    return "\n".join("| " + " | ".join(row) + " |" for row in table) + "\n"
