"""Per-depth report: means over problems' traces, ETS's REBASE counterfactual, pooling of deep depths."""

from ets.report.depth import depth_markdown, per_depth


def _t(depth, alloc, info=None, kv=(3, 30)):
    return {"depth": depth, "candidates": len(alloc), "kept": sum(1 for a in alloc if a), "alloc": alloc,
            "info": info or {}, "kv_nodes": kv[0], "kv_tokens": kv[1]}


def test_per_depth_means_and_counterfactual():
    recs = [{"trace": [_t(0, [4]), _t(1, [3, 1, 0, 0], {"rebase_alloc": [2, 1, 1, 0], "num_clusters": 3}, (5, 50))]},
            {"trace": [_t(0, [4]), _t(1, [4, 0], {"rebase_alloc": [4, 0], "num_clusters": 1}, (3, 40)),
                       _t(2, [2, 2]), _t(7, [1])]}]
    rows = per_depth(recs, max_depth=3)
    assert [r["depth"] for r in rows] == ["0", "1", "2", "3+"]
    d1 = rows[1]
    assert d1["problems"] == 2 and d1["candidates"] == 3 and d1["kept"] == 1.5
    assert d1["top_share"] == (0.75 + 1.0) / 2
    assert d1["rebase_kept"] == (3 + 1) / 2  # what REBASE alone would have funded
    assert d1["clusters"] == 2 and d1["kv_nodes"] == 4 and d1["kv_tokens"] == 45
    assert rows[2]["rebase_kept"] is None and rows[2]["top_share"] == 0.5
    md = depth_markdown("ets W=4", rows)
    assert "| 1 | 2 | 3.0 | 1.5 | 2.0 | 0.88 | 2.0 | 4.0 | 45 |" in md and "| 3+ |" in md
