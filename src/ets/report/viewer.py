"""A self-contained HTML page of one problem's search tree (no scripts, no external files).

Each node shows its step text, PRM score (with a bar), how many children it was given (kept) or
that it was pruned (alloc == 0), its semantic cluster, and its finished state; solutions show
their extracted answer and whether it is right. The path of the chosen answer is outlined.
"""

from __future__ import annotations

import html

from ets.tasks import Task
from ets.treeio import tree_from_dict
from ets.tree import ANSWER, CAP, DEPTH, Node

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:16px;color:#222;background:#fafafa}
h1{font-size:18px;margin:0 0 8px} .q{white-space:pre-wrap;background:#fff;border:1px solid #ddd;padding:8px}
.meta span{display:inline-block;margin:4px 12px 4px 0}
.ok{color:#137333;font-weight:600} .bad{color:#b3261e;font-weight:600}
ul.tree{list-style:none;padding-left:22px;margin:0;border-left:1px dotted #bbb}
ul.tree.top{border-left:none;padding-left:0}
.node{background:#fff;border:1px solid #9ab;border-radius:6px;padding:4px 8px;margin:4px 0;max-width:980px}
.node.pruned{border-style:dashed;border-color:#bbb;color:#777;background:#f3f3f3}
.node.sol-ok{background:#e6f4ea;border-color:#137333} .node.sol-bad{background:#fce8e6;border-color:#b3261e}
.node.cap,.node.depth{background:#fff4e5;border-color:#e37400}
.node.chosen{outline:3px solid #f9ab00}
.hdr{font-size:12px;color:#444} .hdr b{color:#000}
.step{white-space:pre-wrap;font-family:ui-monospace,monospace;font-size:12.5px;margin:2px 0 0}
.bar{display:inline-block;width:60px;height:8px;background:#ddd;vertical-align:middle;margin:0 4px}
.bar i{display:block;height:8px;background:#1a73e8}
.chip{display:inline-block;padding:0 6px;border-radius:8px;font-size:11px;color:#fff;margin-left:4px}
table{border-collapse:collapse;margin:8px 0} td,th{border:1px solid #ccc;padding:2px 8px;font-size:12px;text-align:right}
th{background:#eee} td.l{text-align:left}
details>summary{cursor:pointer;color:#555}
"""

PALETTE = ["#1a73e8", "#e8710a", "#188038", "#d93025", "#9334e6", "#007b83", "#b06000", "#c5221f",
           "#3c4043", "#a142f4"]


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def render_record(record: dict) -> str:
    """The HTML page for one saved problem record (a run's problems/<id>.json)."""
    task = Task.from_dict(record["task"])
    tree = tree_from_dict(record["tree"])
    chosen = record.get("answer") or {}
    chosen_id = chosen.get("node_id")
    on_path = set()
    if chosen_id is not None and chosen_id < len(tree.nodes):
        on_path = {n.id for n in tree.nodes[chosen_id].path()} | {0}
    verdicts: dict[int, tuple[str | None, bool]] = {}
    for node in tree.solutions():
        ans = task.extract(node.text) or task.extract("".join(node.step_texts()))
        verdicts[node.id] = (ans, task.grade(ans, record["gold"]))

    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'>",
             f"<title>ets tree: {_e(record['id'])}</title><style>{CSS}</style></head><body>",
             f"<h1>Problem {_e(record['id'])}</h1>",
             f"<div class='q'>{_e(record['question'])}</div>"]
    right = record.get("correct")
    verdict = "<span class='ok'>right</span>" if right else "<span class='bad'>wrong</span>"
    kv = record.get("kv", {})
    parts.append("<div class='meta'>"
                 f"<span>gold: <b>{_e(record['gold'])}</b></span>"
                 f"<span>chosen: <b>{_e(chosen.get('answer'))}</b> {verdict}</span>"
                 f"<span>vote: {_e(chosen.get('vote'))}/{_e(chosen.get('agg'))}</span>"
                 f"<span>solutions: {len(verdicts)}</span><span>nodes: {len(tree.nodes)}</span>"
                 f"<span>KV mean/peak: {kv.get('kv_mean', 0):.0f}/{kv.get('kv_peak', 0)} tokens</span>"
                 f"<span>policy: {_e(record.get('policy'))}, PRM: {_e(record.get('prm'))}</span></div>")
    parts.append(_groups_table(chosen.get("groups", [])))
    parts.append(_trace_table(record.get("trace", [])))
    parts.append("<p class='hdr'>Legend: blue = kept (children given), dashed grey = pruned (alloc 0), "
                 "green/red = solution right/wrong, orange = stopped by token or depth cap, "
                 "yellow outline = path of the chosen answer; chips = semantic cluster.</p>")
    parts.append("<ul class='tree top'>" + _node_html(tree.root, verdicts, on_path, chosen_id) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _node_html(node: Node, verdicts, on_path, chosen_id) -> str:
    classes = ["node"]
    label = []
    if node.is_root:
        label.append("<b>prompt</b>")
    else:
        label.append(f"<b>#{node.id}</b> depth {node.depth}")
        if node.score is not None:
            w = max(0.0, min(1.0, node.score)) * 100
            label.append(f"score {node.score:.3f}<span class='bar'><i style='width:{w:.0f}%'></i></span>")
    if node.alloc == 0:
        classes.append("pruned")
        label.append("pruned")
    elif node.alloc:
        label.append(f"kept: {node.alloc} child{'ren' if node.alloc > 1 else ''}")
    if node.cluster is not None:
        color = PALETTE[node.cluster % len(PALETTE)]
        label.append(f"<span class='chip' style='background:{color}'>cluster {node.cluster}</span>")
    if node.finish == ANSWER:
        ans, ok = verdicts.get(node.id, (None, False))
        classes.append("sol-ok" if ok else "sol-bad")
        label.append(f"solution → <b>{_e(ans)}</b> " + ("<span class='ok'>✓ right</span>" if ok
                                                          else "<span class='bad'>✗ wrong</span>"))
    elif node.finish == CAP:
        classes.append("cap")
        label.append("stopped: token cap")
    elif node.finish == DEPTH:
        classes.append("depth")
        label.append("stopped: depth cap")
    if node.id in on_path or node.id == chosen_id:
        classes.append("chosen")
    if node.id == chosen_id:
        label.append("<b>(chosen)</b>")
    label.append(f"{len(node.token_ids)} tok")
    text = node.text if not node.is_root else node.text
    body = f"<div class='step'>{_e(text)}</div>"
    if node.is_root:
        body = f"<details><summary>prompt text</summary>{body}</details>"
    out = f"<li><div class='{' '.join(classes)}' id='n{node.id}'><div class='hdr'>{' · '.join(label)}</div>{body}</div>"
    if node.children:
        out += "<ul class='tree'>" + "".join(_node_html(c, verdicts, on_path, chosen_id) for c in node.children) + "</ul>"
    return out + "</li>"


def _groups_table(groups: list[dict]) -> str:
    if not groups:
        return "<p>No solution with an answer.</p>"
    rows = "".join(f"<tr><td class='l'>{_e(g['answer'])}</td><td>{g['weight']:.3f}</td>"
                   f"<td>{len(g['members'])}</td><td class='l'>{_e(', '.join('#' + str(m) for m in g['members']))}</td></tr>"
                   for g in groups)
    return ("<details open><summary>answer groups (votes)</summary><table><tr><th>answer</th><th>weight</th>"
            f"<th>solutions</th><th>nodes</th></tr>{rows}</table></details>")


def _trace_table(trace: list[dict]) -> str:
    if not trace:
        return ""
    rows = "".join(f"<tr><td>{t['depth']}</td><td>{t['candidates']}</td><td>{t['finished']}</td><td>{t['kept']}</td>"
                   f"<td>{t['remaining']}</td><td>{t['kv_tokens']}</td><td>{t['kv_blocks']}</td>"
                   f"<td>{(t.get('info') or {}).get('num_clusters', '-')}</td></tr>" for t in trace)
    return ("<details><summary>per-depth trace</summary><table><tr><th>depth</th><th>candidates</th>"
            "<th>finished</th><th>kept</th><th>remaining</th><th>KV tokens</th><th>KV blocks</th>"
            f"<th>clusters</th></tr>{rows}</table></details>")
