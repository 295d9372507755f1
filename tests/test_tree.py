from ets.tree import Tree, kv_footprint, union_with_ancestors


def _tree():
    # prompt of 10 tokens; a: 8 tokens, b: 6 under root; c: 4, d: 20 under a
    t = Tree(list(range(10)), "prompt")
    a = t.add_child(t.root, range(8), "a", "delimiter")
    b = t.add_child(t.root, range(6), "b", "delimiter")
    c = t.add_child(a, range(4), "c", "delimiter")
    d = t.add_child(a, range(20), "d", "eos")
    return t, a, b, c, d


def test_node_paths_and_counts():
    t, a, b, c, d = _tree()
    assert c.path() == [a, c]
    assert c.ancestors() == [a, t.root]
    assert c.path_token_ids() == list(range(10)) + list(range(8)) + list(range(4))
    assert (c.depth, c.cum_tokens, c.seq_len()) == (2, 12, 22)
    assert d.cum_tokens == 28


def test_kv_tokens_count_shared_prefix_once():
    t, a, b, c, d = _tree()
    kv = kv_footprint([c, d, b], block_size=16)
    assert kv.tokens == 10 + 8 + 6 + 4 + 20
    assert kv.gen_tokens == 8 + 6 + 4 + 20
    assert kv.nodes == 5
    assert {n.id for n in union_with_ancestors([c, d])} == {t.root.id, a.id, c.id, d.id}


def test_kv_blocks_share_full_blocks_only():
    t, a, b, c, d = _tree()
    # sequences: c = 22 tokens, d = 38 tokens, b = 16 tokens, block 16.
    # block [0,16) ends at pos 15, inside `a` (a spans 10..17) -> shared by c and d: 1 block.
    # b's block [0,16) ends at pos 15 inside b (b spans 10..15): its own full block.
    # d: blocks ending at 31 (in d, spans 18..37) -> 1 more full block; tails: c (22 % 16 = 6)
    # and d (38 % 16 = 6) have private partial blocks; b (16) has none.
    kv = kv_footprint([c, d, b], block_size=16)
    assert kv.blocks == 1 + 1 + 1 + 2
    # block size 1: blocks == tokens
    assert kv_footprint([c, d, b], block_size=1).blocks == kv.tokens


def test_kv_of_single_path_is_its_length():
    t, a, b, c, d = _tree()
    kv = kv_footprint([d], block_size=4)
    assert kv.tokens == d.seq_len() == 38
    assert kv.blocks == 10  # ceil(38 / 4)
