"""Tree <-> JSON: everything needed to recompute answers, KV figures and views without the model.

A tree is stored as a flat list of nodes in id order (parents always come before children, as
ids are dense in creation order); each node names its parent by id. Round trip is exact:
`tree_from_dict(tree_to_dict(t))` has the same ids, parents, token ids, text, logprobs, scores,
finished states, allocations and clusters.
"""

from __future__ import annotations

from dataclasses import asdict, fields

from ets.tree import Node, Tree

NODE_FIELDS = ("token_ids", "text", "depth", "cum_tokens", "stop_reason", "logprobs", "score",
               "finish", "alloc", "cluster")


def node_to_dict(node: Node) -> dict:
    d = {"id": node.id, "parent": None if node.parent is None else node.parent.id}
    for k in NODE_FIELDS:
        d[k] = getattr(node, k)
    return d


def tree_to_dict(tree: Tree) -> dict:
    return {"nodes": [node_to_dict(n) for n in tree.nodes]}


def tree_from_dict(d: dict) -> Tree:
    nodes = d["nodes"]
    if not nodes or nodes[0]["parent"] is not None:
        raise ValueError("a saved tree must start with its root (parent null)")
    tree = Tree(nodes[0]["token_ids"], nodes[0]["text"])
    _fill(tree.root, nodes[0])
    for i, nd in enumerate(nodes[1:], 1):
        if nd["id"] != i or nd["parent"] is None or nd["parent"] >= i:
            raise ValueError(f"saved tree node {i} is out of order (id {nd['id']}, parent {nd['parent']})")
        parent = tree.nodes[nd["parent"]]
        node = tree.add_child(parent, nd["token_ids"], nd["text"], nd["stop_reason"], nd.get("logprobs"))
        _fill(node, nd)
    return tree


def _fill(node: Node, nd: dict) -> None:
    for k in ("score", "finish", "alloc", "cluster"):
        setattr(node, k, nd.get(k))
    # cum_tokens and depth follow from the parents; a mismatch means a corrupted file
    if node.depth != nd["depth"] or node.cum_tokens != nd["cum_tokens"]:
        raise ValueError(f"saved tree node {node.id}: depth/cum_tokens do not match its path")


def trace_to_list(trace) -> list[dict]:
    return [asdict(t) for t in trace]


def trace_from_list(items: list[dict]):
    from ets.search import StepTrace

    names = {f.name for f in fields(StepTrace)}
    return [StepTrace(**{k: v for k, v in it.items() if k in names}) for it in items]
