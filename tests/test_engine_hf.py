"""The tree-KV engine, on a tiny random llama built here (fast), and on the real default model
(slow)."""

import asyncio

import pytest
import torch

from ets.config import SamplingConfig, SearchConfig
from ets.engines.base import DELIMITER, EOS, LENGTH, Expansion
from ets.engines.hf import HFPolicy, sample
from ets.prm.default import DefaultPRM
from ets.search import search
from ets.tree import Tree, kv_footprint

WORDS = ["<pad>", "<eos>", "<unk>", ".", "+", "=", "x"] + [str(i) for i in range(20)] + [f"w{i}" for i in range(20)]


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def tiny_model(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      eos_token_id=1, pad_token_id=0, bos_token_id=None)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # make "." and <eos> likely enough that steps end all three ways
        model.lm_head.weight[3] *= 0
        model.lm_head.weight[1] *= 0
        model.lm_head.bias = None
    return model


def tiny_policy(seed=0, **kw):
    return HFPolicy(tiny_model(), tiny_tokenizer(), device="cpu", seed=seed, **kw)


SAMPLING = SamplingConfig(max_step_tokens=6, step_delimiter=".")


def run(coro):
    return asyncio.run(coro)


def grow(policy, tree, node, n, sampling=SAMPLING):
    steps = run(policy.expand([Expansion(node, n)], sampling))[0]
    return [tree.add_child(node, s.token_ids, s.text, s.stop_reason, s.logprobs) for s in steps]


def reference_logprobs(model, prefix, step):
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([prefix + step])).logits[0].float(), -1)
    return [lp[len(prefix) - 1 + i, t].item() for i, t in enumerate(step)]


def assert_exact_logprobs(model, node, steps) -> int:
    """Each step's log-probs equal a full forward's over `node`'s path + the step; returns the
    number of steps checked."""
    for step in steps:
        ref = reference_logprobs(model, node.path_token_ids(), list(step.token_ids))
        assert max(abs(a - b) for a, b in zip(ref, step.logprobs)) < 1e-4
    return len(steps)


def test_reused_kv_gives_the_same_logprobs_as_a_full_forward():
    policy = tiny_policy(seed=3)
    ids, text = policy.format_prompt("1 + 2 = x .")
    tree = Tree(ids, text)
    kids = grow(policy, tree, tree.root, 4)
    # two requests of different depths and prefix lengths decoded in one padded batch
    grand = grow(policy, tree, kids[0], 2)
    steps = run(policy.expand([Expansion(kids[1], 3), Expansion(grand[0], 2)], SAMPLING))
    checked = 0
    for node, node_steps in zip([kids[1], grand[0]], steps):
        assert len(node_steps) == (3 if node is kids[1] else 2)
        checked += assert_exact_logprobs(policy.model, node, node_steps)
    assert checked == 5


def test_steps_end_at_delimiter_eos_or_length():
    policy = tiny_policy(seed=1)
    tree = Tree(*policy.format_prompt("3 + 4 = x ."))
    nodes = grow(policy, tree, tree.root, 40)
    reasons = {n.stop_reason for n in nodes}
    assert reasons == {DELIMITER, EOS, LENGTH}, reasons  # the tiny model is biased to produce all three
    for n in nodes:
        ids, text_before = n.token_ids, policy.tok.decode(n.token_ids[:-1], skip_special_tokens=True)
        assert "." not in text_before  # the step stops at the first delimiter
        assert len(n.logprobs) == len(ids) and all(lp <= 0 for lp in n.logprobs)
        if n.stop_reason == DELIMITER:
            assert "." in n.text and ids[-1] == 3  # the delimiter token is part of the step
        elif n.stop_reason == EOS:
            assert ids[-1] == 1
        else:
            assert len(ids) == SAMPLING.max_step_tokens and "." not in n.text


def test_seeded_sampling_is_reproducible():
    a, b = tiny_policy(seed=7), tiny_policy(seed=7)
    ta, tb = Tree(*a.format_prompt("1 + 1 = x .")), Tree(*b.format_prompt("1 + 1 = x ."))
    assert [n.token_ids for n in grow(a, ta, ta.root, 5)] == [n.token_ids for n in grow(b, tb, tb.root, 5)]
    c = tiny_policy(seed=8)
    tc = Tree(*c.format_prompt("1 + 1 = x ."))
    assert [n.token_ids for n in grow(c, tc, tc.root, 5)] != [n.token_ids for n in grow(a, ta, ta.root, 5)]


def test_sample_greedy_and_top_p():
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]])
    ids, lps = sample(logits, 0.0, 1.0, None)
    assert ids.tolist() == [1, 0]
    assert torch.allclose(lps, torch.log_softmax(logits, -1).gather(-1, ids[:, None]).squeeze(-1))
    g = torch.Generator().manual_seed(0)
    for _ in range(20):  # top_p this small keeps only the most likely token
        assert sample(logits, 1.0, 0.05, [g, g])[0].tolist() == [1, 0]


def test_release_frees_pruned_nodes_and_unneeded_ancestors():
    policy = tiny_policy()
    tree = Tree(*policy.format_prompt("2 + 2 = x ."))
    kids = grow(policy, tree, tree.root, 3)
    prompt = len(tree.root.token_ids)
    held = policy.store.held(tree.root)
    assert held == prompt + sum(len(k.token_ids) - 1 for k in kids)
    grand = grow(policy, tree, kids[0], 2)  # kids[0] is consumed: its children hold it now
    policy.release(kids[1:])
    assert policy.store.held(tree.root) == prompt + len(kids[0].token_ids) + sum(len(g.token_ids) - 1 for g in grand)
    policy.release(grand)
    assert policy.store.held(tree.root) == 0 and policy.store.tokens == 0
    policy.store.check()


def unique_tokens(tree):
    return sum(len(n.token_ids) for n in tree.nodes)


@pytest.mark.parametrize("strategy", ["rebase", "ets"])
def test_search_computes_each_token_once_and_kv_follows_the_live_tree(strategy):
    policy = tiny_policy(seed=1)
    cfg = SearchConfig(strategy=strategy, width=4, max_tokens=40, max_depth=6, sampling=SAMPLING,
                       strategy_params={"embedder": "hash"} if strategy == "ets" else {})
    res = run(search("5 + 7 = x .", policy, DefaultPRM(), cfg))
    tree, stats = res.tree, policy.stats()
    steps = {}
    for n in tree.nodes[1:]:
        steps.setdefault((n.parent.id, n.token_ids and tuple(n.token_ids)), []).append(n)
    assert all(len(v) == 1 for v in steps.values()), "identical sibling steps: the invariant below assumes none"
    expanded = {n.parent.id for n in tree.nodes[1:]}
    never_expanded = [n for n in tree.nodes[1:] if n.id not in expanded]
    # Every token is fed exactly once, except the last (sampled, never fed) token of each step
    # that was never expanded.
    assert stats["computed_tokens"] == unique_tokens(tree) - len(never_expanded)
    assert stats["prefill_tokens"] == len(tree.root.token_ids) + len(expanded) - 1
    assert len(tree.nodes) > 8  # the search really went a few levels deep
    # After each depth the engine holds exactly the KV of the live candidates and their
    # ancestors (SPEC 3's count), less each fresh child's unfed last token.
    depth_children = [tree.at_depth(t.depth + 1) for t in res.trace]
    for t, children in zip(res.trace, depth_children):
        assert t.engine["kv_tokens"] == kv_footprint(children).tokens - len(children)
    policy.store.check()
    assert policy.store.tokens == 0  # everything released at the end


def test_problems_in_flight_are_decoded_in_one_batch_and_each_token_once():
    """Three searches at once through one policy: their expansions share decode batches (fewer
    engine calls than search calls, wider batches), and each tree is still computed exactly
    once and fully released."""
    policy = tiny_policy(seed=1)
    cfg = SearchConfig(strategy="rebase", width=4, max_tokens=40, max_depth=6, sampling=SAMPLING)
    questions = ["5 + 7 = x .", "1 + 2 = x .", "3 + 3 = x ."]

    async def together():
        return await asyncio.gather(*(search(q, policy, DefaultPRM(), cfg) for q in questions))

    results = run(together())
    stats = policy.stats()
    calls = sum(r.counters["policy_calls"] for r in results)
    assert stats["batched_calls"] == calls
    assert stats["policy_calls"] < calls  # merged across problems
    assert stats["max_batch_rows"] > cfg.width  # one problem alone never decodes more than W rows
    never = 0
    for r in results:  # node ids are per tree
        expanded = {n.parent.id for n in r.tree.nodes[1:]}
        never += sum(1 for n in r.tree.nodes[1:] if n.id not in expanded)
    assert stats["computed_tokens"] == sum(unique_tokens(r.tree) for r in results) - never
    policy.store.check()
    assert policy.store.tokens == 0


def test_kv_capacity_admits_rows_as_room_allows_and_is_never_exceeded():
    """`waves` counts the iterations at which rows joined the decode batch: one without a
    capacity, several when the capacity lets only some of the children start at once."""
    sampling = SamplingConfig(max_step_tokens=6, step_delimiter=".")
    free = tiny_policy(seed=2)
    tree = Tree(*free.format_prompt("1 + 2 = x ."))
    prompt = len(tree.root.token_ids)
    grow(free, tree, tree.root, 8, sampling)
    assert free.stats()["waves"] == 1

    # room for the 8 children's steps (max_step_tokens - 1 fed tokens each) plus one row in flight
    capacity = prompt + 8 * (sampling.max_step_tokens - 1) + sampling.max_step_tokens
    capped = tiny_policy(seed=2, kv_capacity=capacity)
    tree = Tree(*capped.format_prompt("1 + 2 = x ."))
    kids = grow(capped, tree, tree.root, 8, sampling)
    assert capped.stats()["waves"] >= 2
    capped.release(kids[1:])  # frees room for the next expansion
    grow(capped, tree, kids[0], 4, sampling)
    st = capped.stats()
    assert st["waves"] >= 3
    assert st["peak_kv_tokens"] <= capacity
    assert len(tree.nodes) == 1 + 8 + 4

    tiny = tiny_policy(kv_capacity=prompt + 2)
    t = Tree(*tiny.format_prompt("1 + 2 = x ."))
    with pytest.raises(RuntimeError, match="kv_capacity"):
        grow(tiny, t, t.root, 2, sampling)


def tree_shape(tree):
    """A tree as (parent index, token ids) per node, in creation order: equal shapes = equal trees."""
    return [(n.parent.id if n.parent else None, tuple(n.token_ids)) for n in tree.nodes]


def test_a_nodes_kth_child_depends_only_on_the_seed_its_path_and_k():
    """Child k of a node is the same however many children are asked for, whatever else is in
    the batch and whatever the policy did before (common random numbers; resumed == fresh)."""
    busy, fresh = tiny_policy(seed=4), tiny_policy(seed=4)
    other = Tree(*busy.format_prompt("3 + 3 = x ."))
    grow(busy, other, other.root, 5)  # earlier work in the same process
    ta, tb = Tree(*busy.format_prompt("1 + 2 = x .")), Tree(*fresh.format_prompt("1 + 2 = x ."))
    two = [tuple(n.token_ids) for n in grow(busy, ta, ta.root, 2)]
    side = Tree(*fresh.format_prompt("w1 w2 ."))  # another problem in the same batch
    steps = run(fresh.expand([Expansion(side.root, 3), Expansion(tb.root, 4)], SAMPLING))[1]
    assert [s.token_ids for s in steps[:2]] == two
    assert len({s.token_ids for s in steps}) > 1  # the children do differ among themselves
    other_seed = tiny_policy(seed=5)
    tc = Tree(*other_seed.format_prompt("1 + 2 = x ."))
    assert [tuple(n.token_ids) for n in grow(other_seed, tc, tc.root, 2)] != two  # the run seed matters


def test_a_problem_alone_resumed_or_in_flight_grows_the_same_tree():
    """The same problem searched (a) after another in the same policy, (b) first in a fresh
    policy (a resumed run), (c) among three in flight (shared decode batches), (d) under a KV
    capacity that splits its depths into waves: one tree."""
    cfg = SearchConfig(strategy="rebase", width=4, max_tokens=40, max_depth=6, sampling=SAMPLING)
    q, others = "5 + 7 = x .", ["1 + 2 = x .", "3 + 3 = x ."]
    first = tiny_policy(seed=1)
    run(search(others[0], first, DefaultPRM(), cfg))
    after = run(search(q, first, DefaultPRM(), cfg)).tree
    fresh_policy = tiny_policy(seed=1)
    fresh = run(search(q, fresh_policy, DefaultPRM(), cfg)).tree

    async def together(policy):
        return await asyncio.gather(*(search(x, policy, DefaultPRM(), cfg) for x in [others[0], q, others[1]]))

    batched_policy = tiny_policy(seed=1)
    batched = run(together(batched_policy))[1].tree
    assert batched_policy.stats()["max_batch_rows"] > cfg.width  # really shared batches
    # room for one row at the depth where the tree held most: rows wait, are preempted or the
    # tree's KV is evicted there; never too little room
    waved_policy = tiny_policy(seed=1, kv_capacity=fresh_policy.store.peak + SAMPLING.max_step_tokens)
    waved = run(search(q, waved_policy, DefaultPRM(), cfg)).tree
    assert waved_policy.stats()["waves"] > waved_policy.stats()["policy_calls"]
    assert len(after.nodes) > 8
    assert tree_shape(after) == tree_shape(fresh) == tree_shape(batched) == tree_shape(waved)


# --- the real default model ----------------------------------------------------------------

GSM8K_Q = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
           "in May. How many clips did Natalia sell altogether in April and May?")


@pytest.fixture(scope="module")
def smollm():
    from ets.engines.hf import load_policy

    # float32 whatever the CPU: these tests hold the engine to the reference forward pass within
    # 1e-3 and to rounding-sized margins, which bfloat16 (the default where the CPU has AMX or
    # AVX512-BF16; ets.engines.hf.default_dtype) exceeds by two orders: seen 0.21 nats apart.
    return load_policy(seed=0, dtype="float32")


@pytest.mark.slow
def test_default_model_format_prompt_and_logprobs(smollm):
    ids, text = smollm.format_prompt("What is 2 + 3?")
    assert text.endswith("<|im_start|>assistant\n") and "What is 2 + 3?" in text
    tree = Tree(ids, text)
    sampling = SamplingConfig(max_step_tokens=24)
    kids = grow(smollm, tree, tree.root, 2, sampling)
    for k in kids:
        ref = reference_logprobs(smollm.model, k.parent.path_token_ids(), list(k.token_ids))
        assert max(abs(a - b) for a, b in zip(ref, k.logprobs)) < 1e-3
    smollm.release(kids)


@pytest.mark.slow
def test_default_model_width4_rebase_search_end_to_end(smollm):
    before = smollm.stats()
    # SmolLM2's first paragraph can run past 32 tokens; the search refuses a first depth
    # where no step reached the "\n\n" delimiter, so steps get room
    cfg = SearchConfig(strategy="rebase", width=4, max_tokens=192, max_depth=4,
                       sampling=SamplingConfig(max_step_tokens=96))
    res = run(search(GSM8K_Q, smollm, DefaultPRM(), cfg))
    tree, after = res.tree, smollm.stats()
    computed = after["computed_tokens"] - before["computed_tokens"]
    expanded = {n.parent.id for n in tree.nodes[1:]}
    never_expanded = sum(1 for n in tree.nodes[1:] if n.id not in expanded)
    distinct = len({(n.parent.id, tuple(n.token_ids)) for n in tree.nodes[1:]}) == len(tree.nodes) - 1
    if distinct:
        assert computed == unique_tokens(tree) - never_expanded
    else:  # identical siblings share one segment: their pending token is fed once
        assert computed <= unique_tokens(tree) - never_expanded
    for n in tree.nodes[1:]:  # every node scored, one score per step, aligned with its path
        assert n.score is not None and 0.0 <= n.score <= 1.0
        assert len(n.logprobs) == len(n.token_ids)
    assert smollm.store.held(tree.root) == 0
    assert len(res.trace) >= 2


# Samples on the real model. Trees are small (steps end at a space: one or two tokens each) so
# that these run in seconds. Batch composition (padding, batch size) changes float32 logits in
# their last bits (about 4e-5 here): a token then differs only if its uniform falls that close
# to a boundary of the cumulative distribution. A difference is therefore checked against the
# reference forward pass: with a wide margin it is a real failure, with a razor-thin one (odds
# about 1e-4 per token) the comparison cannot decide and the test is skipped, saying so.
SPACE = SamplingConfig(max_step_tokens=4, step_delimiter=" ")
TINY_SEARCH = dict(width=3, max_tokens=16, max_depth=6, sampling=SPACE)
QUESTIONS = [GSM8K_Q, "What is 2 + 3?"]


def sample_margin(policy, seed, sampling, parent_path, k, tokens, at):
    """How far child k's uniform at token `at` lies from the nearest edge of the interval of the
    token it chose, under a reference full forward pass of parent_path + tokens[:at]."""
    from ets.engines.hf import row_generators

    gen = row_generators(seed, parent_path, k + 1)[k]
    for _ in range(at + 1):
        u = torch.rand((), generator=gen, dtype=torch.float64).item()
    with torch.no_grad():
        logits = policy.model(torch.tensor([list(parent_path) + list(tokens[:at])])).logits[0, -1].float()
    cdf = torch.softmax(logits / sampling.temperature, -1).double().cumsum(-1)  # top_p 1 here
    x, t = u * cdf[-1].item(), tokens[at]
    lo = cdf[t - 1].item() if t > 0 else 0.0
    return min(abs(x - lo), abs(cdf[t].item() - x))


def assert_same_children(policy, seed, sampling, parent_path, kids_a, kids_b):
    """The first min(len) children agree token by token, or differ only by a razor-thin margin."""
    for k, (a, b) in enumerate(zip(kids_a, kids_b)):
        a, b = tuple(a), tuple(b)
        if a == b:
            continue
        at = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
        margin = sample_margin(policy, seed, sampling, parent_path, k, a, at)
        assert margin < 1e-4, f"child {k} differs at token {at} with margin {margin:.2e}: not rounding"
        pytest.skip(f"child {k} differs at token {at} within float rounding (margin {margin:.1e})")


def children_by_path(tree):
    return {tuple(n.path_token_ids()): [c.token_ids for c in n.children] for n in tree.nodes if n.children}


def assert_same_tree(policy, seed, sampling, a, b):
    """Same sequences in both trees, compared by content: identical siblings (one-token steps
    repeat often) tie in score, and rounding may break the tie toward the other twin; having
    the same path, the twins have the same children, so the trees' sequences are still equal."""
    ca, cb = children_by_path(a), children_by_path(b)
    for path in ca.keys() & cb.keys():
        assert_same_children(policy, seed, sampling, path, ca[path], cb[path])
    na = {tuple(n.path_token_ids()): n for n in a.nodes}
    nb = {tuple(n.path_token_ids()): n for n in b.nodes}
    if na.keys() == nb.keys():
        return
    # Every shared node's children agree, so the trees can differ only where the search gave a
    # node another number of children: REBASE's rounding of width x softmax(score / T), which a
    # rounding-sized score difference flips near a half (seen in CI on an AMX CPU, float32).
    shared = [p for p in na.keys() & nb.keys() if na[p].score is not None and nb[p].score is not None]
    gap = max(abs(na[p].score - nb[p].score) for p in shared)
    assert gap < 1e-3, f"shared nodes' scores differ by {gap:.1e}: not rounding"
    assert any(na[p].alloc != nb[p].alloc for p in na.keys() & nb.keys()), \
        "trees differ although every shared node got the same number of children"
    pytest.skip(f"an allocation differs from scores within float rounding (largest gap {gap:.1e})")


@pytest.mark.slow
def test_default_model_resumed_alone_and_in_flight_trees_agree(smollm):
    """A problem after another (uninterrupted run), first in a fresh policy (a killed run
    resumed), and beside another problem in flight: one tree."""
    from ets.engines.hf import load_policy

    cfg = SearchConfig(strategy="rebase", **TINY_SEARCH)
    run(search(QUESTIONS[0], smollm, DefaultPRM(), cfg))
    uninterrupted = run(search(QUESTIONS[1], smollm, DefaultPRM(), cfg)).tree
    fresh = load_policy(seed=0, dtype="float32")  # as the smollm fixture
    resumed = run(search(QUESTIONS[1], fresh, DefaultPRM(), cfg)).tree
    assert len(resumed.nodes) > 6
    # same batches as the uninterrupted run: bit-identical logits, so no margin is needed
    assert tree_shape(resumed) == tree_shape(uninterrupted)

    async def together():
        return await asyncio.gather(*(search(q, fresh, DefaultPRM(), cfg) for q in QUESTIONS))

    before = fresh.stats()["max_batch_rows"]
    in_flight = run(together())[1].tree  # QUESTIONS[1] beside QUESTIONS[0]
    assert fresh.stats()["max_batch_rows"] > max(before, cfg.width)  # really decoded together
    assert_same_tree(fresh, cfg.seed, SPACE, resumed, in_flight)


@pytest.mark.slow
def test_default_model_ets_and_rebase_share_a_nodes_samples(smollm):
    """ETS and REBASE on one policy, one after the other: every node both expand starts with
    the same children (common random numbers), the root's whole width included."""
    ets = run(search(QUESTIONS[0], smollm, DefaultPRM(),
                     SearchConfig(strategy="ets", strategy_params={"embedder": "hash"}, **TINY_SEARCH))).tree
    reb = run(search(QUESTIONS[0], smollm, DefaultPRM(), SearchConfig(strategy="rebase", **TINY_SEARCH))).tree
    ca, cb = children_by_path(ets), children_by_path(reb)
    shared = ca.keys() & cb.keys()
    assert tuple(ets.root.token_ids) in shared and len(ca[tuple(ets.root.token_ids)]) == TINY_SEARCH["width"]
    for path in shared:
        assert_same_children(smollm, 0, SPACE, path, ca[path], cb[path])
