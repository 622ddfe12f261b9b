"""BlockManager: unit tests for each rule, and a hypothesis state machine that simulates the KV pool's contents."""

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from minillm.kvcache.blocks import BlockManager, OutOfBlocksError


def run(bm: BlockManager, seq_id: int, tokens: list[int], num_tokens: int) -> list[tuple[int, int]]:
    """Grow, pretend to write the K/V of tokens[:num_tokens], commit."""
    copies = bm.ensure_capacity(seq_id, num_tokens)
    bm.commit(seq_id, tokens, num_tokens)
    return copies


@pytest.mark.parametrize("block_size", [0, 3, 6, 12, -4])
def test_block_size_must_be_power_of_two(block_size):
    with pytest.raises(ValueError, match="power of two"):
        BlockManager(8, block_size)


def test_num_blocks_must_be_positive():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(0, 4)


def test_commit_cannot_go_back_into_a_written_full_block_nor_past_the_slots():
    bm = BlockManager(8, 4)
    bm.allocate_prompt(0, list(range(6)))
    run(bm, 0, list(range(6)), 6)  # block 0 is full and written: its hash is in the chain
    with pytest.raises(ValueError, match=r"must lie in \[4 "):
        bm.commit(0, list(range(6)), 3)
    bm.commit(0, list(range(6)), 5)  # inside the partly written last block: the sequence owns that count
    with pytest.raises(ValueError, match="slots=8"):
        bm.commit(0, list(range(10)), 9)


def test_slot_mapping_and_growth():
    bm = BlockManager(8, 4)
    assert bm.allocate_prompt(0, list(range(6))) == 0
    assert bm.num_blocks_needed(0, 6) == 2
    assert run(bm, 0, list(range(6)), 6) == []
    table = bm.block_table(0)
    assert len(table) == 2 and bm.num_used_blocks == 2 and bm.num_free_blocks == 6
    assert bm.slot_mapping(0, 3, 6) == [table[0] * 4 + 3, table[1] * 4, table[1] * 4 + 1]
    with pytest.raises(ValueError, match="ensure_capacity"):
        bm.slot_mapping(0, 0, 9)
    assert bm.num_blocks_needed(0, 8) == 0 and bm.num_blocks_needed(0, 9) == 1


def test_double_free_and_unknown_sequence():
    bm = BlockManager(4, 2)
    bm.allocate_prompt(7, [1, 2, 3])
    run(bm, 7, [1, 2, 3], 3)
    bm.free(7)
    with pytest.raises(ValueError, match="double free"):
        bm.free(7)
    bm.allocate_prompt(1, [1])
    with pytest.raises(ValueError, match="already allocated"):
        bm.allocate_prompt(1, [1])


def test_request_that_can_never_fit():
    bm = BlockManager(4, 4)
    bm.allocate_prompt(0, list(range(17)))
    with pytest.raises(ValueError, match="never fit"):
        bm.ensure_capacity(0, 17)


def test_out_of_blocks_is_clear_and_changes_nothing():
    bm = BlockManager(3, 4)
    bm.allocate_prompt(0, list(range(8)))
    run(bm, 0, list(range(8)), 8)
    bm.allocate_prompt(1, list(range(100, 108)))
    assert not bm.can_allocate(bm.num_blocks_needed(1, 8))
    with pytest.raises(OutOfBlocksError):
        bm.ensure_capacity(1, 8)
    assert bm.block_table(1) == [] and bm.num_free_blocks == 1


def test_prefix_hits_and_cap_below_prompt_length():
    bm = BlockManager(16, 4)
    prompt = list(range(12))
    assert bm.allocate_prompt(0, prompt) == 0
    run(bm, 0, prompt, 12)
    # Same 12 tokens: all three blocks are cached, but the last token must be recomputed -> only 8 reused.
    assert bm.allocate_prompt(1, prompt) == 8
    assert bm.block_table(1) == bm.block_table(0)[:2]
    assert bm.ref_counts[bm.block_table(0)[0]] == 2
    # A prompt that shares one block then diverges.
    assert bm.allocate_prompt(2, list(range(4)) + [99] * 6) == 4
    assert bm.prefix_cache_queries == 12 + 12 + 10 and bm.prefix_cache_hits == 8 + 4
    assert bm.prefix_cache_hit_rate == pytest.approx(12 / 34)
    # The hash chains: same block tokens after a different prefix do not hit.
    assert bm.allocate_prompt(3, [99] * 4 + list(range(4, 8)) + [0]) == 0


def test_prefix_caching_disabled():
    bm = BlockManager(16, 4, enable_prefix_caching=False)
    run(bm, 0, list(range(12)), bm.allocate_prompt(0, list(range(12))) + 12)
    assert bm.allocate_prompt(1, list(range(12))) == 0 and bm.num_cached_blocks == 0


def test_freed_cached_blocks_are_reused_then_evicted_lru():
    bm = BlockManager(4, 2)
    a, b = [1, 2, 3, 4, 5], [7, 8, 9, 10, 11]
    bm.allocate_prompt(0, a)
    run(bm, 0, a, 5)  # blocks: [1,2] [3,4] cached, [5] partial
    bm.free(0)
    assert bm.num_free_blocks == 4 and bm.num_cached_blocks == 2
    assert bm.allocate_prompt(1, a) == 4  # found again after free
    bm.free(1)
    bm.allocate_prompt(2, b)
    run(bm, 2, b, 5)  # needs 3 fresh blocks: 2 never-cached ones, then evicts the LRU cached block
    assert bm.num_cached_blocks == 2 - 1 + 2  # one of a's evicted, b's two full blocks added
    bm.free(2)
    # Free order was reversed (tail first), so [3, 4] was evicted and [1, 2] is still there.
    assert bm.allocate_prompt(3, a) == 2


def test_fork_copy_on_write():
    bm = BlockManager(8, 4)
    prompt = list(range(10))
    bm.allocate_prompt(0, prompt)
    run(bm, 0, prompt, 10)  # 3 blocks, the last holds 2 tokens
    bm.fork(0, 1)
    parent_table = bm.block_table(0)
    assert bm.block_table(1) == parent_table and all(bm.ref_counts[b] == 2 for b in parent_table)
    assert bm.num_blocks_needed(1, 11) == 1  # writing position 10 lands in the shared last block
    copies = bm.ensure_capacity(1, 11)
    assert len(copies) == 1 and copies[0][0] == parent_table[2]
    assert bm.block_table(1)[:2] == parent_table[:2] and bm.block_table(1)[2] == copies[0][1]
    assert bm.ensure_capacity(0, 11) == []  # the parent is now the block's only owner: writes in place
    bm.free(0)
    bm.free(1)
    assert all(r == 0 for r in bm.ref_counts) and bm.num_free_blocks == 8


class BlockManagerMachine(RuleBasedStateMachine):
    """Random allocate / run / fork / free; a simulated pool records which prefix each slot's K/V belongs to."""

    def __init__(self):
        super().__init__()
        self.bm = BlockManager(num_blocks=12, block_size=4)
        self.pool = {}  # slot -> tuple of the tokens whose K/V the slot holds (the K/V of token p depends on [:p+1])
        self.tokens = {}  # seq id -> all its tokens (prompt + generated)
        self.computed = {}  # seq id -> tokens whose K/V is written (the sequence's count, as Sequence keeps it)
        self.freed = []
        self.next_id = 0

    @rule(prefix=st.sampled_from([[], [1, 2, 3, 4], [1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 9, 9, 9, 9], [9] * 8]),
          tail=st.lists(st.integers(0, 2), min_size=1, max_size=9))
    def add_request(self, prefix, tail):
        prompt = prefix + tail
        seq_id, self.next_id = self.next_id, self.next_id + 1
        cached = self.bm.allocate_prompt(seq_id, prompt)
        assert cached % 4 == 0 and 0 <= cached < len(prompt)
        self.tokens[seq_id], self.computed[seq_id] = prompt, cached

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), chunk=st.integers(1, 6))
    def run_step(self, data, chunk):
        seq_id = data.draw(st.sampled_from(sorted(self.tokens)))
        tokens, done = self.tokens[seq_id], self.computed[seq_id]
        if done == len(tokens):
            tokens.append(data.draw(st.integers(0, 2)))  # decode: sample one new token
        target = min(len(tokens), done + chunk)
        needed, free = self.bm.num_blocks_needed(seq_id, target), self.bm.num_free_blocks
        if not self.bm.can_allocate(needed):
            with pytest.raises(OutOfBlocksError):
                self.bm.ensure_capacity(seq_id, target)
            assert self.bm.num_free_blocks == free
            return
        copies = self.bm.ensure_capacity(seq_id, target)
        assert self.bm.num_free_blocks == free - needed
        bs = self.bm.block_size
        for src, dst in copies:  # what PagedKVCache.copy_blocks does
            for off in range(bs):
                if src * bs + off in self.pool:
                    self.pool[dst * bs + off] = self.pool[src * bs + off]
        for p, slot in zip(range(done, target), self.bm.slot_mapping(seq_id, done, target)):
            assert self.bm.ref_counts[slot // bs] == 1, "writing into a shared block: copy-on-write missed"
            self.pool[slot] = tuple(tokens[: p + 1])
        self.bm.commit(seq_id, tokens, target)
        self.computed[seq_id] = target

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(sorted(self.tokens)))
        child, self.next_id = self.next_id, self.next_id + 1
        self.bm.fork(parent, child)
        self.tokens[child], self.computed[child] = list(self.tokens[parent]), self.computed[parent]

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def free(self, data):
        seq_id = data.draw(st.sampled_from(sorted(self.tokens)))
        self.bm.free(seq_id)
        del self.tokens[seq_id], self.computed[seq_id]
        self.freed.append(seq_id)

    @precondition(lambda self: self.freed)
    @rule(data=st.data())
    def double_free(self, data):
        with pytest.raises(ValueError, match="double free"):
            self.bm.free(data.draw(st.sampled_from(self.freed)))

    @invariant()
    def ref_counts_match_tables(self):
        counts = [0] * self.bm.num_blocks
        for seq_id in self.tokens:
            table = self.bm.block_table(seq_id)
            assert len(set(table)) == len(table), f"a block appears twice in one table: {table}"
            for b in table:
                counts[b] += 1
        assert counts == self.bm.ref_counts
        free = set(self.bm.free_block_ids) | set(self.bm.evictable)
        assert len(free) == len(self.bm.free_block_ids) + len(self.bm.evictable), "a block is on both free lists"
        assert free == {b for b in range(self.bm.num_blocks) if counts[b] == 0}
        assert self.bm.num_free_blocks == counts.count(0)

    @invariant()
    def hash_chain_covers_exactly_the_written_full_blocks(self):
        for seq_id, done in self.computed.items():  # the manager's only notion of progress, kept by the sequence
            assert len(self.bm.seq_hashes[seq_id]) == done // self.bm.block_size

    @invariant()
    def cached_kv_is_the_right_content(self):
        bs = self.bm.block_size
        for seq_id, tokens in self.tokens.items():
            done = self.computed[seq_id]
            for p, slot in zip(range(done), self.bm.slot_mapping(seq_id, 0, done)):
                assert self.pool.get(slot) == tuple(tokens[: p + 1]), f"seq {seq_id} position {p} has wrong K/V"
        for h, b in self.bm.hash_to_block.items():  # a cached block holds the prefix its tokens claim
            assert self.bm.block_hashes[b] == h
            assert tuple(self.pool[b * bs + off][-1] for off in range(bs)) == self.bm.block_tokens[b]

    def teardown(self):
        for seq_id in list(self.tokens):
            self.bm.free(seq_id)
        assert all(r == 0 for r in self.bm.ref_counts)
        assert self.bm.num_free_blocks == self.bm.num_blocks and self.bm.num_used_blocks == 0


BlockManagerMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestBlockManagerMachine = BlockManagerMachine.TestCase
