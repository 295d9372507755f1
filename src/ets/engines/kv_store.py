"""Per-step KV segments of search trees, shared by prefix (a trie over steps).

One Segment per distinct step: the root segment is keyed by its tree's root Node, every other
segment by (parent segment, the step's token ids), so identical sibling steps share one segment.
A segment holds, per layer, the keys and values of the first `fed` tokens of its step
(`k: [H, fed, D]`). A step just generated has `fed == len(tokens) - 1`: its last token was
sampled but not yet fed to the model; it is fed once, when the node is first expanded.

Reference counting (a segment is freed exactly when refs drops to 0):
    refs = open claims (nodes created on this segment, neither expanded nor released)
         + child segments still held
         + users (expand requests in flight on this segment's node)
so the KV held at any time is that of the live nodes and all their ancestors, nothing more.
Freeing a segment drops its parent's count, which may free the parent in turn.

Eviction (the engine under KV pressure) drops a held segment's KV but keeps the segment, so
the KV is fed again (recomputed) when the segment is next needed. Along every path the fed
segments form a prefix: a segment holds KV only if its parent is complete, so eviction takes
segments whose children hold none (leaves first).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ets.tree import Node

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (k, v), each [H, T, D]


@dataclass(eq=False)
class Segment:
    tokens: tuple[int, ...]
    parent: Segment | None
    root: Node  # the tree this segment belongs to (for per-problem accounting)
    kv: KV | None = None  # None while fed == 0
    fed: int = 0  # tokens of `tokens` whose KV is in `kv`
    claims: int = 0  # open claims (see module docstring)
    next_logits: torch.Tensor | None = None  # [V] logits after the whole step, once fed
    children: dict[tuple[int, ...], Segment] = field(default_factory=dict)
    start: int = 0  # absolute position of tokens[0] in the sequence
    users: int = 0  # expand requests in flight on this segment's node
    fed_max: int = 0  # most tokens ever fed: feeding below it again is recomputation

    @property
    def complete(self) -> bool:
        return self.fed == len(self.tokens)

    def path(self) -> list[Segment]:
        """Root segment first."""
        out, s = [], self
        while s is not None:
            out.append(s)
            s = s.parent
        return out[::-1]

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)


class KVStore:
    """Holds the segments of every tree in flight; counts the tokens whose KV it holds."""

    def __init__(self):
        self.roots: dict[Node, Segment] = {}  # root Node (identity) -> root segment
        self._seg_of: dict[Node, Segment] = {}  # Node -> its segment, for nodes seen so far
        self._consumed: set[Node] = set()  # nodes whose claim was already dropped
        self.tokens = 0  # KV tokens held now, all trees
        self.peak = 0
        self.by_root: dict[Node, int] = {}  # KV tokens held per tree
        self.evicted = 0  # tokens whose KV was dropped under pressure (evict)
        self.recomputed = 0  # tokens fed again after their KV was dropped

    # --- lookup -----------------------------------------------------------------------------
    def segment(self, node: Node, create: bool = True) -> Segment | None:
        """The segment of `node`, creating (empty) segments along its path if asked. A segment
        created here holds no claim: its node is about to be expanded (or is an ancestor of one),
        so only its descendants will keep it."""
        if node in self._seg_of:
            return self._seg_of[node]
        if node.parent is None:
            seg = self.roots.get(node)
            if seg is None:
                if not create:
                    return None
                seg = self.roots[node] = Segment(tuple(node.token_ids), None, node)
                self._consumed.add(node)  # created here: holds no claim
        else:
            parent = self.segment(node.parent, create)
            if parent is None:
                return None
            key = tuple(node.token_ids)
            seg = parent.children.get(key)
            if seg is None:
                if not create:
                    return None
                seg = parent.children[key] = Segment(key, parent, parent.root, start=parent.end)
                self._consumed.add(node)  # created here: holds no claim
        self._seg_of[node] = seg
        return seg

    def add_step(self, parent: Segment, tokens: tuple[int, ...], kv: KV | None, fed: int) -> Segment:
        """Record a freshly generated step under `parent`, with the KV of its first `fed`
        tokens; adds one open claim (the node the search is about to create for it). An
        identical sibling already there is reused (its KV is the same) and `kv` dropped."""
        seg = parent.children.get(tokens)
        if seg is None:
            seg = Segment(tokens, parent, parent.root, start=parent.end)
            parent.children[tokens] = seg
            self.extend(seg, kv, fed)
        seg.claims += 1
        return seg

    # --- growth -----------------------------------------------------------------------------
    def extend(self, seg: Segment, kv: KV | None, n: int) -> None:
        """Append the KV of the next `n` tokens of `seg` (kv: per layer [H, n, D])."""
        if n == 0:
            return
        assert seg.fed + n <= len(seg.tokens), "more KV than tokens"
        assert seg.parent is None or seg.parent.complete, "KV after an unfed parent"
        self.recomputed += max(0, min(seg.fed + n, seg.fed_max) - seg.fed)
        seg.fed_max = max(seg.fed_max, seg.fed + n)
        if seg.kv is None:
            seg.kv = [(k.clone(), v.clone()) for k, v in kv]  # own copies: never pin a batch buffer
        else:
            seg.kv = [(torch.cat([k0, k], 1), torch.cat([v0, v], 1)) for (k0, v0), (k, v) in zip(seg.kv, kv)]
        seg.fed += n
        self._count(seg.root, n)

    def _count(self, root: Node, n: int) -> None:
        self.tokens += n
        self.by_root[root] = self.by_root.get(root, 0) + n
        self.peak = max(self.peak, self.tokens)

    # --- release ----------------------------------------------------------------------------
    def consume(self, node: Node) -> None:
        """Drop `node`'s claim (it was expanded, or released); free what nothing needs."""
        if node in self._consumed:
            return
        seg = self.segment(node, create=False)
        if seg is None:
            return
        self._consumed.add(node)
        self.unclaim(seg)

    def unclaim(self, seg: Segment) -> None:
        """Drop one claim on `seg` (its node was expanded or released, or the step was never
        handed to a caller); free what nothing needs."""
        seg.claims -= 1
        self._settle(seg)

    def use(self, seg: Segment) -> None:
        """An expand request on `seg`'s node is in flight: keep the segment (and its logits)."""
        seg.users += 1

    def unuse(self, seg: Segment) -> None:
        seg.users -= 1
        self._settle(seg)

    def _settle(self, seg: Segment) -> None:
        # no node will start children from here again (a root may be expanded again: its
        # logits stay while its tree does)
        if seg.claims <= 0 and seg.users <= 0 and seg.parent is not None:
            seg.next_logits = None
        self._maybe_free(seg)

    def evict(self, seg: Segment) -> int:
        """Drop `seg`'s KV (and logits), keeping the segment; returns the tokens dropped. Only a
        segment whose children hold no KV may be evicted (the fed prefix stays a prefix)."""
        assert all(c.fed == 0 for c in seg.children.values()), "evict leaves first"
        n = seg.fed
        self._count(seg.root, -n)
        self.evicted += n
        seg.kv, seg.fed, seg.next_logits = None, 0, None
        return n

    def _maybe_free(self, seg: Segment) -> None:
        while seg is not None and seg.claims <= 0 and seg.users <= 0 and not seg.children:
            self._count(seg.root, -seg.fed)
            seg.kv, seg.fed, seg.next_logits = None, 0, None
            parent = seg.parent
            if parent is None:
                self.roots.pop(seg.root, None)
                self.by_root.pop(seg.root, None)
                self._forget(seg.root)
            else:
                del parent.children[seg.tokens]
            seg = parent

    def _forget(self, root: Node) -> None:
        """Drop the node maps of a finished tree (so its Nodes can be garbage-collected)."""
        for node in [n for n, s in self._seg_of.items() if s.root is root]:
            del self._seg_of[node]
            self._consumed.discard(node)

    def held(self, root: Node) -> int:
        return self.by_root.get(root, 0)

    def check(self) -> None:
        """Invariants (for tests): counts match the segments; no freeable segment is held; the fed
        segments of every path form a prefix of it."""
        total = 0
        stack = list(self.roots.values())
        while stack:
            seg = stack.pop()
            total += seg.fed
            assert seg.claims > 0 or seg.users > 0 or seg.children, "a segment nothing needs is still held"
            assert seg.kv is None or seg.kv[0][0].shape[1] == seg.fed
            assert seg.fed == 0 or seg.parent is None or seg.parent.complete, "KV after an unfed parent"
            stack.extend(seg.children.values())
        assert total == self.tokens, (total, self.tokens)
