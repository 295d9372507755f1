"""How a path becomes a step-tag PRM's input text: one function per PRM family, used by both the
local (transformers) adapter and the served (vLLM pooling) client, so that the same path is
scored on the same text wherever the PRM runs."""

from __future__ import annotations

from typing import Sequence

MATH_SHEPHERD_TAG = "ки"


def tagged_steps(steps: Sequence[str], tag: str) -> list[str]:
    """Each step as a PRM sees it before its one tag is added: the tag removed wherever it occurs
    (a policy whose step delimiter is the tag keeps it in its steps) and surrounding whitespace
    stripped."""
    return [s.replace(tag, "").strip() for s in steps]


def math_shepherd_text(question: str, steps: Sequence[str], tag: str = MATH_SHEPHERD_TAG) -> str:
    """Math-Shepherd's input: "{question} {step 1} ки\\n{step 2} ки" (the reference layout: one
    space before each tag, steps joined by a newline, nothing after the last tag). `steps` are
    raw step texts; they are cleaned by `tagged_steps`."""
    return f"{question.strip()} " + "\n".join(f"{s} {tag}" for s in tagged_steps(steps, tag))
