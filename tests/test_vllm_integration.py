"""ETS through a real vLLM server (the default model, CPU build): the `vllm_server` fixture
starts it; skipped with the reason when no vLLM venv is found (.ci/vllm-setup.sh makes one)."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from ets.config import SamplingConfig, SearchConfig
from ets.engines.base import DELIMITER, EOS, LENGTH
from ets.engines.mock import MockPolicy
from ets.engines.server import ServerPolicy
from ets.prm.default import DefaultPRM
from ets.prm.mock import MockPRM
from ets.search import SearchResult, search
from ets.tasks import gsm8k

pytestmark = pytest.mark.server
# The pooling test comes first: its server is stopped before the generation server starts.

# Small on purpose: three problems in flight at width 4 on two CPU cores. Steps are lines ("\n"),
# at temperature 0.7: the search rejects a first depth where no step reached the delimiter, and
# the server is not seeded, so with "\n\n" and 64-token steps this model's four first steps all
# ran past the cap in one CI run out of many. Depth 3 still includes one ETS pruning decision.
DELIM = "\n"
CFG = SearchConfig(strategy="ets", width=4, max_tokens=96, max_depth=3, seed=0,
                   sampling=SamplingConfig(temperature=0.7, max_step_tokens=64, step_delimiter=DELIM),
                   strategy_params={"embedder": "hash"})


def _run(policy, questions, prm=DefaultPRM):
    async def go():
        try:
            return await asyncio.gather(*(search(q, policy, prm(), CFG) for q in questions))
        finally:
            await policy.aclose()
    return asyncio.run(go())


def test_served_prm_through_vllm_pooling(vllm_pooling_server):
    """ServedPRM's requests against real vLLM step pooling: one score per step, cache reuse."""
    from conftest import POOLING_STEP_TAG

    from ets.prm.base import ScoreRequest
    from ets.prm.served import ServedPRM
    from ets.tree import Tree

    tree = Tree([1], "q")
    a = tree.add_child(tree.root, [2], "Add 3 and 5.\n\n", DELIMITER)
    b = tree.add_child(a, [3], "That gives 8.\n\n", DELIMITER)
    prm = ServedPRM(vllm_pooling_server.url, step_tag=POOLING_STEP_TAG)

    async def go():
        try:
            first = await prm.score([ScoreRequest("What is 3+5?", b), ScoreRequest("What is 3+5?", a)])
            again = await prm.score([ScoreRequest("What is 3+5?", b)])
            return first, again
        finally:
            await prm.aclose()

    first, again = asyncio.run(go())
    assert [len(s) for s in first] == [2, 1] and again == first[:1]
    assert all(0.0 <= s <= 1.0 for s in first[0])
    assert prm.stats()["requests"] == 1 and prm.stats()["paths_cached"] == 1


def test_ets_search_through_vllm(vllm_server):
    questions = [gsm8k.TASK.prompt(p) for p in gsm8k.load()[:3]]
    policy = ServerPolicy(vllm_server.url, metrics_interval_s=0.2)  # tokenizer: the served folder
    results = _run(policy, questions)
    stats = policy.stats()

    # the same structure as a search through the mock engine
    (ref,) = _run(MockPolicy(), questions[:1], MockPRM)
    trace_fields = [f.name for f in dataclasses.fields(ref.trace[0])]
    for res in results:
        assert isinstance(res, SearchResult) and res.trace
        assert [f.name for f in dataclasses.fields(res.trace[0])] == trace_fields
        assert res.kv_summary().keys() == ref.kv_summary().keys()
        assert set(res.counters) >= set(ref.counters)
        for node in res.tree.nodes[1:]:
            assert node.token_ids and node.stop_reason in (DELIMITER, EOS, LENGTH)
            assert isinstance(node.score, float)
            assert node.logprobs is not None and len(node.logprobs) == len(node.token_ids)
            if node.stop_reason == DELIMITER:
                assert DELIM in node.text
        for t in res.trace:
            assert t.kv_tokens > 0
            assert t.engine["server"] == vllm_server.url
            assert t.engine["prefix_queries"] is not None and t.engine["kv_capacity_tokens"] > 0

    # the server saw the tree's sharing: siblings reuse their parent's cached prefix
    assert stats["server_prefix_hits"] > 0, stats
    assert stats["retries"] == 0
    # every prompt token the policy sent is accounted for by the server
    assert stats["prompt_tokens"] > 0 and stats["completion_tokens"] >= sum(
        r.counters["generated_tokens"] for r in results)



def test_engine_ratios_benchmark_runs_every_arm(vllm_server):
    """benchmarks/bench_engine_ratios.py end to end at toy size: the embedded and server arms in
    one invocation, a row per arm and the five ratios (its server arms once crashed on closing
    the client in a second event loop, after the arms had run, losing the table)."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_engine_ratios.py"
    out = subprocess.run([sys.executable, str(script), "--problems", "1", "--width", "2", "--max-tokens", "32",
                          "--max-step-tokens", "64", "--temperature", "0.7", "--embedder", "hash", "--threads", "1",
                          "--policy", vllm_server.url], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    for arm in ("embedded search", "plain generate", "plain generate, search's load", "vLLM search",
                "vLLM plain sampling", "vLLM plain, search's load"):
        assert re.search(rf"^\s*{arm}\s+2\s+\d+\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+[\d.]+$", out.stdout, re.M), (arm, out.stdout)
    # the server's load during the search was read from /metrics: one problem of W=2, so at most 2
    running = float(re.search(r"^\s*vLLM search(?:\s+\S+){5}\s+([\d.]+)$", out.stdout, re.M).group(1))
    assert 0 <= running <= 2, out.stdout
    assert len(re.findall(r"\(tok/s\):\s+[\d.]+x$", out.stdout, re.M)) == 5, out.stdout
