"""The search tree: one node per reasoning step, and exact KV accounting (SPEC section 3).

Token ids are the source of truth: a node's KV footprint is `len(node.token_ids)`, and the
sequence a node stands for is the concatenation of the token ids on its root path (the root
holds the formatted prompt). Text is kept beside the ids for PRMs, answers and viewing; it is
never re-tokenised.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

# Why a node's trajectory ended (None while it is still growing).
ANSWER = "answer"  # EOS or a final answer in the text: a solution
CAP = "cap"  # cumulative generated tokens reached max_tokens: not a solution
DEPTH = "depth"  # still open when the depth cap stopped the search: not a solution


@dataclass(eq=False)
class Node:
    id: int
    parent: Node | None
    token_ids: list[int]
    text: str
    depth: int
    cum_tokens: int  # generated tokens from the root to this node inclusive (prompt excluded)
    stop_reason: str | None = None  # how the step ended: "delimiter" | "eos" | "length"
    logprobs: list[float] | None = None
    score: float | None = None  # PRM score of this step (the last score of its path)
    finish: str | None = None  # ANSWER | CAP | DEPTH | None
    alloc: int | None = None  # children given to it when it was a candidate (0 = pruned)
    cluster: int | None = None  # semantic cluster label when ETS clustered its depth
    children: list[Node] = field(default_factory=list)

    @property
    def is_root(self) -> bool:
        return self.parent is None

    def path(self) -> list[Node]:
        """Nodes from the first step down to this one (root excluded)."""
        out = []
        node: Node | None = self
        while node is not None and node.parent is not None:
            out.append(node)
            node = node.parent
        return out[::-1]

    def ancestors(self) -> list[Node]:
        """Strict ancestors, root included, nearest first."""
        out = []
        node = self.parent
        while node is not None:
            out.append(node)
            node = node.parent
        return out

    def path_token_ids(self) -> list[int]:
        """Prompt + every step down to this node: the sequence this node's KV stands for."""
        chain = [self, *self.ancestors()][::-1]
        return [t for n in chain for t in n.token_ids]

    def step_texts(self) -> list[str]:
        return [n.text for n in self.path()]

    def step_scores(self) -> list[float | None]:
        return [n.score for n in self.path()]

    def seq_len(self) -> int:
        """Tokens in this node's full sequence, prompt included."""
        return sum(len(n.token_ids) for n in [self, *self.ancestors()])


class Tree:
    """Owns the nodes of one problem's search; ids are dense and in creation order."""

    def __init__(self, prompt_ids: list[int], prompt_text: str):
        self.nodes: list[Node] = []
        self.root = self._new(None, list(prompt_ids), prompt_text, depth=0, cum_tokens=0)

    def _new(self, parent, token_ids, text, depth, cum_tokens, **kw) -> Node:
        node = Node(len(self.nodes), parent, token_ids, text, depth, cum_tokens, **kw)
        self.nodes.append(node)
        if parent is not None:
            parent.children.append(node)
        return node

    def add_child(self, parent: Node, token_ids: Iterable[int], text: str, stop_reason: str,
                  logprobs: Iterable[float] | None = None) -> Node:
        ids = list(token_ids)
        return self._new(parent, ids, text, parent.depth + 1, parent.cum_tokens + len(ids),
                         stop_reason=stop_reason,
                         logprobs=None if logprobs is None else list(logprobs))

    def solutions(self) -> list[Node]:
        return [n for n in self.nodes if n.finish == ANSWER]

    def at_depth(self, depth: int) -> list[Node]:
        return [n for n in self.nodes if n.depth == depth]


@dataclass(frozen=True)
class KV:
    """KV footprint of a set of live sequences sharing prefixes (SPEC section 3)."""

    tokens: int  # unique tokens of the nodes and all their ancestors, prompt included
    gen_tokens: int  # the same, prompt excluded (the reference's faithful-mode figure, less its 2)
    blocks: int  # paged-engine blocks: full blocks shared by prefix, partial tail blocks private
    nodes: int  # distinct nodes (candidates + ancestors, root included)


def union_with_ancestors(nodes: Iterable[Node]) -> list[Node]:
    seen: dict[int, Node] = {}
    for node in nodes:
        cur: Node | None = node
        while cur is not None and cur.id not in seen:
            seen[cur.id] = cur
            cur = cur.parent
    return list(seen.values())


def kv_footprint(leaves: Iterable[Node], block_size: int = 16) -> KV:
    """Exact KV of the sequences ending at `leaves`, with prefix sharing.

    Blocks: a block is shared exactly when the sequences agree up to its last token, i.e. when
    that token lies in a shared node; so every full block is counted once by the node that holds
    its last token, and each leaf whose length is not a multiple of `block_size` adds one
    private partial block.
    """
    leaves = list(leaves)
    if not leaves:
        return KV(0, 0, 0, 0)
    union = union_with_ancestors(leaves)
    tokens = sum(len(n.token_ids) for n in union)
    prompt = len(union[0].ancestors()[-1].token_ids) if union[0].parent else len(union[0].token_ids)
    start = {}  # node id -> absolute position of its first token

    def start_of(node: Node) -> int:
        if node.id not in start:
            start[node.id] = 0 if node.parent is None else start_of(node.parent) + len(node.parent.token_ids)
        return start[node.id]

    full_blocks = 0
    for n in union:
        s, e = start_of(n), start_of(n) + len(n.token_ids)
        # full blocks whose last position (k+1)*B-1 lies in [s, e)
        full_blocks += e // block_size - s // block_size
    leaf_ids = {n.id for n in leaves}
    tails = sum(1 for n in union if n.id in leaf_ids and (start_of(n) + len(n.token_ids)) % block_size)
    return KV(tokens, tokens - prompt, full_blocks + tails, len(union))
