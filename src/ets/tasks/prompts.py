"""Prompt templates: how a problem is put to the policy (`--prompt-template`, `--system-prompt`).

A template is the user turn (a format string over {question} and {instruction}, the task's
\\boxed{} instruction) and a system turn (None: no system turn, the chat template's own default).
The policy applies its chat template to them (ets.engines.*.format_prompt). A template other
than `spec` is recorded in the task (Task.template), so it names the run.

Presets:
- `spec` (default): the question and the \\boxed{} instruction as the user turn, no system turn (SPEC).
- `qwen-math`: Qwen2.5-Math's chain-of-thought prompt (its model card): the system turn "Please
  reason step by step, and put your final answer within \\boxed{}.", the question alone as the user turn.
- `sal-llama3`: search-and-learn's prompt for Llama-3 instruct policies (huggingface/search-and-learn,
  src/sal/config.py `system_prompt`): its step-by-step system turn ("## Step 1: ..." steps, ending
  "Therefore, the final answer is: $\\boxed{answer}$. I hope it is correct."), the question alone as
  the user turn, steps separated by a blank line (`--step-delimiter '\\n\\n'`, the default for a
  served policy). search-and-learn also replaces Llama's chat template (a fixed date line); with
  the model's own template the system turn is the same text.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ets.tasks.base import Task

QWEN_MATH_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
SAL_LLAMA3_SYSTEM = (
    "Solve the following math problem efficiently and clearly:\n\n"
    "- For simple problems (2 steps or fewer):\nProvide a concise solution with minimal explanation.\n\n"
    "- For complex problems (3 steps or more):\nUse this step-by-step format:\n\n"
    "## Step 1: [Concise description]\n[Brief explanation and calculations]\n\n"
    "## Step 2: [Concise description]\n[Brief explanation and calculations]\n\n...\n\n"
    "Regardless of the approach, always conclude with:\n\n"
    "Therefore, the final answer is: $\\boxed{answer}$. I hope it is correct.\n\n"
    "Where [answer] is just the final number or expression that solves the problem.")


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    user: str  # format string over {question} and {instruction}
    system: str | None = None
    step_delimiter: str = "\n\n"  # the steps the prompt asks for

    def apply(self, task: Task) -> Task:
        """`task` asking its problems this way (the spec's template leaves it as it is)."""
        return task if self.name == "spec" else replace(task, template=self.user)


PRESETS = {t.name: t for t in (
    PromptTemplate("spec", "{question}\n\n{instruction}"),
    PromptTemplate("qwen-math", "{question}", QWEN_MATH_SYSTEM),
    PromptTemplate("sal-llama3", "{question}", SAL_LLAMA3_SYSTEM),
)}


def preset(name: str) -> PromptTemplate:
    if name not in PRESETS:
        raise ValueError(f"unknown prompt template {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]
