"""Problem and Task: what a data set gives the search, and how its answers are graded."""

from __future__ import annotations

from dataclasses import dataclass, field

from ets.extract import extract_answer
from ets.tasks.grading import equivalent

# Appended to every question: the search recognises a finished solution by its \boxed{} answer.
BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


class DatasetError(ValueError):
    """A data set that cannot be used; the message names the file and line of every problem."""


@dataclass(frozen=True)
class Problem:
    id: str  # unique within its data set; names the problem's file in a run directory
    question: str
    gold: str  # the reference final answer (GSM8K: the number after ####)
    meta: dict = field(default_factory=dict, compare=False)  # source fields kept for viewing
    solution: str | None = field(default=None, compare=False)  # the answer field's whole text (GSM8K: the worked solution)


@dataclass(frozen=True)
class Task:
    """How problems of one data set are asked and graded.

    numeric: GSM8K-style answers (a single number; commas, units, `$`, percent normalised
    before the math-verify comparison)."""

    name: str
    numeric: bool = False
    instruction: str = BOXED_INSTRUCTION
    template: str | None = None  # the user turn over {question}, {instruction} (ets.tasks.prompts); None: the spec's

    def prompt(self, problem: Problem) -> str:
        """The question text handed to the policy (which applies its chat template)."""
        if self.template is not None:
            return self.template.format(question=problem.question.strip(), instruction=self.instruction)
        return f"{problem.question.strip()}\n\n{self.instruction}"

    def extract(self, text: str) -> str | None:
        """The final answer a solution's text states (\\boxed{} first, then "The answer is")."""
        return extract_answer(text)

    def same(self, a: str | None, b: str | None) -> bool:
        """Whether two answers are the same (used to group votes)."""
        return equivalent(a, b, self.numeric)

    def grade(self, answer: str | None, gold: str) -> bool:
        return equivalent(answer, gold, self.numeric)

    def evaluate(self, problem: Problem, solution_text: str) -> bool:
        """Grade a whole solution text against the problem's gold answer."""
        return self.grade(self.extract(solution_text), problem.gold)

    def reference(self, problem: Problem):
        """The problem's answer key as a PRM receives it (ets.prm.base.Reference)."""
        from ets.prm.base import Reference

        return Reference(problem.gold, problem.solution, self.numeric)

    def to_dict(self) -> dict:
        d = {"name": self.name, "numeric": self.numeric, "instruction": self.instruction}
        if self.template is not None:  # only then: runs named before templates keep their names
            d["template"] = self.template
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Task:
        return cls(d["name"], bool(d.get("numeric", False)), d.get("instruction", BOXED_INSTRUCTION), d.get("template"))
