"""The words a transcription is told to expect: the general clinical lexicon of the visit's
specialty (`data/clinical_vocabulary.json`, see `data/build_vocabulary.py` for where it comes
from) and the clinician's own words, as Whisper's initial prompt.

Whisper's prompt holds about 220 tokens and the earliest are the first dropped, so the
clinician's own words come first, then the specialty's drugs and terms, then the common ones,
until the budget is spent. The prompt is decided when the visit is created and kept in its
run's input, so every attempt and every chunk of the transcription hears the same prompt.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

LEXICON_PATH = Path(__file__).resolve().parent / "data" / "clinical_vocabulary.json"
# About 4 characters per token for these words: 600 characters stay well inside the 220
# tokens Whisper keeps of a prompt, leaving room for the text it carries between windows.
PROMPT_MAX_CHARS = 600


@cache
def lexicon() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(LEXICON_PATH.read_text())
    return loaded


def specialties() -> list[str]:
    return sorted(lexicon()["specialties"])


def vocabulary_prompt(specialty: str, custom_words: list[str]) -> str:
    """The initial prompt for a visit of `specialty` by a clinician with `custom_words`; empty
    when there is nothing to say. Drug names lead: they are what a small model mishears most,
    and a prompt that reads like a note ("Medications discussed: ...") biases it best."""
    found = lexicon()["specialties"].get(specialty, {"drugs": [], "terms": []})
    budget = PROMPT_MAX_CHARS
    parts = []
    # (title, words, the most of the budget they may take): the clinician's words first,
    # then drugs, then the rest; each list is in order of use, so a cut drops the rarest.
    for title, words, share in (
        ("Also", custom_words, 0.3),
        ("Medications discussed", [*found["drugs"], *lexicon()["common_drugs"]], 0.65),
        ("Terms", [*found["terms"], *lexicon()["common"]], 1.0),
    ):
        kept = _within(words, int(min(budget, PROMPT_MAX_CHARS * share)) - len(title) - 4)
        if kept:
            parts.append(f"{title}: {', '.join(kept)}.")
            budget -= len(parts[-1]) + 1
    if not parts:
        return ""
    return f"A {specialty or 'clinical'} visit. " + " ".join(parts)


def _within(words: list[str], budget: int) -> list[str]:
    """The first distinct words of `words` whose list fits in `budget` characters."""
    kept: list[str] = []
    size = 0
    for word in words:
        word = " ".join(word.split())
        if not word or word.lower() in {k.lower() for k in kept}:
            continue
        if size + len(word) + 2 > budget:
            break
        kept.append(word)
        size += len(word) + 2
    return kept
