"""Numbers as people say them, and as Whisper writes what they said, turned into digits.

A clinician says "one hundred and forty two over ninety" or "one forty two over ninety"; the
small Whisper model writes "100 and 42 over 90". Every reader of a transcript (the offline
engine, the check that a note's numbers were said) first normalizes it here, so that all of
them agree on what number was spoken. Words become digits with `text2num` (`alpha2digit`);
the clinical idioms it does not know are added below, each with its example.
"""

from __future__ import annotations

import re

from text_to_num import alpha2digit

# "100 and 42" (Whisper's rendering of "one hundred and forty-two") is one number.
_HUNDREDS_AND = re.compile(r"\b([1-9])00 and ([1-9]\d?)\b")
# "1 42 over 90" ("one forty-two over ninety", the usual way to say a blood pressure) is 142;
# so is "1.42 over 90", how tiny.en sometimes writes it.
_SPLIT_HUNDRED = re.compile(r"\b([12])[ .]([1-9]\d)\b(?=\s*(?:over|/))")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def _hundreds_and(match: re.Match[str]) -> str:
    return str(int(match[1]) * 100 + int(match[2]))


def spoken_numbers_normalize(text: str) -> str:
    """`text` with spoken numbers as digits: "one hundred and forty two over ninety" and
    "100 and 42 over 90" both become "142 over 90". For reading and checking numbers; the
    transcript itself is shown as it was heard."""
    # threshold 0: "one tablet" and "1 tablet" must read the same to every check.
    text = alpha2digit(text, "en", threshold=0)
    text = _HUNDREDS_AND.sub(_hundreds_and, text)
    return _SPLIT_HUNDRED.sub(r"\1\2", text)


def numbers_in(text: str) -> list[str]:
    """The numbers in `text` once normalized, as written ("98.6", "142"), in order. Trailing
    zeros of a decimal are dropped, so "5.0" and "5" are the same number."""
    found = []
    for number in _NUMBER.findall(spoken_numbers_normalize(text)):
        if "." in number:
            number = number.rstrip("0").rstrip(".")
        found.append(number)
    return found
