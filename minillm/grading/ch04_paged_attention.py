"""Chapter 4 checks (paged attention), used by solutions/04_paged_attention.ipynb.

Every check has a plausible wrong answer in tests/test_grading.py that it must reject.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from minillm.grading.framework import (
    assert_close,
    assert_equal,
    exercise,
    generator,
    randn,
)


__all__ = [  # the checks, re-exported by minillm.grading
    "check_block_allocator",
    "check_slot_mapping",
    "check_paged_attention_gather",
    "check_block_hashes",
    "check_cached_prefix_blocks",
]

def _raises(fn: Callable, *args: Any) -> Exception | None:
    """The exception ``fn(*args)`` raised (None if it returned); NotImplementedError goes through to the stub message."""
    try:
        fn(*args)
    except NotImplementedError:
        raise
    except Exception as e:  # the learner may raise any error type here; the check only needs *an* error
        return e
    return None


def check_block_allocator(cls: Callable) -> None:
    """Exercise 4.1. `cls(num_blocks)`: a block allocator with a free list and reference counts.

    Methods: ``allocate() -> int`` takes a free block (reference count 1) and raises when none is left;
    ``share(block_id)`` adds a reference (a second block table points at the block); ``free(block_id)`` drops one
    reference and returns the block to the free list only when its count reaches 0, raising ``ValueError`` for a
    block that is not allocated (a double free); ``num_free_blocks`` (property) counts free blocks.
    """

    def fresh_pool():
        alloc = cls(5)
        got = [alloc.allocate() for _ in range(5)]
        assert_equal(sorted(got), [0, 1, 2, 3, 4], what="ids of 5 allocations from a pool of 5")
        assert_equal(alloc.num_free_blocks, 0, what="num_free_blocks when all are taken")
        assert _raises(alloc.allocate) is not None, "allocate() on an empty pool must raise, it returned a block"

    def free_and_reuse():
        alloc = cls(3)
        a, b = alloc.allocate(), alloc.allocate()
        alloc.free(a)
        assert_equal(alloc.num_free_blocks, 2, what="num_free_blocks after one free")
        c, d = alloc.allocate(), alloc.allocate()
        assert_equal(sorted([b, c, d]), [0, 1, 2], what="blocks held after freeing one and allocating two")

    def shared_block_stays():
        alloc = cls(2)
        a = alloc.allocate()
        alloc.share(a)  # two block tables point at a
        alloc.free(a)  # one of them lets go
        assert_equal(alloc.num_free_blocks, 1, what="num_free_blocks after freeing one of two references")
        b = alloc.allocate()
        assert b != a, f"block {a} is still referenced once, yet allocate() handed it out again"
        alloc.free(a)
        assert_equal(alloc.num_free_blocks, 1, what="num_free_blocks after the last reference is freed")

    def double_free():
        alloc = cls(3)
        a = alloc.allocate()
        alloc.free(a)
        err = _raises(alloc.free, a)
        assert isinstance(err, ValueError), f"freeing block {a} twice must raise ValueError, got {err!r}"
        err = _raises(alloc.free, 2)
        assert isinstance(err, ValueError), f"freeing never-allocated block 2 must raise ValueError, got {err!r}"

    def random_workload():
        # 300 seeded random operations against a model of what must hold: counts, no block handed out twice.
        rng = generator(40)
        alloc, refs = cls(8), {}
        for step in range(300):
            op = int(torch.randint(0, 3, (), generator=rng))
            if op == 0 and len(refs) < 8:
                block = alloc.allocate()
                assert block not in refs, f"operation {step}: allocate() returned block {block}, which is in use"
                assert 0 <= block < 8, f"operation {step}: allocate() returned {block}, outside [0, 8)"
                refs[block] = 1
            elif refs:
                block = sorted(refs)[int(torch.randint(0, len(refs), (), generator=rng))]
                if op == 1:
                    alloc.share(block)
                    refs[block] += 1
                else:
                    alloc.free(block)
                    refs[block] -= 1
                    if refs[block] == 0:
                        del refs[block]
            assert_equal(alloc.num_free_blocks, 8 - len(refs), what=f"num_free_blocks after operation {step}")

    with exercise("4.1", "a block allocator with reference counts") as ex:
        ex.check("hands out every block once, then raises", fresh_pool)
        ex.check("a freed block can be allocated again", free_and_reuse)
        ex.check("a shared block is freed only when its last reference goes", shared_block_stays)
        ex.check("a double free raises ValueError", double_free)
        ex.check("300 random allocate/share/free operations keep the counts right", random_workload)


def check_slot_mapping(fn: Callable) -> None:
    """Exercise 4.2. `fn(block_table, start, end, block_size) -> list[int]`: flat pool slots of positions [start, end).

    Position p lives in block ``block_table[p // block_size]`` at offset ``p % block_size``, i.e. in slot
    ``block_table[p // block_size] * block_size + p % block_size`` of the (NB * BS) flat pool.
    """
    from minillm.kvcache.blocks import BlockManager

    def reference(table, start, end, bs):
        bm = BlockManager(max(table) + 1, bs, enable_prefix_caching=False)
        bm.tables[0] = list(table)  # the manager's own addressing, for an arbitrary table
        return bm.slot_mapping(0, start, end)

    def case(seed, bs, num_blocks, start, end):
        table = torch.randperm(64, generator=generator(seed))[:num_blocks].tolist()
        got = fn(list(table), start, end, bs)
        assert_equal([int(s) for s in got], reference(table, start, end, bs),
                     what=f"slots of positions [{start}, {end}) with block_size={bs}, block_table={table}")

    def slots_are_in_table_blocks():
        table, bs = [9, 3, 17, 0], 8
        slots = [int(s) for s in fn(table, 0, 30, bs)]
        assert_equal(len(set(slots)), 30, what="number of distinct slots for 30 positions")
        assert_equal(sorted({s // bs for s in slots}), sorted(table), what="blocks the slots fall in")

    with exercise("4.2", "slot mapping from a block table") as ex:
        ex.check("a whole prompt, block_size 4", lambda: case(50, 4, 5, 0, 18))
        ex.check("a chunk starting mid-block, block_size 16", lambda: case(51, 16, 6, 21, 90))
        ex.check("one decode position at a block boundary", lambda: case(52, 16, 3, 32, 33))
        ex.check("block_size 1 (one token per block)", lambda: case(53, 1, 9, 2, 9))
        ex.check("an empty range gives no slots", lambda: case(54, 8, 2, 5, 5))
        ex.check("30 positions land in 30 distinct slots of the table's blocks", slots_are_in_table_blocks)


def check_paged_attention_gather(fn: Callable) -> None:
    """Exercise 4.3. `fn(q, k_cache, v_cache, block_tables, context_lens, scale=None) -> o`: decode by gathering.

    q (B, H, D); k_cache, v_cache (NB, BS, Hkv, D); block_tables (B, max_blocks) int32, padded with 0;
    context_lens (B,) int32. Returns (B, H, D) in q's dtype; same contract as
    ``minillm.attention.paged_decode_attention_ref``.
    """
    from minillm.attention.paged import paged_decode_attention_ref

    def inputs(B, H, Hkv, D, BS, lens, seed, dtype=torch.float32):
        nb = 48
        q = randn(B, H, D, seed=seed, dtype=dtype)
        k_cache, v_cache = randn(nb, BS, Hkv, D, seed=seed + 1, dtype=dtype), randn(nb, BS, Hkv, D, seed=seed + 2, dtype=dtype)
        max_blocks = max(-(-n // BS) for n in lens) + 1  # one spare column: every row is padded
        perm = torch.randperm(nb - 1, generator=generator(seed + 3)) + 1  # block 0 is the padding value
        tables = torch.zeros(B, max_blocks, dtype=torch.int32)
        used = 0
        for b, n in enumerate(lens):
            k = -(-n // BS)
            tables[b, :k] = perm[used : used + k].to(torch.int32)  # scattered, in no particular order
            used += k
        return q, k_cache, v_cache, tables, torch.tensor(lens, dtype=torch.int32)

    def case(B, H, Hkv, D, BS, lens, seed, dtype=torch.float32, scale=None, atol=1e-5):
        args = inputs(B, H, Hkv, D, BS, lens, seed, dtype)
        expected = paged_decode_attention_ref(*args, scale=scale)
        got = fn(*args) if scale is None else fn(*args, scale=scale)
        assert_close(got, expected, atol=atol, rtol=atol, what=f"output (B={B}, H={H}, Hkv={Hkv}, BS={BS}, lens={lens})")

    def ignores_slots_past_the_end():
        q, k_cache, v_cache, tables, lens = inputs(2, 4, 2, 16, 8, [5, 11], seed=66)
        before = fn(q, k_cache, v_cache, tables, lens)
        k2, v2 = k_cache.clone(), v_cache.clone()
        k2[int(tables[0, 0]), 5:], v2[int(tables[0, 0]), 5:] = 30.0, -30.0  # the unused tail of sequence 0's only block
        k2[0], v2[0] = 30.0, -30.0  # the padding block
        assert_close(fn(q, k2, v2, tables, lens), before, what="output after changing slots past context_len")

    with exercise("4.3", "paged attention by gathering") as ex:
        ex.check("one sequence, full blocks, H = Hkv", lambda: case(1, 2, 2, 16, 4, [16], seed=60))
        ex.check("scattered blocks, odd lengths, GQA (H = 6, Hkv = 2)",
                 lambda: case(3, 6, 2, 16, 4, [13, 1, 30], seed=61))
        ex.check("block size 16, a one-token context", lambda: case(2, 4, 1, 32, 16, [1, 47], seed=62))
        ex.check("slots past context_len (and padding blocks) are never attended", ignores_slots_past_the_end)
        ex.check("an explicit scale", lambda: case(2, 4, 2, 16, 4, [9, 14], seed=63, scale=0.5))
        ex.check("fp16 in, fp16 out", lambda: case(2, 4, 2, 16, 8, [7, 20], seed=64, dtype=torch.float16, atol=2e-3))


def _manager_hashes(token_ids: list[int], block_size: int) -> list[int]:
    from minillm.kvcache.blocks import BlockManager

    bm = BlockManager(-(-len(token_ids) // block_size) + 1, block_size)
    bm.allocate_prompt(0, token_ids)
    bm.ensure_capacity(0, len(token_ids))
    bm.commit(0, token_ids, len(token_ids))
    return list(bm.seq_hashes[0])


def check_block_hashes(fn: Callable) -> None:
    """Exercise 4.4. `fn(token_ids, block_size) -> list[int]`: the prefix hash chain of a token sequence.

    One hash per *full* block: ``h_i = hash((h_{i-1}, tuple(block i's token ids)))`` with ``h_{-1} = None``, the
    chain ``minillm.kvcache.blocks.BlockManager`` keys its prefix cache with.
    """
    rng = generator(70)
    tokens = torch.randint(0, 49152, (37,), generator=rng).tolist()

    def case(ids, bs):
        assert_equal(list(fn(list(ids), bs)), _manager_hashes(list(ids), bs),
                     what=f"hashes of {len(ids)} tokens with block_size={bs}")

    def chain_names_the_prefix():
        other = [tokens[0] + 1] + tokens[1:]  # differs only in the first token
        a, b = fn(list(tokens), 4), fn(other, 4)
        assert all(x != y for x, y in zip(a, b)), (
            "changing token 0 must change every block's hash (each hash names the whole prefix), but blocks "
            f"{[i for i, (x, y) in enumerate(zip(a, b)) if x == y]} kept theirs"
        )

    with exercise("4.4", "the prefix hash chain") as ex:
        ex.check("37 tokens, block_size 4: 9 full blocks", lambda: case(tokens, 4))
        ex.check("block_size 16", lambda: case(tokens, 16))
        ex.check("fewer tokens than a block: no hash", lambda: case(tokens[:3], 4))
        ex.check("a length that is a multiple of the block size", lambda: case(tokens[:32], 8))
        ex.check("a block's hash depends on every token before it", chain_names_the_prefix)


def check_cached_prefix_blocks(fn: Callable) -> None:
    """Exercise 4.5. `fn(token_ids, block_size, hash_to_block) -> list[int]`: the cached blocks a new prompt reuses.

    Walk the prompt's hash chain over its full blocks that end *before* its last token (the last token must be
    computed anyway, for its logits) and collect ``hash_to_block[h]`` until the first hash not in the cache.
    Must agree with ``BlockManager.allocate_prompt``.
    """
    from minillm.kvcache.blocks import BlockManager

    bs = 4
    rng = generator(80)
    system = torch.randint(0, 1000, (10,), generator=rng).tolist()  # 2 full blocks + 2 tokens
    first = system + torch.randint(1000, 2000, (9,), generator=rng).tolist()
    exact = list(range(5000, 5016))  # 4 full blocks, nothing else

    def served_manager():
        """A manager that served `first` and `exact`, then freed both (their full blocks stay cached)."""
        bm = BlockManager(32, bs)
        for seq_id, ids in ((0, first), (1, exact)):
            bm.allocate_prompt(seq_id, ids)
            bm.ensure_capacity(seq_id, len(ids))
            bm.commit(seq_id, ids, len(ids))
            bm.free(seq_id)
        return bm

    def case(prompt, what):
        bm = served_manager()
        cache = dict(bm.hash_to_block)
        got = [int(b) for b in fn(list(prompt), bs, cache)]
        bm.allocate_prompt(99, list(prompt))
        assert_equal(got, bm.block_table(99), what=what)

    with exercise("4.5", "which cached blocks a new prompt reuses") as ex:
        ex.check("same system prompt, new question: its 2 full blocks",
                 lambda: case(system + [7, 7, 7, 7, 7], "blocks reused by system prompt + new question"))
        ex.check("a longer prompt extending a cached one: every full cached block",
                 lambda: case(first + [1, 2, 3, 4, 5, 6], "blocks reused by an extension of a cached prompt"))
        ex.check("a different first token: nothing (hashes chain through the prefix)",
                 lambda: case([system[0] + 1] + first[1:], "blocks reused after changing token 0"))
        ex.check("an identical 16-token prompt: not its last block (the last token is recomputed)",
                 lambda: case(exact, "blocks reused by an identical prompt of 4 full blocks"))
        ex.check("an empty cache: nothing", lambda: assert_equal(list(fn(list(first), bs, {})), [], what="blocks"))
