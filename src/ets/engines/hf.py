"""The embedded tree-KV engine: any transformers causal LM, CPU or GPU.

`HFPolicy` is the Policy adapter: an `expand` call becomes a Request of rows (one per child
asked for, each with its own random stream), and finished rows come back as Steps. The engine
behind it is a handful of files, one noun each:

    kv_store.py      per-step KV segments of every tree in flight, shared by prefix, ref-counted
    request.py       a request (one expand call) and its rows (the children being generated)
    scheduler.py     waiting / running rows; admission against kv_capacity; preemption, eviction
    model_runner.py  one forward: a prefill of new tokens, or a decode step of every running row
    sampler.py       per-row seeded sampling (common random numbers); where a step ends
    engine.py        the step loop (continuous batching across every problem in flight)

Each node's KV is computed once: expanding a node feeds only what is not held yet (the prompt
once per problem, then one token per expanded node: the step's last token, sampled but not
fed); siblings start from their parent's logits. See engine.py for the exact accounting and
sampler.py for the seeding.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Iterable, Sequence

import torch

from ets.engines.base import Expansion, Policy, Step
from ets.engines.engine import TreeEngine
from ets.engines.kv_store import KVStore
from ets.engines.model_runner import ModelRunner
from ets.engines.request import Request
from ets.engines.sampler import StepEnd, row_generators, sample  # noqa: F401  (public names)
from ets.engines.sampling import SamplingConfig
from ets.engines.scheduler import CapacityError, Scheduler  # noqa: F401
from ets.tree import Node


class HFPolicy(Policy):
    """Policy over a transformers causal LM with per-node KV reuse (see module docstring).

    kv_capacity: most KV tokens held at once (segments of all trees + the steps of the rows in
      flight), like a serving engine's cache size; beyond it rows wait, are preempted or tree KV
      is evicted, and recomputed later (scheduler.py). None = unbounded. The count is logical
      (prefix-shared), as a paged engine would hold it; the decode batch holds a copy of each
      running row's path.
    max_batch: most rows decoded at once (bounds that copy).
    prefill_budget: most tokens prefilled per iteration (a longer prompt is fed in chunks).
    """

    name = "hf"

    def __init__(self, model, tokenizer, device: str | torch.device | None = None,
                 kv_capacity: int | None = None, max_batch: int = 64, seed: int = 0,
                 system_prompt: str | None = None, prefill_budget: int = 2048):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.tok = tokenizer
        self.max_batch, self.system_prompt = max_batch, system_prompt
        self.seed = seed  # the run's seed: child i of a node samples from row_generators(seed, path)[i]
        eos = {tokenizer.eos_token_id}
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos.update(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
        self.eos_ids = {e for e in eos if e is not None}
        self.eos_token_id = tokenizer.eos_token_id
        self.store = KVStore()
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.scheduler = Scheduler(self.store, kv_capacity, max_batch, prefill_budget)
        self.engine = TreeEngine(ModelRunner(self.model, self.device, pad), self.store, self.scheduler,
                                 StepEnd(lambda ids: tokenizer.decode(ids, skip_special_tokens=True), self.eos_ids))
        self.counters = self.engine.counters

    @property
    def kv_capacity(self) -> int | None:
        return self.scheduler.capacity

    @kv_capacity.setter
    def kv_capacity(self, tokens: int | None) -> None:
        self.scheduler.capacity = tokens

    @property
    def dtype(self) -> str:
        return str(self.engine.runner.dtype).removeprefix("torch.")

    # --- Policy interface ----------------------------------------------------------------
    def format_prompt(self, question: str) -> tuple[list[int], str]:
        if getattr(self.tok, "chat_template", None):
            messages = [{"role": "user", "content": question}]
            if self.system_prompt is not None:
                messages.insert(0, {"role": "system", "content": self.system_prompt})
            text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            text = question if self.system_prompt is None else f"{self.system_prompt}\n\n{question}"
            text += "\n"
        return self.tok(text, add_special_tokens=False)["input_ids"], text

    async def expand(self, requests: Sequence[Expansion], sampling: SamplingConfig) -> list[list[Step]]:
        """The rows of this call join the engine's running batch at its next iteration, beside
        the rows of every other problem in flight; returns when all of them have finished."""
        requests = list(requests)
        self.counters["batched_calls"] += 1
        parents = [self.store.segment(r.node) for r in requests]
        if not any(r.n for r in requests):
            self.release(r.node for r in requests)
            return [[] for _ in requests]
        gens = [row_generators(self.seed, r.node.path_token_ids(), r.n) for r in requests]
        req = Request(requests, parents, gens, sampling, asyncio.get_running_loop().create_future())
        out = []
        for rows in await self.engine.submit(req):
            out.append([Step(tuple(r.tokens), self.tok.decode(r.tokens, skip_special_tokens=True), r.stop,
                             tuple(r.logprobs)) for r in rows])
            self.counters["generated_tokens"] += sum(len(r.tokens) for r in rows)
        return out

    def release(self, nodes: Iterable[Node]) -> None:
        for node in nodes:
            self.store.consume(node)

    def observe(self, root: Node) -> dict:
        return {"kv_tokens": self.store.held(root), "kv_tokens_all": self.store.tokens, "dtype": self.dtype}

    def stats(self) -> dict:
        c = dict(self.counters)
        c["computed_tokens"] = c["prefill_tokens"] + c["decode_tokens"]
        c["recomputed_tokens"] = self.store.recomputed + c.pop("recomputed_row_tokens")
        c["evicted_tokens"] = self.store.evicted
        c["mean_batch_rows"] = c["decode_tokens"] / c["decode_steps"] if c["decode_steps"] else 0.0
        c["peak_kv_tokens"] = max(self.store.peak, c["peak_inflight_kv_tokens"])
        c["kv_tokens_now"] = self.store.tokens
        c["kv_capacity"] = self.kv_capacity
        c["device"] = str(self.device)
        c["dtype"] = self.dtype
        return c


def default_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on a GPU, and on a CPU that computes it natively (AVX512-BF16 or AMX); float32
    on any other CPU, where bfloat16 matmuls are emulated and slower (ets.serve.cpu_dtype)."""
    if device.type == "cuda":
        return torch.bfloat16
    from ets.serve import cpu_dtype

    return getattr(torch, cpu_dtype())


def load_policy(path: str | None = None, device=None, kv_capacity: int | None = None, dtype=None,
                **kw) -> HFPolicy:
    """HFPolicy over a local transformers folder, a .gguf file, or (None) the default model.
    dtype: torch dtype or its name; default: default_dtype(device). The chosen dtype is in
    stats()["dtype"] and in every observe() (so in each problem's trace)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ets.models import default_model_dir, gguf_model_dir

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    dtype = dtype or default_dtype(dev)
    src = Path(path) if path else default_model_dir()
    # a GGUF file is dequantized once into a cached transformers folder (ets.models)
    folder = gguf_model_dir(src) if src.suffix == ".gguf" else src
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)  # never a hub
    from ets.prm.loading import strict_pretrained  # a weight the folder lacks is an error, never random

    model = strict_pretrained(AutoModelForCausalLM, folder, dtype=dtype)
    policy = HFPolicy(model, tok, device=dev, kv_capacity=kv_capacity, **kw)
    policy.name = f"hf:{src.name}"
    return policy
