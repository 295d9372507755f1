"""A PRM learned from the policy's own rollouts (`ets train-prm`, made by ets.prm.train).

What it is: a logistic-regression value head over cheap features of a solution prefix. The
score of step i of a path is the estimated probability that a solution through steps 1..i ends
with the right answer (an outcome-supervised value model; with Math-Shepherd labels, the
estimated share of completions from that prefix that reach the gold answer).

Features of a prefix (question q, steps 1..i), FEATURES_VERSION 2, by feature set (FEATURE_SETS):
    "full" (default):
      e(q), e(p), e(q) * e(p)   e = the embedder (MiniLM, or the hashed bag of words for tests),
                                p = the last `tail_chars` characters of steps 1..i joined;
      statistics                the policy's token log-prob statistics of step i and of the
                                prefix, depth, token counts, whether step i states a final answer,
                                the arithmetic checks of ets.prm.default over steps 1..i
                                (STAT_NAMES_V1), and what the prefix does with the question's
                                numbers and its final answer (STAT_NAMES_ANSWER); see stat_values.
    "stats": the statistics only (21 columns, no embedder loaded): what the default PRM looks at
      and a few plain facts about the answer, weighted by a fit instead of by hand; too few
      columns to memorise a few hundred problems.
    "stats-split": the same columns, two heads: one for the prefixes that state a final answer
      (column SPLIT_ON set), one for the open ones. In one head the answered prefixes (the
      final step, what a vote reads) are outnumbered about six to one by open ones.
Version 2 reads numbers (the final answer, the question's numbers, a statement's result) through
the grader's normalisation (ets.tasks.grading.normalize_number: "18 dollars" -> 18, "1,234.00" ->
1234, "\\frac{3}{4}" -> 3/4); version 1 stripped commas and dollar signs by hand. A file records its
version and is scored with the features it was fitted on.

The file: ONE .npz holding `weight` [D], `bias` [1], `mean` [D], `scale` [D] (a file of H > 1 heads:
`weight`, `mean`, `scale` [H, D], `bias` [H]; a row is scored by head Features.head_of(row)) and `meta`, a JSON
string: {"format", "kind", "policy" (policy_identity of the policy it was trained on),
"features" {"version", "set", "embedder", "embedder_name", "tail_chars", "stats" (the statistics' names, in
column order), "dim"} (a file without "set" is "full"; without "stats", STAT_NAMES_V1), "labels",
"data", "fit", "heldout", "train"}. Loaded without pickle.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import re
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np

from ets.prm.base import PRMError, RewardModel, ScoreRequest
from ets.prm.registry import Option, PRMKind, SpecError, register
from ets.prm.train import FEATURE_SETS  # defined there: the CLI reads it without importing numpy

FORMAT = 1
KIND = "ets-learned-prm"
FEATURES_VERSION = 2  # what new files are made with
FEATURES_VERSIONS = (1, 2)  # what this ets can compute (see the module docstring)
# The statistics of a prefix, by name (a file lists the names it was fitted on, in order, so
# that files made before a statistic was added keep their columns).
STAT_NAMES_V1 = ("last_lp_mean", "last_lp_min", "last_lp_std", "last_tokens_log", "path_lp_mean",
                 "path_step_lp_min", "has_logprobs", "depth_log", "path_tokens_log", "final_answer",
                 "arith_right_log", "arith_wrong_log", "arith_wrong_any")
# Read against the question: the share of the question's numbers the prefix uses, and for a
# prefix that states a final answer, what kind of number it is and where it came from (a
# statement's result "= X", or copied from the question); repeated lines (a looping sample).
STAT_NAMES_ANSWER = ("question_numbers_used", "answer_integer", "answer_not_integer", "answer_negative",
                     "answer_log_magnitude", "answer_in_question", "answer_computed", "repeated_lines")
STAT_NAMES = STAT_NAMES_V1 + STAT_NAMES_ANSWER  # what new files are fitted on
SPLIT_ON = "final_answer"  # "stats-split": head 1 scores the rows with this statistic set, head 0 the rest


class PolicyMismatch(ValueError):
    """A learned PRM file made for another policy than the one it is asked to score for."""


def policy_identity(policy) -> str:
    """The model a policy samples from, as a learned PRM records it: the model's folder or file
    name, so that the same model embedded (`hf:<name>`) or served by vLLM (served id = a path or
    a hub name) matches; "mock" for the mock policy; otherwise the policy's `name`."""
    name = str(getattr(policy, "name", "?"))
    if name.startswith("hf:"):
        return name[3:]
    if name.startswith("server"):
        model = getattr(policy, "model", None)
        if model is None:  # the served model's id, asked from the first server's /v1/models
            model = policy._model_name_sync(policy.servers[0])
        return Path(str(model).rstrip("/")).name
    return name


_NUMBER = re.compile(r"\d[\d,]*(?:\.\d+)?")
_RESULT = re.compile(r"=\s*\\?\$?\s*(\d[\d,]*(?:\.\d+)?)")


def _numbers(text: str, pattern: re.Pattern = _NUMBER, version: int = FEATURES_VERSION) -> set[str]:
    """The numbers `pattern` finds in `text`: without thousands commas (version 1), or as the
    grader normalises them (version 2: "2.50" -> "2.5")."""
    from ets.tasks.grading import normalize_number

    found = pattern.findall(text)
    if version == 1:
        return {x.replace(",", "") for x in found}
    return {n for n in map(normalize_number, found) if n is not None}


def _read_answer(text: str, version: int) -> tuple[str, float | None]:
    """The final answer step `text` states, as the statistics compare it ("" when none), and its
    value when it is one number (None otherwise)."""
    from fractions import Fraction

    from ets.extract import extract_answer
    from ets.tasks.grading import normalize_number

    raw = extract_answer(text) or ""
    if version == 1:
        answer = raw.replace(",", "").replace("\\$", "").replace("$", "").strip()
    else:  # a text answer with no single number stays as text: an answer, not a number
        answer = normalize_number(raw) or raw.strip()
    try:
        value = float(Fraction(answer)) if version > 1 and "/" in answer else float(answer)
    except (ValueError, ZeroDivisionError):
        return answer, None
    return answer, value if math.isfinite(value) else None


def stat_values(question: str, steps: Sequence[tuple[str, Sequence[float] | None]],
                version: int = FEATURES_VERSION) -> dict[str, float]:
    """Every statistic of STAT_NAMES for the prefix `steps` [(text, token log-probs or None), ...]
    (non-empty) of `question`, as features `version` computes them."""
    from ets.extract import has_final_answer
    from ets.prm.default import check_arithmetic

    text, lps = steps[-1]
    last = np.asarray(lps if lps else [], float)
    all_lps = [x for _, s in steps if s for x in s]
    step_means = [float(np.mean(s)) for _, s in steps if s]
    right = wrong = 0
    for t, _ in steps:
        c, e = check_arithmetic(t)
        right, wrong = right + c, wrong + e
    has = bool(len(last))
    out = dict(zip(STAT_NAMES_V1, (
        last.mean() if has else 0.0, last.min() if has else 0.0, last.std() if has else 0.0,
        math.log1p(len(lps or ())), float(np.mean(all_lps)) if all_lps else 0.0,
        min(step_means) if step_means else 0.0, float(has), math.log1p(len(steps)),
        math.log1p(sum(len(s or ()) for _, s in steps)), float(has_final_answer(text)),
        math.log1p(right), math.log1p(wrong), float(wrong > 0))))

    path = "".join(t for t, _ in steps)
    asked = _numbers(question, version=version)
    out["question_numbers_used"] = len(asked & _numbers(path, version=version)) / len(asked) if asked else 1.0
    answer, value = _read_answer(text, version)
    number = value is not None
    out["answer_integer"] = float(number and value == int(value))
    out["answer_not_integer"] = float(bool(answer) and not out["answer_integer"])
    out["answer_negative"] = float(number and value < 0)
    out["answer_log_magnitude"] = math.log10(abs(value) + 1) if number else 0.0
    out["answer_in_question"] = float(bool(answer) and answer in asked)
    out["answer_computed"] = float(bool(answer) and answer in _numbers(path, _RESULT, version))
    lines = [x.strip() for x in path.splitlines() if x.strip()]
    out["repeated_lines"] = 1.0 - len(set(lines)) / len(lines) if lines else 0.0
    return out


class Features:
    """Feature rows of solution prefixes (see the module docstring). `embedder`: a key of
    ets.cluster.EMBEDDERS ("minilm" | "hash"), unused (not loaded) by the "stats" set. Question
    embeddings are cached by text."""

    def __init__(self, embedder: str = "minilm", tail_chars: int = 1000, feature_set: str = "full",
                 stats: Sequence[str] = STAT_NAMES, version: int = FEATURES_VERSION):
        from ets.cluster import make_embedder

        if version not in FEATURES_VERSIONS:
            raise ValueError(f"features version {version!r}: this ets computes versions {FEATURES_VERSIONS} "
                             "(a newer ets made the file?)")
        if feature_set not in FEATURE_SETS:
            raise ValueError(f"feature set must be one of {FEATURE_SETS}, got {feature_set!r}")
        unknown = [n for n in stats if n not in STAT_NAMES]
        if unknown:
            raise ValueError(f"unknown statistics {unknown} (made by a newer ets?); this one computes {STAT_NAMES}")
        if feature_set == "stats-split" and SPLIT_ON not in stats:
            raise ValueError(f"the stats-split feature set needs the statistic {SPLIT_ON!r} to split on")
        self.embedder_key, self.tail_chars, self.feature_set = embedder, tail_chars, feature_set
        self.stats, self.version = tuple(stats), version
        self.embedder = make_embedder(embedder) if feature_set == "full" else None
        self._questions: dict[str, np.ndarray] = {}

    @property
    def heads(self) -> int:
        """How many heads a file of this feature set has."""
        return 2 if self.feature_set == "stats-split" else 1

    def head_of(self, x: np.ndarray) -> np.ndarray:
        """[N] int: the head that scores each feature row of x [N, D] (0 for a one-head set)."""
        if self.heads == 1:
            return np.zeros(len(x), np.int64)
        return (x[:, self.stats.index(SPLIT_ON)] > 0.5).astype(np.int64)

    def describe(self) -> dict:
        out = {"version": self.version, "set": self.feature_set, "stats": list(self.stats)}
        if self.embedder is not None:
            out |= {"embedder": self.embedder_key, "embedder_name": self.embedder.name, "tail_chars": self.tail_chars}
        return out

    @classmethod
    def from_meta(cls, f: dict) -> "Features":
        """The Features a file's meta["features"] describes."""
        return cls(f.get("embedder", "minilm"), f.get("tail_chars", 1000), f.get("set", "full"),
                   f.get("stats", STAT_NAMES_V1), f.get("version", 1))

    def _stat_rows(self, questions, prefixes) -> np.ndarray:
        rows = [stat_values(q, steps, self.version) for q, steps in zip(questions, prefixes)]
        return np.array([[r[n] for n in self.stats] for r in rows], np.float64).reshape(len(rows), len(self.stats))

    def _embed(self, texts: list[str]) -> np.ndarray:
        e = np.asarray(self.embedder.embed(texts), np.float64)
        n = np.linalg.norm(e, axis=1, keepdims=True)
        return e / np.where(n == 0, 1.0, n)  # unit rows: e(q) * e(p) sums to their cosine

    def rows(self, questions: Sequence[str], prefixes: Sequence[Sequence[tuple[str, Sequence[float] | None]]],
             batch: int = 256) -> np.ndarray:
        """[N, D] float32, row n for prefix `prefixes[n]` (non-empty list of (step text, log-probs))
        of question `questions[n]`."""
        if len(questions) != len(prefixes):
            raise ValueError("one question per prefix")
        if self.embedder is None:
            return self._stat_rows(questions, prefixes).astype(np.float32)
        new = sorted({q for q in questions if q not in self._questions})
        for i in range(0, len(new), batch):
            for q, e in zip(new[i:i + batch], self._embed(new[i:i + batch])):
                self._questions[q] = e
        out = []
        for i in range(0, len(prefixes), batch):
            chunk = prefixes[i:i + batch]
            p = self._embed(["".join(t for t, _ in steps)[-self.tail_chars:] or " " for steps in chunk])
            q = np.stack([self._questions[x] for x in questions[i:i + batch]])
            s = self._stat_rows(questions[i:i + batch], chunk)
            out.append(np.hstack([q, p, q * p, s]).astype(np.float32))
        if not out:
            return np.zeros((0, 0), np.float32)
        return np.vstack(out)


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, np.float64)))  # stable for any z


def score_rows(x, head, weight, bias, mean, scale) -> np.ndarray:
    """sigmoid(((x - mean) / scale) . weight + bias) row by row, with row n's head's parameters:
    x [N, D], head [N] ints; weight, mean, scale [D] (one head) or [H, D]; bias [1] or [H]."""
    weight, mean, scale = (np.atleast_2d(np.asarray(a, np.float64)) for a in (weight, mean, scale))
    bias = np.asarray(bias, np.float64).reshape(-1)
    head = np.asarray(head, np.int64)
    z = (((np.asarray(x, np.float64) - mean[head]) / scale[head]) * weight[head]).sum(1) + bias[head]
    return sigmoid(z)


def save(path: str | Path, weight, bias, mean, scale, meta: dict) -> Path:
    """Write the one-file PRM (atomically: a reader sees the old file or the whole new one); bias:
    a number (one head) or one per head."""
    import os
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "kind": KIND, **meta}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".npz", dir=path.parent)
    os.close(fd)
    try:
        np.savez(tmp, weight=np.asarray(weight, np.float64), bias=np.asarray(bias, np.float64).reshape(-1),
                 mean=np.asarray(mean, np.float64), scale=np.asarray(scale, np.float64),
                 meta=np.array(json.dumps(meta, default=float)))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load(path: str | Path) -> tuple[dict, dict]:
    """(arrays, meta) of a learned PRM file; ValueError naming the file, what is wrong with it and
    the fix (`ets train-prm` rebuilds it) when it is not one: empty, truncated, not an .npz, arrays
    missing or of shapes that do not fit each other or its feature set, values not finite."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"learned PRM file {path} not found; make one with `ets train-prm`")

    def refuse(what: str) -> ValueError:
        return ValueError(f"learned PRM file {path}: {what}; rebuild it with `ets train-prm` "
                          "(or give another --prm learned:FILE)")

    if not path.is_file():
        raise refuse("not a regular file")
    if path.stat().st_size == 0:
        raise refuse("the file is empty")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("weight", "bias", "mean", "scale", "meta") if k not in z.files]
            if missing:
                raise refuse(f"no {', '.join(missing)} array(s) in it: not a learned PRM file")
            arrays = {k: z[k] for k in ("weight", "bias", "mean", "scale")}
            meta = json.loads(str(z["meta"]))
    except ValueError as e:
        if str(e).startswith(f"learned PRM file {path}"):
            raise
        raise refuse(f"unreadable ({' '.join(str(e).split())[:120]})") from None
    except Exception as e:  # noqa: BLE001 - truncated zips, bad headers: all one answer
        raise refuse(f"unreadable, truncated or not an .npz ({type(e).__name__}: "
                     f"{' '.join(str(e).split())[:120]})") from None
    if not isinstance(meta, dict):
        raise refuse("its meta is not a JSON object")
    if meta.get("kind") != KIND or meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a learned PRM file of format {FORMAT} (kind {meta.get('kind')!r}, "
                         f"format {meta.get('format')!r})")
    features = meta.get("features")
    if not isinstance(features, dict):
        raise refuse("its meta has no features description")
    if features.get("version") not in FEATURES_VERSIONS:
        raise ValueError(f"{path} uses features version {features.get('version')}; this ets "
                         f"computes versions {FEATURES_VERSIONS}: retrain it with `ets train-prm`")
    if any(a.dtype.kind not in "fiu" for a in arrays.values()):
        raise refuse("its arrays are not numbers")
    w = arrays["weight"]
    heads = 1 if w.ndim == 1 else w.shape[0]
    if w.ndim not in (1, 2) or w.shape[-1] == 0 or arrays["mean"].shape != w.shape \
            or arrays["scale"].shape != w.shape or arrays["bias"].shape != (heads,):
        raise refuse(f"array shapes do not match (weight {w.shape}, bias {arrays['bias'].shape}, "
                     f"mean {arrays['mean'].shape}, scale {arrays['scale'].shape})")
    stats = features.get("stats", STAT_NAMES_V1)
    fset = features.get("set", "full")
    want = len(stats) if fset in ("stats", "stats-split") and isinstance(stats, list | tuple) else features.get("dim")
    if isinstance(want, int) and not isinstance(want, bool) and w.shape[-1] != want:
        raise refuse(f"weight has {w.shape[-1]} columns, its feature set {fset!r} has {want}")
    if not all(np.isfinite(a).all() for a in arrays.values()):
        raise refuse("it holds values that are not finite (NaN or infinite)")
    return arrays, meta


def file_digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:8]


class LearnedPRM(RewardModel):
    """The PRM in a file made by `ets train-prm` (see the module docstring).

    policy: the policy the search samples from; when given, its policy_identity must be the one
    the file was trained for, else PolicyMismatch (any_policy=True: use it anyway). Scores are in
    (0, 1); the score of a prefix depends only on the question and that prefix, so each node's
    is computed once and reused for every longer path through it (a per-node cache)."""

    def __init__(self, path: str | Path, policy=None, any_policy: bool = False):
        self.path = Path(path)
        arrays, self.meta = load(self.path)
        self.weight, self.bias = arrays["weight"], arrays["bias"]
        self.mean, self.scale = arrays["mean"], arrays["scale"]
        trained_for = self.meta.get("policy")
        if policy is not None and not any_policy:
            used = policy_identity(policy)
            if used != trained_for:
                raise PolicyMismatch(
                    f"learned PRM {self.path} was trained for policy {trained_for!r}, not {used!r} (this run's "
                    f"policy); train one for it with `ets train-prm --policy ...`, or pass "
                    f"learned:{self.path}?any_policy=1 to use it anyway")
        f = self.meta["features"]
        self.features = Features.from_meta(f)
        if len(self.bias) != self.features.heads:
            raise ValueError(f"{self.path} holds {len(self.bias)} head(s), its feature set {self.features.feature_set!r} "
                             f"has {self.features.heads}")
        if self.features.embedder is not None and \
                self.features.embedder.name != f.get("embedder_name", self.features.embedder.name):
            raise ValueError(f"{self.path} was made with embedder {f['embedder_name']!r}, this one is "
                             f"{self.features.embedder.name!r}")
        self.name = f"learned:{self.path.name}@{file_digest(self.path)}"
        self._cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ets-learned-prm")
        self.calls = self.paths = self.computed = 0

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Scores of feature rows [N, D] (from Features.rows)."""
        if x.shape[1] != self.weight.shape[-1]:
            raise PRMError(f"{self.path}: feature rows have {x.shape[1]} columns, the file {self.weight.shape[-1]}")
        return score_rows(x, self.features.head_of(x), self.weight, self.bias, self.mean, self.scale)

    def _compute(self, questions: list[str], nodes: list) -> list[float]:
        prefixes = [[(n.text, n.logprobs) for n in node.path()] for node in nodes]
        return [float(s) for s in self.predict(self.features.rows(questions, prefixes))]

    async def score(self, requests: Sequence[ScoreRequest]) -> list[list[float]]:
        self.calls += 1
        self.paths += len(requests)
        todo: dict = {}  # node -> question, every prefix node not scored yet (in order)
        for req in requests:
            for node in req.node.path():
                if node not in self._cache and node not in todo:
                    todo[node] = req.question
        if todo:
            nodes = list(todo)
            scores = await asyncio.get_running_loop().run_in_executor(
                self._pool, self._compute, [todo[n] for n in nodes], nodes)
            self.computed += len(nodes)
            for node, s in zip(nodes, scores):
                if not math.isfinite(s):
                    raise PRMError(f"learned PRM gave no finite score for node {node.id}: {s!r}")
                self._cache[node] = s
        return [[self._cache[n] for n in req.node.path()] for req in requests]

    def stats(self) -> dict:
        return {"prm_calls": self.calls, "prm_paths": self.paths, "prm_prefixes_computed": self.computed}

    async def aclose(self) -> None:
        self._pool.shutdown(wait=False)


def _identity(spec) -> str:
    """A learned PRM names its run by its file's content: the same file under another path
    resumes the same run, a file retrained in place starts a new one."""
    try:
        digest = hashlib.sha256(Path(spec.target).expanduser().read_bytes()).hexdigest()[:16]
    except OSError as e:
        raise SpecError(f"--prm {spec}: cannot read {spec.target} ({e.strerror}); make one with `ets train-prm`") from e
    return f"learned:sha256={digest}" + ("?any_policy=1" if spec.get("any_policy") else "")


def _check(spec) -> None:
    if not Path(spec.target).expanduser().is_file():
        raise SpecError(f"--prm {spec}: no file {spec.target}; make one with `ets train-prm`")


register(PRMKind(
    "learned", "a value head fitted by `ets train-prm` on the policy's own rollouts, over statistics of "
    "the prefix (a .npz file; refused for another policy unless any_policy=1)", ("path",),
    lambda spec, ctx: LearnedPRM(Path(spec.target).expanduser(), policy=ctx.policy, any_policy=spec.get("any_policy")),
    options=(Option("any_policy", bool, False, "use the file with a policy it was not trained for"),),
    check=_check, identity=_identity, tested="tests/test_learned_prm.py (fit, load, score, refusals)"))
