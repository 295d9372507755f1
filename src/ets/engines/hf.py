"""The embedded tree-KV engine: any transformers causal LM, CPU or GPU.

Request path of one `expand` call:
  1. prefill: for every distinct node asked for, feed the tokens of its path whose KV is not
     held yet (the whole prompt for a root; a child's one pending last token otherwise), all
     nodes in one right-padded batch; the logits after each node's last token are kept.
  2. decode: every child of every request becomes a row; rows are decoded together in waves
     (left-padded shared prefixes + explicit positions + attention mask). A row starts from its
     parent's kept logits, so siblings share their parent's computation entirely.
  3. each finished row's step KV (all but its last, sampled-not-fed token) becomes the child's
     segment in the KVStore; nothing is ever fed twice while its segment is held.

Exact accounting (checked by tests), with no two identical sibling steps in a tree:
    computed tokens = prefilled + decoded
                    = unique tokens of the tree - (non-root nodes never expanded)
because every token is fed once, except the last token of a step that was never expanded.

Sampling (common random numbers): child i of a node draws its tokens from its own CPU generator
seeded with `node_seed(run seed, node's path) + i` (ets.engines.base, as servers seed requests),
one uniform per token. So a node's k-th child depends only on the run seed, the node's path (the
prompt names the problem) and k, and on the logits: not on the batch, the wave, the problems in
flight, what ran earlier in the process, or how many siblings were asked for. The logits
themselves are float arithmetic whose last bits can depend on the batch's shape (padding,
batch size); a token changes only when its uniform falls within that rounding of a boundary of
the cumulative distribution.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from pathlib import Path
from typing import Iterable, Sequence

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from ets.engines.sampling import SamplingConfig
from ets.engines.base import DELIMITER, EOS, LENGTH, STOP, Expansion, Policy, Step, Stopped, node_seed
from ets.engines.kv_store import KV, KVStore, Segment
from ets.tree import Node


def row_generators(run_seed: int, path_token_ids: Sequence[int], n: int) -> list[torch.Generator]:
    """The random streams of a node's children 0..n-1: CPU generators seeded with
    `node_seed(run_seed, path) + i`, the scheme servers use for a request's `seed`. Child i's
    stream depends only on (run seed, the node's path, i): not on n, on what else is in the batch,
    on earlier problems in the process, nor on the device."""
    base = node_seed(run_seed, path_token_ids)
    return [torch.Generator().manual_seed(base + i) for i in range(n)]


def sample(logits: torch.Tensor, temperature: float, top_p: float,
           generators: Sequence[torch.Generator] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row. logits: [B, V]; generators: one per row (None only when
    temperature is 0). Returns (ids [B], logprobs [B]); the log-prob is under the model's own
    distribution (before temperature/top-p), the policy's confidence.

    Row b draws exactly ONE uniform from generators[b] (on the CPU, in float64) and takes the
    token where it falls in the row's cumulative distribution (inverse CDF, vocabulary order), so
    a row's token depends only on its own logits and its own stream, never on the other rows.
    temperature 0 is greedy and draws nothing."""
    logits = logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    if temperature == 0:
        ids = logits.argmax(-1)
    else:
        if generators is None or len(generators) != logits.shape[0]:
            raise ValueError("sampling at temperature > 0 needs one generator per row")
        probs = torch.softmax(logits / temperature, dim=-1)
        if top_p < 1.0:
            sorted_p, order = probs.sort(-1, descending=True)
            # drop a token when the mass before it already reaches top_p (keeps at least one)
            drop = sorted_p.cumsum(-1) - sorted_p >= top_p
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        cdf = probs.double().cumsum(-1)  # [B, V]; its last entry is the kept mass
        u = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in generators])
        at = (u.to(cdf.device)[:, None] * cdf[:, -1:])  # [B, 1] in [0, kept mass)
        ids = torch.searchsorted(cdf, at, right=True).squeeze(-1).clamp_(max=cdf.shape[-1] - 1)
    return ids, logp.gather(-1, ids[:, None]).squeeze(-1)


class _Row:
    """One child being decoded."""

    __slots__ = ("req", "parent", "gen", "tokens", "logprobs", "stop")

    def __init__(self, req: int, parent: Segment, gen: torch.Generator):
        self.req, self.parent, self.gen = req, parent, gen  # gen: this child's own random stream
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.stop: str | None = None


class HFPolicy(Policy):
    """Policy over a transformers causal LM with per-node KV reuse (see module docstring).

    kv_capacity: most KV tokens held at once (segments of all trees + the worst case of the
      rows in flight, `max_step_tokens` each), like a serving engine's cache size; rows that do
      not fit wait for a later wave. None = unbounded. The count is logical (prefix-shared),
      as a paged engine would hold it; the padded batch built for a wave is a transient copy.
    max_batch: most rows decoded at once (bounds the transient padded copy).
    """

    name = "hf"

    def __init__(self, model, tokenizer, device: str | torch.device | None = None,
                 kv_capacity: int | None = None, max_batch: int = 64, seed: int = 0,
                 system_prompt: str | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.tok = tokenizer
        self.kv_capacity, self.max_batch, self.system_prompt = kv_capacity, max_batch, system_prompt
        self.seed = seed  # the run's seed: child i of a node samples from row_generators(seed, path)[i]
        eos = {tokenizer.eos_token_id}
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos.update(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
        self.eos_ids = {e for e in eos if e is not None}
        self.eos_token_id = tokenizer.eos_token_id
        self.store = KVStore()
        self._queue: list[tuple[list[Expansion], SamplingConfig, asyncio.Future]] = []
        self._drainer: asyncio.Task | None = None
        # transformers >= 5.2x names the cache argument `cache`; older versions `past_key_values`
        params = inspect.signature(self.model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self.counters = {"policy_calls": 0, "prefill_tokens": 0, "decode_tokens": 0, "prefill_calls": 0,
                         "decode_steps": 0, "waves": 0, "rows": 0, "max_batch_rows": 0, "generated_tokens": 0,
                         "peak_inflight_kv_tokens": 0, "expand_s": 0.0,
                         "batched_calls": 0}

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
        """Calls from problems in flight together (runner concurrency > 1) are decoded as one
        batch, as a serving engine batches requests: a call queues, and the batch runs once the
        other problems have had their turn to queue (see _drain)."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._queue.append((list(requests), sampling, fut))
        if self._drainer is None or self._drainer.done():
            self._drainer = loop.create_task(self._drain())
        return await fut

    async def _drain(self) -> None:
        # Yield until the queue stops growing: a problem woken by the last batch needs a tick or
        # two (its own suspension points) to reach its next expand. Compute is synchronous, so
        # nothing queues while a batch runs.
        size = -1
        while size != len(self._queue):
            size = len(self._queue)
            for _ in range(3):
                await asyncio.sleep(0)
        batch, self._queue = [c for c in self._queue if not c[2].done()], []  # done = caller cancelled
        groups: dict[SamplingConfig, list] = {}
        for call in batch:
            groups.setdefault(call[1], []).append(call)
        for sampling, calls in groups.items():
            merged = [r for reqs, _, _ in calls for r in reqs]
            try:
                steps = self._expand_now(merged, sampling)
            except Exception as e:  # noqa: BLE001  (each caller gets the error)
                for _, _, fut in calls:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            i = 0
            for reqs, _, fut in calls:
                if not fut.done():
                    fut.set_result(steps[i:i + len(reqs)])
                i += len(reqs)
        self.counters["batched_calls"] += len(batch)

    def _expand_now(self, requests: Sequence[Expansion], sampling: SamplingConfig) -> list[list[Step]]:
        t0 = time.perf_counter()
        self.counters["policy_calls"] += 1
        segs = [self.store.segment(r.node) for r in requests]
        self._prefill([s for s in dict.fromkeys(segs) if not (s.complete and s.next_logits is not None)])
        rows = [_Row(i, seg, gen) for i, (r, seg) in enumerate(zip(requests, segs))
                for gen in row_generators(self.seed, r.node.path_token_ids(), r.n)]
        with torch.inference_mode():
            for wave in self._waves(rows, sampling.max_step_tokens):
                self._decode(wave, sampling)
        out: list[list[Step]] = [[] for _ in requests]
        for row in rows:
            text = self.tok.decode(row.tokens, skip_special_tokens=True)
            out[row.req].append(Step(tuple(row.tokens), text, row.stop, tuple(row.logprobs)))
            self.counters["generated_tokens"] += len(row.tokens)
        for r in requests:  # an expanded node is done; its KV now lives on through its children
            self.store.consume(r.node)
        self.counters["expand_s"] += time.perf_counter() - t0
        return out

    def release(self, nodes: Iterable[Node]) -> None:
        for node in nodes:
            self.store.consume(node)

    def observe(self, root: Node) -> dict:
        return {"kv_tokens": self.store.held(root), "kv_tokens_all": self.store.tokens}

    def stats(self) -> dict:
        c = dict(self.counters)
        c["computed_tokens"] = c["prefill_tokens"] + c["decode_tokens"]
        c["mean_batch_rows"] = c["rows"] / c["waves"] if c["waves"] else 0.0
        c["peak_kv_tokens"] = max(self.store.peak, c["peak_inflight_kv_tokens"])
        c["kv_tokens_now"] = self.store.tokens
        c["kv_capacity"] = self.kv_capacity
        c["device"] = str(self.device)
        return c

    # --- KV assembly -------------------------------------------------------------------------
    def _gather(self, chains: list[list[Segment]], lengths: list[int], width: int, extra: int = 0) -> KV:
        """Left-padded batch of the held KV of each chain: per layer k, v: [B, H, width + extra, D];
        row b's `lengths[b]` tokens end at position width - 1; padding is zeros (masked out);
        the `extra` positions after `width` are room for decoding."""
        first = next(s for chain in chains for s in chain if s.fed)
        batch = []
        for layer, (k0, _) in enumerate(first.kv):
            H, _, D = k0.shape
            k = k0.new_zeros(len(chains), H, width + extra, D)
            v = torch.zeros_like(k)
            for b, chain in enumerate(chains):
                pos = width - lengths[b]
                for seg in chain:
                    if seg.fed:
                        sk, sv = seg.kv[layer]
                        k[b, :, pos:pos + seg.fed] = sk
                        v[b, :, pos:pos + seg.fed] = sv
                        pos += seg.fed
            batch.append((k, v))
        return batch

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache, keep: torch.Tensor):
        # ids, pos: [B, S]; mask: [B, past + S]; keep: [B, 1] index (in S) of the logits wanted
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                         logits_to_keep=keep, **{self._cache_arg: cache})
        return out.logits[:, -1]  # [B, V]

    def _cache(self, kv: KV | None):
        return DynamicCache(ddp_cache_data=kv) if kv is not None else DynamicCache()

    def _decode_cache(self, buffers: KV, used: int):
        """A cache over preallocated buffers (no reallocation per decoded token)."""
        return Cache(layers=[_BufferLayer(k, v, used) for k, v in buffers])

    # --- prefill -----------------------------------------------------------------------------
    def _prefill(self, targets: list[Segment]) -> None:
        """Feed, for each target, every token of its path not held yet; keep its next logits."""
        if not targets:
            return
        jobs = []  # (target, [(segment, first unfed index)], tokens to feed)
        for tgt in targets:
            # normally only the target itself is incomplete (its one pending token), or the
            # whole path is new (a root); any incomplete ancestor is fed here too
            parts = [(s, s.fed) for s in tgt.path() if not s.complete]
            jobs.append((tgt, parts, [t for s, f in parts for t in s.tokens[f:]]))
        for batch in self._prefill_batches(jobs):
            with torch.inference_mode():
                self._prefill_batch(batch)

    def _prefill_batches(self, jobs):
        """Split so that the held KV plus the tokens fed stays within kv_capacity."""
        batch, need = [], 0
        for job in jobs:
            n = max(len(job[2]), 0)
            if self.kv_capacity is not None:
                if self.store.tokens + n > self.kv_capacity:
                    raise RuntimeError(f"kv_capacity {self.kv_capacity} cannot hold a {n}-token prefill "
                                       f"beside the {self.store.tokens} tokens held")
                if batch and self.store.tokens + need + n > self.kv_capacity:
                    yield batch
                    batch, need = [], 0
            batch.append(job)
            need += n
        if batch:
            yield batch

    def _prefill_batch(self, jobs) -> None:
        # layout of row b: [pad | held KV (P_b) | new tokens (N_b) | pad], past width P, input width N
        chains = [[s for s in tgt.path() if s.fed] for tgt, _, _ in jobs]
        held = [sum(s.fed for s in chain) for chain in chains]
        news = [len(toks) for _, _, toks in jobs]
        P, N, B = max(held), max(max(news), 1), len(jobs)
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        ids = torch.full((B, N), pad, dtype=torch.long)
        mask = torch.zeros(B, P + N, dtype=torch.long)
        pos = torch.zeros(B, N, dtype=torch.long)
        for b, (_, _, toks) in enumerate(jobs):
            ids[b, :len(toks)] = torch.tensor(toks, dtype=torch.long)
            mask[b, P - held[b]:P + len(toks)] = 1
            # pads after the real tokens continue the positions (masked out for real queries)
            pos[b] = torch.arange(held[b], held[b] + N)
        cache = self._cache(self._gather(chains, held, P) if P else None)
        keep = torch.tensor([[max(n, 1) - 1] for n in news])
        logits = self._forward(ids.to(self.device), mask.to(self.device), pos.to(self.device), cache,
                               keep.to(self.device))
        self.counters["prefill_calls"] += 1
        for b, (tgt, parts, toks) in enumerate(jobs):
            at = P
            for seg, first in parts:
                n = len(seg.tokens) - first
                kv = [(layer.keys[b, :, at:at + n], layer.values[b, :, at:at + n]) for layer in cache.layers]
                self.store.extend(seg, kv, n)
                at += n
            self.counters["prefill_tokens"] += len(toks)
            if not toks and tgt.next_logits is None:
                raise RuntimeError("a fully held segment lost its next-token logits")
            if toks:
                tgt.next_logits = logits[b].float()

    # --- decode ------------------------------------------------------------------------------
    def _waves(self, rows: list[_Row], max_step_tokens: int):
        """Consecutive groups of rows that fit: held KV + max_step_tokens per row <= capacity.
        Rows of a wave add their steps to the store, so the next wave is sized after that."""
        i = 0
        while i < len(rows):
            room = None if self.kv_capacity is None else self.kv_capacity - self.store.tokens
            n = len(rows) - i if room is None else room // max_step_tokens
            n = min(n, self.max_batch, len(rows) - i)
            if n < 1:
                raise RuntimeError(f"kv_capacity {self.kv_capacity} leaves {room} tokens beside the "
                                   f"{self.store.tokens} held (the trees of every problem in flight): not "
                                   f"enough for one {max_step_tokens}-token step; raise the capacity, or "
                                   f"lower max_step_tokens or the problems in flight")
            yield rows[i:i + n]
            i += n

    def _decode(self, rows: list[_Row], sampling: SamplingConfig) -> None:
        self.counters["waves"] += 1
        self.counters["rows"] += len(rows)
        self.counters["max_batch_rows"] = max(self.counters["max_batch_rows"], len(rows))
        # first token of every row: from its parent's logits (computed once per parent)
        first = torch.stack([r.parent.next_logits for r in rows])
        self._take(rows, *sample(first, sampling.temperature, sampling.top_p, [r.gen for r in rows]), sampling)
        live = [r for r in rows if r.stop is None]
        if not live:
            for r in rows:
                self._finish(r, None, 0, 0)
            return
        for r in rows:
            if r.stop is not None:
                self._finish(r, None, 0, 0)
        chains = [[s for s in r.parent.path() if s.fed] for r in live]
        held = [sum(s.fed for s in chain) for chain in chains]
        P = max(held)
        cache = self._decode_cache(self._gather(chains, held, P, extra=sampling.max_step_tokens), P)
        mask = torch.zeros(len(live), P, dtype=torch.long, device=self.device)
        for b, h in enumerate(held):
            mask[b, P - h:] = 1
        pos = torch.tensor(held, device=self.device)  # [B] position of the next token fed
        base = P  # cache index of each row's first fed token of this step
        while live:
            if STOP.is_set():  # SIGTERM: give up this batch now, not after max_step_tokens steps
                raise Stopped("stopped by a signal")
            inflight = self.store.tokens + sum(len(r.tokens) for r in live)
            self.counters["peak_inflight_kv_tokens"] = max(self.counters["peak_inflight_kv_tokens"], inflight)
            ids = torch.tensor([[r.tokens[-1]] for r in live], device=self.device)  # [B, 1]
            mask = torch.cat([mask, mask.new_ones(len(live), 1)], 1)  # [B, past + 1]
            logits = self._forward(ids, mask, pos[:, None], cache, torch.zeros(len(live), 1, dtype=torch.long,
                                                                             device=self.device))
            self.counters["decode_steps"] += 1
            self.counters["decode_tokens"] += len(live)
            pos = pos + 1
            self._take(live, *sample(logits, sampling.temperature, sampling.top_p, [r.gen for r in live]), sampling)
            keep = [b for b, r in enumerate(live) if r.stop is None]
            for b, r in enumerate(live):
                if r.stop is not None:
                    self._finish(r, cache, b, base)
            if len(keep) < len(live):
                idx = torch.tensor(keep, dtype=torch.long, device=self.device)
                cache.batch_select_indices(idx)
                mask, pos = mask[idx], pos[idx]
                live = [live[b] for b in keep]

    def _take(self, rows: list[_Row], ids: torch.Tensor, logprobs: torch.Tensor, sampling: SamplingConfig) -> None:
        """Append one sampled token per row and decide whether the row's step has ended."""
        for r, t, lp in zip(rows, ids.tolist(), logprobs.tolist()):
            r.tokens.append(t)
            r.logprobs.append(lp)
            if t in self.eos_ids:
                r.stop = EOS
            elif sampling.step_delimiter in self.tok.decode(r.tokens, skip_special_tokens=True):
                r.stop = DELIMITER
            elif len(r.tokens) >= sampling.max_step_tokens:
                r.stop = LENGTH

    def _finish(self, r: _Row, cache, b: int, base: int) -> None:
        """Store the finished row's step: KV of all its tokens but the last (never fed)."""
        fed = len(r.tokens) - 1
        kv = None if fed == 0 else [(layer.keys[b, :, base:base + fed], layer.values[b, :, base:base + fed])
                                    for layer in cache.layers]
        self.store.add_step(r.parent, tuple(r.tokens), kv, fed)


class _BufferLayer(DynamicLayer):
    """A cache layer writing into a preallocated buffer: k, v: [B, H, capacity, D], of which the
    first `used` positions are valid; `keys`/`values` are views of those. Saves the per-token
    reallocation of the whole cache that a growing DynamicLayer does."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, used: int):
        super().__init__()
        self.buf_k, self.buf_v, self.used = k, v, used
        self.device, self.is_initialized = k.device, True
        self._views()

    def _views(self):
        self.keys, self.values = self.buf_k[:, :, :self.used], self.buf_v[:, :, :self.used]

    def lazy_initialization(self, key_states, value_states):
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        n = key_states.shape[-2]
        if self.used + n > self.buf_k.shape[2]:
            raise RuntimeError("decode buffer overflow")  # sized for max_step_tokens: a bug
        self.buf_k[:, :, self.used:self.used + n] = key_states
        self.buf_v[:, :, self.used:self.used + n] = value_states
        self.used += n
        self._views()
        return self.keys, self.values

    def batch_select_indices(self, indices):
        self.buf_k, self.buf_v = self.buf_k[indices], self.buf_v[indices]
        self._views()


def load_policy(path: str | None = None, device=None, kv_capacity: int | None = None, dtype=None,
                **kw) -> HFPolicy:
    """HFPolicy over a local transformers folder, a .gguf file, or (None) the default model.
    dtype: torch dtype or its name; default float32 on CPU, bfloat16 on GPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ets.models import default_model_dir, gguf_model_dir

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    dtype = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    src = Path(path) if path else default_model_dir()
    # a GGUF file is dequantized once into a cached transformers folder (ets.models)
    folder = gguf_model_dir(src) if src.suffix == ".gguf" else src
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)  # never a hub
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, local_files_only=True)
    policy = HFPolicy(model, tok, device=dev, kv_capacity=kv_capacity, **kw)
    policy.name = f"hf:{src.name}"
    return policy
