"""The block allocator and prefix cache on their own: integers in, integers out."""
from __future__ import annotations

from engine.kv.block_manager import BlockManager

BS = 4


def run_and_free(blocks: BlockManager, seq_id: str, tokens: list[int]) -> list[int]:
    """Admit `tokens` as a prompt, compute them densely, finish: -> the table it had."""
    table, _ = blocks.allocate(seq_id, tokens, len(tokens))
    blocks.publish(seq_id, table, tokens, len(tokens))
    held = list(table)
    blocks.free(seq_id, table)
    return held


def test_prefix_hits_follow_the_hash_chain_and_leave_the_last_token_to_compute():
    blocks = BlockManager(num_blocks=32, block_size=BS)
    a = list(range(100, 140))  # 10 full blocks
    first = run_and_free(blocks, "a", a)
    table, cached = blocks.allocate("b", a[:8] + [7, 7, 7], 11)  # shares two blocks, then differs
    assert cached == 8 and table[:2] == first[:2] and table[2] not in first
    blocks.free("b", table)
    table, cached = blocks.allocate("c", a, len(a))  # the whole prompt is cached...
    assert cached == 36 and table[:9] == first[:9]  # ...but its last block is computed again, owned
    assert blocks.ref_counts[table[9]] == 1
    blocks.free("c", table)
    shifted = [0, 0, 0, 0] + a[4:]  # same second block, other first block: the chain breaks
    assert blocks.cached_prefix(shifted, len(shifted) - 1) == []


def test_shared_blocks_are_reference_counted_and_every_block_comes_back():
    blocks = BlockManager(num_blocks=16, block_size=BS)
    prompt = list(range(12))
    run_and_free(blocks, "a", prompt + [99])
    tables = [blocks.allocate(name, prompt + [i], 13)[0] for i, name in enumerate("xyz")]
    shared = tables[0][:3]
    assert all(t[:3] == shared for t in tables)
    assert [blocks.ref_counts[b] for b in shared] == [3, 3, 3]
    assert len({t[3] for t in tables}) == 3  # each writes its own last block
    assert blocks.usage() == 6 / 16
    for name, table in zip("xyz", tables):
        blocks.free(name, table)
    assert blocks.ref_counts == [0] * 16 and blocks.usage() == 0.0 and blocks.num_free_blocks == 16


def test_only_full_dense_blocks_are_offered_for_reuse():
    blocks = BlockManager(num_blocks=16, block_size=BS)
    tokens = list(range(20))
    table, _ = blocks.allocate("a", tokens, 20)
    blocks.publish("a", table, tokens, num_dense=10)  # e.g. decoded with skipped FFNs after token 10
    held = list(table)
    blocks.free("a", table)
    assert blocks.cached_prefix(tokens, 19) == held[:2]  # blocks 0-1 are dense; block 2 is not whole


def test_cached_blocks_are_evicted_only_when_needed_least_recently_freed_first():
    blocks = BlockManager(num_blocks=6, block_size=BS)
    old = run_and_free(blocks, "old", list(range(8)) + [1])  # caches 2 blocks (the third is partial)
    new = run_and_free(blocks, "new", list(range(50, 58)) + [1])
    assert blocks.num_free_blocks == 6
    fresh = blocks.allocate_blocks(2)  # the two never-hashed blocks go first: both prefixes survive
    assert not set(fresh) & set(old[:2] + new[:2])
    assert blocks.cached_prefix(list(range(8)) + [1], 8) == old[:2]
    blocks.allocate_blocks(1)  # now one cached block must go: the least recently freed one
    assert blocks.cached_prefix(list(range(50, 58)) + [1], 8) == new[:2]
    assert len(blocks.cached_prefix(list(range(8)) + [1], 8)) < 2


def test_admission_counts_free_blocks_and_cached_hits():
    blocks = BlockManager(num_blocks=4, block_size=BS)
    prompt = list(range(12))
    run_and_free(blocks, "a", prompt + [5])  # 4 blocks, 3 of them cached
    assert blocks.can_allocate(prompt + [6], 13, spare=0)  # 3 hits + 1 fresh block = all 4
    assert not blocks.can_allocate(prompt + [6], 13, spare=1)
    assert not blocks.can_allocate(list(range(200, 217)), 17)  # 5 blocks never fit in 4


def test_prefix_caching_off_never_hits():
    blocks = BlockManager(num_blocks=8, block_size=BS, prefix_caching=False)
    run_and_free(blocks, "a", list(range(9)))
    assert blocks.allocate("b", list(range(9)), 9)[1] == 0


def test_a_block_is_due_for_publishing_once_it_is_full_and_dense():
    """The scheduler asks `publishes` each step before it builds the token list `publish` reads."""
    blocks = BlockManager(num_blocks=8, block_size=BS)
    tokens = list(range(10))
    table, _ = blocks.allocate("a", tokens, 10)
    assert [blocks.publishes("a", n) for n in (0, 3, 4, 7, 8)] == [False, False, True, True, True]
    blocks.publish("a", table, tokens, 7)  # one full block offered
    assert [blocks.publishes("a", n) for n in (7, 8)] == [False, True]
    blocks.publish("a", table, tokens, 8)
    assert not blocks.publishes("a", 9)
    assert not BlockManager(num_blocks=8, block_size=BS, prefix_caching=False).publishes("a", 8)


def test_a_prefix_computed_twice_at_once_outlives_the_copy_evicted_first():
    """Two sequences that compute one prefix at once (prompt logprobs, mean embeddings: no reuse)
    each hold a copy; the index named the first only, so once that copy was evicted the prefix was
    lost though the second still held it."""
    blocks = BlockManager(num_blocks=6, block_size=BS)
    prompt = list(range(8)) + [1]
    a, _ = blocks.allocate("a", prompt, 9, reuse=False)
    b, _ = blocks.allocate("b", prompt, 9, reuse=False)
    blocks.publish("a", a, prompt, 9)
    blocks.publish("b", b, prompt, 9)
    copy = list(b)
    blocks.free("a", a)
    assert len(blocks.allocate_blocks(3)) == 3  # the free list's last blocks: a's copy is evicted
    assert blocks.cached_prefix(prompt, 8) == []
    blocks.free("b", b)
    assert blocks.cached_prefix(prompt, 8) == copy[:2]
    # and a copy published once the first is free takes the prefix over at once
    c, _ = blocks.allocate("c", prompt, 9, reuse=False)
    blocks.publish("c", c, prompt, 9)
    assert blocks.cached_prefix(prompt, 8) == c[:2] and blocks.num_free_blocks == 6 - 3 - 3
    held = list(c)
    blocks.free("c", c)
    assert blocks.cached_prefix(prompt, 8) == held[:2] and blocks.num_free_blocks == 3


def test_a_salted_prefix_is_found_only_under_its_own_salt():
    blocks = BlockManager(num_blocks=32, block_size=BS)
    prompt = list(range(200, 213))  # three full blocks and one token
    plain = run_and_free(blocks, "plain", prompt)
    salted = blocks.allocate("s1", prompt, len(prompt), salt="tenant-a")[0]
    assert not set(salted) & set(plain[:3])  # the unsalted prefix is not its
    blocks.publish("s1", salted, prompt, len(prompt))
    blocks.free("s1", list(salted))
    assert blocks.cached_prefix(prompt, 12, salt="tenant-a") == salted[:3]
    assert blocks.cached_prefix(prompt, 12, salt="tenant-b") == []
    assert blocks.cached_prefix(prompt, 12) == plain[:3]
    again, cached = blocks.allocate("s2", prompt, len(prompt), salt="tenant-a")
    assert cached == 12 and again[:3] == salted[:3]
    # with "s2" holding them, 28 blocks are free: a third such prompt with 27 more fits only by its 3 hits
    assert blocks.num_free_blocks == 28
    assert blocks.can_allocate(prompt, len(prompt), spare=27, salt="tenant-a")
    assert not blocks.can_allocate(prompt, len(prompt), spare=27, salt="tenant-b")
    assert not blocks.can_allocate(prompt, len(prompt), spare=27)  # (the unsalted hits are free blocks)
    blocks.free("s2", list(again))
