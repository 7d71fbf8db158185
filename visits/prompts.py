"""What we ask the model, in one place. Changing a prompt changes the request digest, so a
retry after a prompt change sends the new prompt rather than reusing an old answer."""

from __future__ import annotations

import json

from openai.types.chat import ChatCompletionMessageParam

from visits.schemas import ClinicalSummary, Transcript

SUMMARIZE_SYSTEM = (
    "You are a clinical documentation assistant. From the transcript of a doctor-patient "
    "visit, extract only facts that were actually said. Every item must cite the ids of the "
    "transcript segments it comes from. If something was not discussed, leave it empty or "
    "null; never infer or invent findings, doses or vitals."
)

NOTE_SYSTEM = (
    "You are a clinical documentation assistant. Write a SOAP note for the chart and a short "
    "plain-language summary for the patient, using only the structured facts given. Keep every "
    "statement's segment citations. Do not add diagnoses, doses or instructions that are not "
    "in the facts. The patient summary uses everyday words at a sixth-grade reading level."
)


def transcript_for_prompt(transcript: Transcript) -> str:
    return "\n".join(
        f"[{segment.id}] ({segment.start:.1f}s) {segment.text}" for segment in transcript.segments
    )


def summarize_messages(transcript: Transcript) -> list[ChatCompletionMessageParam]:
    return [
        {"role": "system", "content": SUMMARIZE_SYSTEM},
        {"role": "user", "content": "Transcript:\n" + transcript_for_prompt(transcript)},
    ]


def note_messages(summary: ClinicalSummary) -> list[ChatCompletionMessageParam]:
    facts = json.dumps(summary.model_dump(mode="json"), indent=1, sort_keys=True)
    return [
        {"role": "system", "content": NOTE_SYSTEM},
        {"role": "user", "content": "Structured facts of the visit:\n" + facts},
    ]
