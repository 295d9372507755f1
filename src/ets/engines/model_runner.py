"""One forward of the model over the current rows: a prefill (new tokens of segments or of a
preempted row's step, beside their held KV) or a decode step (one token per running row).

Shapes: B rows, H kv heads, D head dim, V vocabulary; per-layer KV is a list of (k, v).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from ets.engines.kv_store import KV

# columns added beyond what the rows need when the decode batch is laid out again: the batch
# is copied once per this many decode steps (rows join and leave, `end` keeps moving right)
SLACK = 128


@dataclass
class PrefillJob:
    """Feed `tokens` after the held KV `past` (per layer [H, T, D] pieces, in order, `held`
    tokens in all). The forward returns the new tokens' KV and the logits after the last one."""

    past: list[KV]
    held: int
    tokens: list[int]


class DecodeBatch:
    """KV of the running rows, one slot each, left-padded so that every row's history ends at
    column `end`, where every row writes its next token:

        k, v per layer: [slots, H, width, D]; rows live in slots 0..n-1 (dense: a leaving row's
        slot takes the last row); the row in slot s holds its history at [start[s], end);
        columns before start[s] are zeros (masked out; finite, so a zero weight keeps them out).

    A row's history is a copy of its parent's path (prefix sharing is logical, in the KVStore)
    plus its step so far. Invariants: 0 <= start[s] <= end < width before a decode step."""

    def __init__(self, device: torch.device):
        self.device = device
        self.rows: list = []
        self.start: list[int] = []
        self.pos: list[int] = []  # absolute position of each row's next token (= its history's length)
        self.end = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []

    def __len__(self) -> int:
        return len(self.rows)

    def _alloc(self, slots: int, width: int, like: KV) -> tuple[list, list]:
        k = [torch.zeros(slots, k0.shape[0], width, k0.shape[-1], dtype=k0.dtype, device=self.device) for k0, _ in like]
        v = [torch.zeros_like(x) for x in k]
        return k, v

    def _layout(self, slots: int, end: int, like: KV) -> None:
        """Lay the rows out again: `slots` slots, history ending at column `end` (>= every row's
        history), SLACK free columns after it. Copies the kept span of every row."""
        n, lo = len(self.rows), min(self.start, default=self.end)
        span = self.end - lo
        assert end >= span
        k, v = self._alloc(slots, end + SLACK, like)
        for new, old in ((k, self.k), (v, self.v)):
            for dst, src in zip(new, old):
                dst[:n, :, end - span:end] = src[:n, :, lo:self.end]
        self.k, self.v = k, v
        self.start = [s + end - self.end for s in self.start]
        self.end = end

    def add(self, row, parts: list[KV], length: int, max_slots: int) -> None:
        """Put `row` in the batch: its history is `parts` (per layer [H, t, D] pieces, `length`
        tokens in all, from position 0); its next token goes to position `length`."""
        like = parts[0]
        n = len(self.rows)
        slots = self.k[0].shape[0] if self.k else 0
        if n == slots or length > self.end or not self.k:
            grow = max(slots, min(max_slots, max(2 * slots, 8))) if n == slots else slots
            self._layout(grow, max(self.end - min(self.start, default=self.end), length), like)
        s, at = n, self.end - length
        for layer in range(len(self.k)):
            self.k[layer][s].zero_()
            self.v[layer][s].zero_()
            col = at
            for piece in parts:
                pk, pv = piece[layer]
                self.k[layer][s, :, col:col + pk.shape[1]] = pk
                self.v[layer][s, :, col:col + pk.shape[1]] = pv
                col += pk.shape[1]
        row.slot = s
        self.rows.append(row)
        self.start.append(at)
        self.pos.append(length)

    def tail(self, row, n: int) -> KV | None:
        """Views of the KV of the last `n` tokens of `row`'s history (valid until the batch changes)."""
        if n == 0:
            return None
        s = row.slot
        return [(k[s, :, self.end - n:self.end], v[s, :, self.end - n:self.end]) for k, v in zip(self.k, self.v)]

    def remove(self, row) -> None:
        s, last = row.slot, len(self.rows) - 1
        if s != last:  # the last row moves into the freed slot
            for k, v in zip(self.k, self.v):
                k[s] = k[last]
                v[s] = v[last]
            moved = self.rows[last]
            moved.slot = s
            self.rows[s], self.start[s], self.pos[s] = moved, self.start[last], self.pos[last]
        self.rows.pop()
        self.start.pop()
        self.pos.pop()
        row.slot = None
        if not self.rows:  # idle: give the memory back
            self.k, self.v, self.end = [], [], 0

    def prepare(self) -> None:
        """Room for one more column (compacting the dead columns on the left when full)."""
        if self.end >= self.k[0].shape[2]:
            like = [(k[0], v[0]) for k, v in zip(self.k, self.v)]
            self._layout(self.k[0].shape[0], self.end - min(self.start), like)


class ModelRunner:
    """Runs the model: `prefill(jobs)` and `decode(batch)`; knows nothing of trees or requests."""

    def __init__(self, model, device: torch.device, pad_id: int):
        self.model, self.device, self.pad_id = model, device, pad_id
        self.dtype = next(model.parameters()).dtype
        # transformers >= 5.2x names the cache argument `cache`; older versions `past_key_values`
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    def _forward(self, ids, mask, pos, cache, keep):
        # ids, pos: [B, S]; mask: [B, past + S]; keep: [B, 1] index (in S) of the logits wanted, or 1
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                         logits_to_keep=keep, **{self._cache_arg: cache})
        return out.logits[:, -1]  # [B, V]

    @torch.inference_mode()
    def prefill(self, jobs: list[PrefillJob]) -> list[tuple[KV, torch.Tensor]]:
        """One forward over every job; per job: the new tokens' KV (per layer [H, N, D] views of
        a transient cache) and the logits after its last token ([V], float32).

        Layout of row b: [pad | held KV (held_b) | new tokens (N_b) | pad]: past width P, input width N."""
        held = [j.held for j in jobs]
        news = [len(j.tokens) for j in jobs]
        P, N, B = max(held), max(news), len(jobs)
        ids = torch.full((B, N), self.pad_id, dtype=torch.long)
        mask = torch.zeros(B, P + N, dtype=torch.long)
        pos = torch.zeros(B, N, dtype=torch.long)
        for b, j in enumerate(jobs):
            ids[b, :len(j.tokens)] = torch.tensor(j.tokens, dtype=torch.long)
            mask[b, P - j.held:P + len(j.tokens)] = 1
            # pads after the real tokens continue the positions (masked out for real queries)
            pos[b] = torch.arange(j.held, j.held + N)
        cache = DynamicCache(ddp_cache_data=self._gather(jobs, P)) if P else DynamicCache()
        keep = torch.tensor([[n - 1] for n in news])
        logits = self._forward(ids.to(self.device), mask.to(self.device), pos.to(self.device), cache,
                               keep.to(self.device))
        out = []
        for b, n in enumerate(news):
            kv = [(layer.keys[b, :, P:P + n], layer.values[b, :, P:P + n]) for layer in cache.layers]
            out.append((kv, logits[b].float()))
        return out

    def _gather(self, jobs: list[PrefillJob], width: int) -> KV:
        """Left-padded past of every job: per layer k, v [B, H, width, D]; padding is zeros."""
        first = next(piece for j in jobs for piece in j.past)
        batch = []
        for layer, (k0, _) in enumerate(first):
            H, _, D = k0.shape
            k = k0.new_zeros(len(jobs), H, width, D)
            v = torch.zeros_like(k)
            for b, j in enumerate(jobs):
                col = width - j.held
                for piece in j.past:
                    pk, pv = piece[layer]
                    k[b, :, col:col + pk.shape[1]] = pk
                    v[b, :, col:col + pk.shape[1]] = pv
                    col += pk.shape[1]
            batch.append((k, v))
        return batch

    @torch.inference_mode()
    def decode(self, batch: DecodeBatch) -> torch.Tensor:
        """Feed every running row's last token at column `end`; returns the logits [n, V]."""
        batch.prepare()
        n, end = len(batch), batch.end
        ids = torch.tensor([[r.tokens[-1]] for r in batch.rows], device=self.device)  # [n, 1]
        pos = torch.tensor(batch.pos, device=self.device)[:, None]  # [n, 1]
        start = torch.tensor(batch.start, device=self.device)[:, None]
        mask = (torch.arange(end + 1, device=self.device)[None] >= start).long()  # [n, end + 1]
        cache = Cache(layers=[_BufferLayer(k[:n], v[:n], end) for k, v in zip(batch.k, batch.v)])
        logits = self._forward(ids, mask, pos, cache, 1)
        batch.end += 1
        batch.pos = [p + 1 for p in batch.pos]
        return logits.float()


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
            raise RuntimeError("decode buffer overflow")  # DecodeBatch.prepare makes room: a bug
        self.buf_k[:, :, self.used:self.used + n] = key_states
        self.buf_v[:, :, self.used:self.used + n] = value_states
        self.used += n
        self._views()
        return self.keys, self.values
