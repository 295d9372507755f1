"""The embedded engine's scheduler and step loop, on the tiny random llama of test_engine_hf:
invariants checked after every iteration, continuous batching (a request joins running rows and
leaves without waiting for them), preemption and eviction under a kv_capacity too small for
every problem in flight, the delimiter check on the step's tail, the dtype choice."""

import asyncio

import pytest
import torch

from ets.config import SamplingConfig, SearchConfig
from ets.engines import model_runner
from ets.engines.base import DELIMITER, EOS, LENGTH, Expansion
from ets.engines.hf import HFPolicy, default_dtype, load_policy
from ets.engines.sampler import StepEnd
from ets.prm.default import DefaultPRM
from ets.search import search
from ets.tree import Tree
from test_engine_hf import (SAMPLING, assert_exact_logprobs, reference_logprobs, run, tiny_model, tiny_policy,
                            tiny_tokenizer, tree_shape, unique_tokens)

QUESTIONS = ["5 + 7 = x .", "1 + 2 = x .", "3 + 3 = x ."]
LONG = SamplingConfig(max_step_tokens=40, step_delimiter=". 1")  # steps of up to 40 tokens


def checked(policy):
    """Check the scheduler's and the store's invariants after every iteration, and that the KV
    held during every forward stays within the capacity."""
    step, sched = policy.engine.step, policy.scheduler

    def step_and_check():
        done = step()
        sched.check(policy.engine.batch.rows)
        if policy.kv_capacity is not None:
            assert policy.counters["peak_inflight_kv_tokens"] <= policy.kv_capacity
            assert policy.store.peak <= policy.kv_capacity
        return done

    policy.engine.step = step_and_check
    return policy


def searches(policy, cfg, questions=QUESTIONS):
    async def together():
        return await asyncio.gather(*(search(q, policy, DefaultPRM(), cfg) for q in questions))

    return run(together())


def never_expanded(tree):
    expanded = {n.parent.id for n in tree.nodes[1:]}
    return sum(1 for n in tree.nodes[1:] if n.id not in expanded)


def test_invariants_hold_after_every_iteration_with_problems_in_flight():
    policy = checked(tiny_policy(seed=1))
    cfg = SearchConfig(strategy="rebase", width=4, max_tokens=40, max_depth=6, sampling=SAMPLING)
    results = searches(policy, cfg)
    stats = policy.stats()
    assert stats["recomputed_tokens"] == 0 and stats["preempted_rows"] == 0 and stats["evicted_tokens"] == 0
    assert stats["computed_tokens"] == sum(unique_tokens(r.tree) - never_expanded(r.tree) for r in results)
    assert stats["max_batch_rows"] > cfg.width
    assert not policy.scheduler.requests and not policy.scheduler.waiting and not policy.scheduler.running
    assert policy.store.tokens == 0 and len(policy.engine.batch) == 0


def test_a_capacity_too_small_for_every_problem_in_flight_preempts_and_recomputes():
    """Three problems whose trees and steps together need far more KV than the capacity: rows are
    preempted and tree KV is evicted and recomputed, the capacity is never exceeded, and every
    tree is the one grown without a capacity (a preempted row keeps its tokens and stream)."""
    cfg = SearchConfig(strategy="rebase", width=4, max_tokens=120, max_depth=4, sampling=LONG)
    free = tiny_policy(seed=1)
    trees = [tree_shape(r.tree) for r in searches(free, cfg)]
    assert free.stats()["peak_kv_tokens"] > 220
    capped = checked(tiny_policy(seed=1, kv_capacity=150))
    results = searches(capped, cfg)
    st = capped.stats()
    assert [tree_shape(r.tree) for r in results] == trees
    assert st["peak_kv_tokens"] <= 150
    assert st["preempted_rows"] > 0 and st["evicted_tokens"] > 0 and st["recomputed_tokens"] > 0
    # every token fed once, plus exactly what was fed again
    assert st["computed_tokens"] - st["recomputed_tokens"] == sum(
        unique_tokens(r.tree) - never_expanded(r.tree) for r in results)
    assert capped.store.tokens == 0


def test_a_preempted_row_resumes_with_its_tokens_and_stream():
    """One expansion of 4 long rows under a capacity that holds 4 rows of 16 tokens but not of
    40: the newest rows are preempted as the others grow, then recomputed (beside the finished
    siblings' steps, evicted to make room), and each child is the one drawn without a capacity."""
    def grow_root(policy):
        policy.eos_ids.clear()  # steps run to the length cap
        tree = Tree(*policy.format_prompt("1 + 2 = x ."))
        steps = run(policy.expand([Expansion(tree.root, 4)], SamplingConfig(max_step_tokens=40, step_delimiter="w19 w19 w19")))[0]
        return tree, [s.token_ids for s in steps]

    _, free = grow_root(tiny_policy(seed=3))
    prompt = len(tiny_policy().format_prompt("1 + 2 = x .")[0])
    capped = checked(tiny_policy(seed=3, kv_capacity=prompt + 4 * 17 + 20))
    tree, steps = grow_root(capped)
    st = capped.stats()
    assert steps == free and all(len(s) == 40 for s in steps)
    assert st["preempted_rows"] > 0
    assert st["computed_tokens"] - st["recomputed_tokens"] == prompt + sum(len(s) - 1 for s in steps)
    assert st["peak_kv_tokens"] <= capped.kv_capacity


def test_a_capacity_that_cannot_hold_one_row_is_a_clear_error_and_the_engine_recovers():
    policy = tiny_policy(seed=1, kv_capacity=30)
    cfg = SearchConfig(strategy="rebase", width=4, max_tokens=120, max_depth=4, sampling=LONG)
    with pytest.raises(RuntimeError, match="kv_capacity 30 cannot hold one row"):
        searches(policy, cfg, QUESTIONS[:1])
    assert not policy.scheduler.requests and len(policy.engine.batch) == 0
    policy.kv_capacity = None  # the same policy then works
    assert len(searches(policy, cfg, QUESTIONS[:1])[0].tree.nodes) > 4


def test_a_request_joins_running_rows_and_returns_without_waiting_for_them():
    """A short expansion sent while a long one decodes joins its batch at the next iteration
    and comes back while the long one is still running: no barrier between callers."""
    policy = tiny_policy(seed=0)
    policy.eos_ids.clear()
    long = SamplingConfig(max_step_tokens=30, step_delimiter="w19 w19 w19")
    short = SamplingConfig(max_step_tokens=3, step_delimiter="w19 w19 w19")
    ta, tb = Tree(*policy.format_prompt("1 + 2 = x .")), Tree(*policy.format_prompt("3 + 3 = x ."))

    async def go():
        a = asyncio.create_task(policy.expand([Expansion(ta.root, 2)], long))
        for _ in range(6):
            await asyncio.sleep(0)
        started = policy.counters["iterations"]
        assert started >= 2 and not a.done()
        b = (await policy.expand([Expansion(tb.root, 2)], short))[0]
        assert not a.done()  # b finished first
        return (await a)[0], b, started

    a, b, started = run(go())
    assert policy.counters["iterations"] - started < 30  # b did not wait for a's rows to end
    assert policy.counters["max_batch_rows"] == 4  # both requests' rows decoded together
    assert [len(s.token_ids) for s in a] == [30, 30] and [len(s.token_ids) for s in b] == [3, 3]
    alone = tiny_policy(seed=0)
    alone.eos_ids.clear()
    tc = Tree(*alone.format_prompt("3 + 3 = x ."))
    assert [s.token_ids for s in run(alone.expand([Expansion(tc.root, 2)], short))[0]] == [s.token_ids for s in b]


def test_an_abandoned_request_is_dropped_and_the_others_go_on():
    policy = checked(tiny_policy(seed=0))
    policy.eos_ids.clear()
    long = SamplingConfig(max_step_tokens=30, step_delimiter="w19 w19 w19")
    ta, tb = Tree(*policy.format_prompt("1 + 2 = x .")), Tree(*policy.format_prompt("3 + 3 = x ."))

    async def go():
        a = asyncio.create_task(policy.expand([Expansion(ta.root, 2)], long))
        b = asyncio.create_task(policy.expand([Expansion(tb.root, 3)], long))
        for _ in range(4):
            await asyncio.sleep(0)
        a.cancel()
        return (await b)[0]

    assert len(run(go())) == 3
    assert not policy.scheduler.requests and len(policy.engine.batch) == 0
    assert policy.store.held(ta.root) == 0  # nothing needs a's tree: freed
    assert policy.store.tokens == policy.store.held(tb.root) == len(tb.root.token_ids) + 3 * 29


def test_rows_joining_and_leaving_keep_exact_logprobs(monkeypatch):
    """Rows of different depths and prompts join a running batch at different iterations; with
    almost no slack the batch is laid out again nearly every step. Every log-prob still matches
    a full forward of the row's own sequence."""
    monkeypatch.setattr(model_runner, "SLACK", 1)
    policy = tiny_policy(seed=5)
    sampling = SamplingConfig(max_step_tokens=12, step_delimiter=".")
    ta, tb = Tree(*policy.format_prompt("1 + 2 = x .")), Tree(*policy.format_prompt("w1 w2 w3 w4 w5 w6 w7 ."))
    kids = [ta.add_child(ta.root, s.token_ids, s.text, s.stop_reason, s.logprobs)
            for s in run(policy.expand([Expansion(ta.root, 3)], sampling))[0]]

    async def staggered():
        first = asyncio.create_task(policy.expand([Expansion(kids[0], 3)], sampling))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        second = asyncio.create_task(policy.expand([Expansion(tb.root, 3), Expansion(kids[1], 2)], sampling))
        return await first, await second

    first, second = run(staggered())
    checked_steps = 0
    for node, steps in [(kids[0], first[0]), (tb.root, second[0]), (kids[1], second[1])]:
        checked_steps += assert_exact_logprobs(policy.model, node, steps)
    assert checked_steps == 8


def test_the_delimiter_check_on_the_tail_agrees_with_decoding_the_whole_step():
    tok = tiny_tokenizer()
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    end = StepEnd(decode, {1})
    gen = torch.Generator().manual_seed(0)
    for delim in [".", "w1 w2", "= x", "1 . 2"]:
        sampling = SamplingConfig(max_step_tokens=60, step_delimiter=delim)
        for _ in range(200):
            seq = torch.randint(2, 30, (60,), generator=gen).tolist()
            seq = [0 if t == 2 and torch.rand((), generator=gen) < 0.5 else t for t in seq]  # pads and unks: no text
            cut = [end(seq[:i], sampling) for i in range(1, 61)]
            whole = [DELIMITER if delim in decode(seq[:i]) else (LENGTH if i == 60 else None) for i in range(1, 61)]
            first = next((i for i, r in enumerate(whole) if r), None)
            assert cut[first] == whole[first] and all(r is None for r in cut[:first])
    assert end([5, 1], SamplingConfig(step_delimiter=".")) == EOS


def test_dtype_follows_the_device_and_cpu_and_is_recorded(monkeypatch, tmp_path):
    from ets import serve

    assert default_dtype(torch.device("cuda")) == torch.bfloat16
    monkeypatch.setattr(serve, "cpu_dtype", lambda: "bfloat16")
    assert default_dtype(torch.device("cpu")) == torch.bfloat16
    monkeypatch.setattr(serve, "cpu_dtype", lambda: "float32")
    assert default_dtype(torch.device("cpu")) == torch.float32
    tiny_model().save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    chosen = load_policy(str(tmp_path), device="cpu")
    assert chosen.stats()["dtype"] == "float32"
    tree = Tree(*chosen.format_prompt("1 + 2 = x ."))
    assert chosen.observe(tree.root)["dtype"] == "float32"
    forced = load_policy(str(tmp_path), device="cpu", dtype="bfloat16")
    assert forced.stats()["dtype"] == "bfloat16" and next(forced.model.parameters()).dtype == torch.bfloat16
    assert len(run(forced.expand([Expansion(Tree(*forced.format_prompt("1 + 2 = x .")).root, 2)], SAMPLING))[0]) == 2


def test_hfpolicy_keeps_its_public_surface():
    policy = tiny_policy()
    assert isinstance(policy, HFPolicy)
    keys = {"prefill_tokens", "decode_tokens", "computed_tokens", "decode_steps", "waves", "rows",
            "max_batch_rows", "mean_batch_rows", "peak_kv_tokens", "kv_tokens_now", "generated_tokens",
            "policy_calls", "batched_calls", "kv_capacity", "device", "dtype", "preempted_rows",
            "evicted_tokens", "recomputed_tokens"}
    assert keys <= set(policy.stats())


@pytest.mark.slow
def test_the_delimiter_check_on_the_tail_agrees_on_the_default_models_tokenizer():
    from transformers import AutoTokenizer

    from ets.models import default_model_dir

    tok = AutoTokenizer.from_pretrained(str(default_model_dir()), local_files_only=True)
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    end = StepEnd(decode, {tok.eos_token_id})
    # ids of whitespace-heavy text, mixed with random ids (some decode to part of a character)
    text_ids = tok("Step 1: 3 * 4 = 12.\n\nStep 2:  12 + 5 = 17 \n The answer is 17.\n\n", add_special_tokens=False)["input_ids"]
    gen = torch.Generator().manual_seed(0)
    for delim in ["\n\n", "\n", " ", ".\n"]:
        sampling = SamplingConfig(max_step_tokens=80, step_delimiter=delim)
        for _ in range(100):
            pool = torch.randint(0, tok.vocab_size, (40,), generator=gen).tolist() + text_ids
            seq = [pool[i] for i in torch.randint(0, len(pool), (80,), generator=gen).tolist()]
            seq = [t for t in seq if t != tok.eos_token_id]
            cut = [end(seq[:i], sampling) for i in range(1, len(seq) + 1)]
            first = next((i for i in range(len(seq)) if delim in decode(seq[:i + 1])), None)
            if first is None:
                assert all(r in (None, LENGTH) for r in cut)
            else:
                assert cut[first] == DELIMITER and all(r is None for r in cut[:first])


def test_a_prompt_longer_than_the_prefill_budget_is_fed_in_chunks():
    policy = checked(tiny_policy(seed=2, prefill_budget=4))
    tree = Tree(*policy.format_prompt("w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 ."))
    prompt = tree.root.token_ids
    other = Tree(*policy.format_prompt("1 + 2 = x ."))

    async def both():
        return await asyncio.gather(policy.expand([Expansion(tree.root, 3)], SAMPLING),
                                    policy.expand([Expansion(other.root, 2)], SAMPLING))

    steps = run(both())[0][0]
    st = policy.stats()
    assert st["prefill_tokens"] == len(prompt) + len(other.root.token_ids)  # each token fed once
    assert st["prefill_calls"] >= -(-len(prompt) // 4)
    for step in steps:
        ref = reference_logprobs(policy.model, list(prompt), list(step.token_ids))
        assert max(abs(a - b) for a, b in zip(ref, step.logprobs)) < 1e-4
