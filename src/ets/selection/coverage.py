"""Exact coverage-term solver after variable fixing: a tree DP over sets of covered clusters.

After `fix_variables`, the fixed-in candidates F pay for their paths (P(F)) and cover their
clusters. What is left decomposes:
- the free candidates hang off P(F) in small unpaid subtrees ("tops": unpaid nodes whose parent
  is paid; when F is empty the root itself is the one top);
- only clusters not covered by F ("open" clusters) still earn the bonus g;
- two tops interact only through an open cluster they share, so tops linked by shared open
  clusters form a component, and components are solved independently.

Within a subtree the DP keeps, per node v, a table G_v: mask -> best value, where mask is the
exact set of open clusters covered by the kept candidates below v and value is their outcome
minus the cost of every kept node below v, v included. A node's table is the (OR, +)
product of its children's tables, each child optional (mask 0, value 0). Only Pareto states are
kept: (m, v) is dropped when some (m', v') has v' >= v + g * |m - m'| (m' a superset of m and
v' >= v is the plain case), since any completion of the first is matched by the same completion
of the second: the clusters m covers beyond m' are worth at most g each. A component's optimum
is max over its masks of value + g * |mask|.

Subtrees with no open cluster below ("closed") need no table: their value is the plain tree DP
(max(0, v) per child), done level by level in numpy, and an open parent adds it to every state.
When the tops of a component share so many clusters that their product outgrows the caps, they
are merged instead by a DP over all 2^u masks of the component's u clusters (`_merge_by_mask`).

Exact as long as every node cost is >= 0 (checked by the caller). A table holds up to 2^(open
clusters in the subtree) states; past MAX_PAIRS / MAX_STATES (and MAX_CELLS for the mask merge)
the DP gives up (returns None) and the caller falls back to HiGHS, so correctness never depends
on the tables staying small.
"""

from __future__ import annotations

from operator import itemgetter

import numpy as np

from ets.selection.program import SelectionProblem

# Past these the DP gives up to HiGHS: state pairs in one table product, states kept in one table.
MAX_PAIRS = 2048
MAX_STATES = 64
MAX_CELLS = 1 << 20  # states * 2^clusters for the mask DP that merges a component's tops


_NEG = float("-inf")


class TooManyStates(Exception):
    """A table outgrew its cap: the caller falls back to HiGHS."""


def _pareto(table: dict[int, float], g: float, nonempty: int) -> dict[int, float]:
    """Drop dominated states: (m, v) goes when a kept (k, w) has w >= v + g * |m - k| and m
    holds no required bit (`nonempty`) that k lacks."""
    kept: list[tuple[int, float]] = []
    for m, v in sorted(table.items(), key=itemgetter(1), reverse=True):
        for k, w in kept:
            extra = m & ~k
            if not extra & nonempty and w - v >= g * extra.bit_count():
                break
        else:
            kept.append((m, v))
            if len(kept) > MAX_STATES:
                raise TooManyStates
    return dict(kept)


# back pointers of a product a x b that need no table: every state came from one of a's states
# and b's mask-0 state (SHIFT), or from a's mask-0 state and one of b's (LIFT)
SHIFT, LIFT = 0, 1


def _product(a: dict[int, float], b: dict[int, float], g: float, nonempty: int, max_pairs: int):
    """(OR, +) product of two tables, and back pointers: per resulting mask the pair of masks
    it came from (a dict, or SHIFT / LIFT)."""
    if len(b) == 1 and 0 in b:
        vb = b[0]
        return {m: v + vb for m, v in a.items()}, SHIFT
    if len(a) == 1 and 0 in a:
        va = a[0]
        return {m: va + v for m, v in b.items()}, LIFT
    if len(a) * len(b) > max_pairs:
        raise TooManyStates
    out: dict[int, float] = {}
    back: dict[int, tuple[int, int]] = {}
    for ma, va in a.items():
        for mb, vb in b.items():
            m, v = ma | mb, va + vb
            if v > out.get(m, _NEG):
                out[m], back[m] = v, (ma, mb)
    return _pareto(out, g, nonempty), back


def _merge_by_mask(tabs: list[dict[int, float]], g: float, nonempty: int) -> list[int]:
    """One state per table maximising sum of values + g * |clusters covered| (the nonempty bit
    required when set, never paid), by a DP over all masks of the clusters these tables use:
    f[M] = best value of the tables so far with covered clusters a superset of M, so taking a
    state (s, v) next gives f'[M] = max over states of f[M - s] + v. Work is (states) * 2^bits;
    past MAX_CELLS it raises TooManyStates."""
    bits = 0
    for t in tabs:
        for m in t:
            bits |= m
    pos = [b for b in range(bits.bit_length()) if bits >> b & 1]
    u = len(pos)
    if sum(len(t) for t in tabs) << u > MAX_CELLS:
        raise TooManyStates

    def compact(m):
        return sum(1 << i for i, b in enumerate(pos) if m >> b & 1)

    every = np.arange(1 << u)
    f = np.full(1 << u, -np.inf)
    f[0] = 0.0
    steps = []
    for t in tabs:
        masks = list(t)
        small = np.array([compact(m) for m in masks], np.int64)
        cand = f[every[None, :] & ~small[:, None]] + np.array([t[m] for m in masks])[:, None]
        arg = cand.argmax(axis=0)
        f = cand[arg, every]
        steps.append((masks, small, arg))
    ne = compact(nonempty)
    paid_bits = sum((every >> i) & 1 for i in range(u)) - ((every & ne) != 0)
    score = f + g * paid_bits
    if ne:
        score[(every & ne) == 0] = -np.inf
    m_small = int(np.argmax(score))
    chosen = []
    for masks, small, arg in reversed(steps):
        k = int(arg[m_small])
        chosen.append(masks[k])
        m_small &= ~int(small[k])
    return chosen[::-1]


def common_chain(paths: np.ndarray) -> np.ndarray:
    """Nodes on every candidate's path (the root down to the first branching): kept in every
    feasible selection, since some candidate is always kept."""
    same = np.all(paths == paths[:1], axis=0)
    return paths[0, : int(np.argmin(same)) if not same.all() else paths.shape[1]]


def solve_open(p: SelectionProblem, f_in: np.ndarray, f_out: np.ndarray, paths: np.ndarray,
               max_pairs: int | None = None) -> np.ndarray | None:
    """[N] bool optimal selection given the fixing (f_in kept, f_out dropped; both from
    fix_variables, so some optimum respects them), or None when the tables outgrow their caps
    (max_pairs defaults to MAX_PAIRS). Needs p.cost >= 0 and the coverage term on.

    With F empty, sum x >= 1 binds. The common chain is kept whatever is chosen, so first solve
    with it paid and the constraint dropped (the objective differs by a constant on non-empty
    selections): a non-empty optimum of that relaxation is optimal. Only if it keeps nothing is
    the constraint enforced, by a bit every candidate sets, over the whole tree as one top."""
    max_pairs = MAX_PAIRS if max_pairs is None else max_pairs
    nothing = np.zeros(len(p.parent), bool)
    if f_in.any():
        return _solve_open(p, f_in, f_out, paths, max_pairs, nothing, False)
    chain = nothing.copy()
    chain[common_chain(paths)] = True
    keep = _solve_open(p, f_in, f_out, paths, max_pairs, chain, False)
    if keep is None or keep.any():
        return keep
    return _solve_open(p, f_in, f_out, paths, max_pairs, nothing, True)


def _solve_open(p, f_in, f_out, paths, max_pairs, paid, need_one):
    """solve_open with the nodes `paid` (P(F) is added) counted as kept; need_one (F empty and
    nothing paid): some candidate must be kept."""
    n, cl, g = p.n_cand, p.cluster, p.bonus
    paid = paid.copy()
    paid[paths[f_in].ravel()] = True
    covered = np.zeros(int(cl.max()) + 1, bool)
    covered[cl[f_in]] = True
    free = np.flatnonzero(~f_in & ~f_out)
    keep = f_in.copy()
    if not len(free):
        return keep
    open_k = np.unique(cl[free][~covered[cl[free]]])
    if len(open_k) >= 62:
        return None  # masks would overflow the int64 labels below; HiGHS takes it
    bit_of = np.zeros(len(covered), np.int64)
    bit_of[open_k] = 1 << np.arange(len(open_k), dtype=np.int64)
    # need_one: the root is unpaid and some candidate must be kept; a pseudo-cluster bit that
    # every candidate sets (and the optimum must contain) enforces sum x >= 1
    nonempty = (1 << len(open_k)) if need_one else 0
    mask = np.zeros(n, np.int64)
    mask[free] = bit_of[cl[free]] | nonempty

    # The unpaid forest: every unpaid node on a free candidate's path (free candidates included).
    # A top is an unpaid node whose parent is paid (or the root itself). A node is open when
    # some candidate below it has a non-zero mask; closed subtrees need no table.
    sub = paths[free]
    nodes = np.unique(sub[~paid[sub]])
    is_open = np.zeros(len(p.parent), bool)
    sub_open = sub[mask[free] != 0]
    is_open[sub_open[~paid[sub_open]]] = True
    par = p.parent[nodes]
    top = (par < 0) | paid[np.maximum(par, 0)]

    # Closed nodes, bottom up: v = outcome - cost (candidate) or -cost + sum of the children's
    # max(0, v); a closed child is kept iff v >= 0 (ties go to keeping). `gain` collects, per
    # parent, the children's max(0, v): an open parent adds it to every state of its table.
    # Closed nodes exist only without need_one (else every candidate has the nonempty bit), and
    # then the root is paid (in P(F) or the common chain), so every closed node has a parent.
    size = len(p.parent)
    v = np.zeros(size)
    gain = np.zeros(size)
    closed = nodes[~is_open[nodes]]
    closed = closed[np.argsort(-p.depth[closed], kind="stable")]
    cut = np.flatnonzero(np.diff(p.depth[closed])) + 1
    levels = np.split(closed, cut) if len(closed) else []  # deepest level first
    own = np.zeros(size)
    own[:n] = p.outcome
    own -= p.cost
    for level in levels:
        lv = own[level] + gain[level]
        v[level] = lv
        gain += np.bincount(p.parent[level], weights=np.maximum(lv, 0.0), minlength=size)

    opened = nodes[is_open[nodes]]
    opened = opened[np.argsort(-p.depth[opened], kind="stable")]  # children before parents
    open_tops = set(nodes[top & is_open[nodes]].tolist())
    children: dict[int, list[int]] = {}
    for j, q in zip(opened.tolist(), p.parent[opened].tolist()):
        if j not in open_tops:
            children.setdefault(q, []).append(j)
    base = (gain - p.cost).tolist()  # per open inner node: its closed children, minus its cost
    table: dict[int, dict[int, float]] = {}
    for j, m, val in zip(free.tolist(), mask[free].tolist(), (p.outcome[free] - p.cost[free]).tolist()):
        if m:
            table[j] = {m: val}
    backs: dict[int, list] = {}
    empty_wins: dict[int, bool] = {}
    kept_open: list[int] = []

    def optional(j):
        """table[j] with the 'j not kept' option at mask 0 (ties go to keeping)."""
        t = table[j]
        v0 = t.get(0)
        empty_wins[j] = v0 is None or v0 < 0.0
        if empty_wins[j]:
            t = dict(t)
            t[0] = 0.0
        return t

    def combine(kids):
        """Product of the optional tables of `kids`, and the back pointers to undo it."""
        acc, chain = optional(kids[0]), [(kids[0], LIFT)]
        for c in kids[1:]:
            acc, back = _product(acc, optional(c), g, nonempty, max_pairs)
            chain.append((c, back))
        return acc, chain

    def take(chain, m):
        """Keep the candidates that realise mask m of a combined table."""
        for c, back in reversed(chain):
            if back is LIFT:
                m, mc = 0, m
            elif back is SHIFT:
                mc = 0
            else:
                m, mc = back[m]
            take_one(c, mc)

    def take_one(c, mc):
        """Keep c's state mc (nothing, if that is c's 'not kept' option)."""
        if mc != 0 or not empty_wins[c]:
            if c < n:
                keep[c] = True
            else:
                kept_open.append(c)  # its closed children are kept by the pass below
                take(backs[c], mc)

    try:
        for j in opened[opened >= n].tolist():
            kids, bj = children[j], base[j]
            if len(kids) == 1:  # most open nodes: optional(c) shifted, without the copies
                c = kids[0]
                t = table[c]
                v0 = t.get(0)
                empty = empty_wins[c] = v0 is None or v0 < 0.0
                tj = {m: val + bj for m, val in t.items()}
                if empty:
                    tj[0] = bj
                table[j], backs[j] = tj, [(c, LIFT)]
                continue
            acc, backs[j] = combine(kids)
            table[j] = {m: val + bj for m, val in acc.items()}

        # components: open tops linked by a shared open cluster (union-find over tops)
        tops = list(open_tops)
        group = list(range(len(tops)))

        def find(a):
            while group[a] != a:
                group[a] = group[group[a]]
                a = group[a]
            return a

        owner: dict[int, int] = {}
        for a, t in enumerate(tops):
            mm = 0
            for m in table[t]:
                mm |= m
            mm &= ~nonempty
            while mm:
                low = mm & -mm
                mm ^= low
                if low in owner:
                    group[find(a)] = find(owner[low])
                else:
                    owner[low] = a
        comps: dict[int, list[int]] = {}
        for a, t in enumerate(tops):
            comps.setdefault(find(a), []).append(t)

        for members in comps.values():
            try:
                acc, chain = combine(members)
            except TooManyStates:  # many tops sharing many clusters: one state per top instead
                tabs = [optional(t) for t in members]
                for t, m in zip(members, _merge_by_mask(tabs, g, nonempty)):
                    take_one(t, m)
                continue
            best_m, best_v = None, -np.inf
            for m, val in acc.items():
                if nonempty and not m & nonempty:
                    continue
                score = val + g * (m & ~nonempty).bit_count()
                if score > best_v:
                    best_m, best_v = m, score
            take(chain, best_m)
    except TooManyStates:
        return None

    # closed subtrees, top down: a closed node is kept iff its parent is (paid, or an open node
    # the DP kept, or a kept closed node) and its v >= 0
    alive = paid.copy()
    alive[kept_open] = True
    for level in reversed(levels):
        alive[level] = alive[p.parent[level]] & (v[level] >= 0.0)
    keep[closed[(closed < n) & alive[closed]]] = True
    return keep
