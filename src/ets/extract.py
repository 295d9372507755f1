"""Final-answer extraction from step text (SPEC section 4): `\\boxed{}` first, then "The answer is"."""

from __future__ import annotations

import re

_ANSWER_IS = re.compile(r"[Tt]he (?:final )?answer is[:\s]*\$?(.+?)\$?\s*(?:\.\s*$|\.\s|\n|$)")


def last_boxed(text: str) -> str | None:
    """Content of the last complete \\boxed{...} (or \\fbox{...}), nested braces respected."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    while start >= 0:
        i = text.find("{", start)
        if i < 0:
            return None
        depth = 0
        for j in range(i, len(text)):
            if text[j] == "{":
                depth += 1
            elif text[j] == "}":
                depth -= 1
                if depth == 0:
                    return text[i + 1 : j].strip()
        # unclosed: try an earlier one
        start = max(text.rfind("\\boxed", 0, start), text.rfind("\\fbox", 0, start))
    return None


def extract_answer(text: str) -> str | None:
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    matches = _ANSWER_IS.findall(text)
    if matches:
        return matches[-1].strip().rstrip(".").strip() or None
    return None


def has_final_answer(text: str) -> bool:
    return extract_answer(text) is not None
