"""Chapter 4 checks (paged attention), used by solutions/04_paged_attention.ipynb.

Each check runs fixed cases and fresh random ones (``ex.rng``, ``ex.randn``, ``ex.randint``): lengths at block
boundaries (k * BS - 1, k * BS, k * BS + 1), scattered block tables with block 0 in use and random padding, pools
that run out, shared blocks freed in any order, hash chains with repeated blocks, caches with an evicted block in
the middle of a prefix, scores far beyond fp16's range. Every check has plausible wrong answers in
tests/answers/ch04_paged_attention.py that it must reject, on every seed.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Callable
from typing import Any

import torch

from minillm.grading.framework import (
    Exercise,
    assert_close,
    assert_equal,
    assert_shape,
    call_kernel,
    exercise,
    generator,
    randn,
    triton_device,
)

__all__ = [  # the checks, re-exported by minillm.grading
    "check_block_allocator",
    "check_slot_mapping",
    "check_paged_attention_gather",
    "check_block_hashes",
    "check_cached_prefix_blocks",
    "check_paged_scores_kernel",
]

BLOCK_SIZES = (1, 2, 4, 8, 16)  # BlockManager and the kernels take powers of two


def _raises(fn: Callable, *args: Any) -> Exception | None:
    """The exception ``fn(*args)`` raised (None if it returned); NotImplementedError goes through to the stub message."""
    try:
        fn(*args)
    except NotImplementedError:
        raise
    except Exception as e:  # the learner may raise any error type here; the check only needs *an* error
        return e
    return None


def _near_block_boundary(rng: random.Random, block_size: int, max_blocks: int, low: int = 1) -> int:
    """A length k * BS - 1, k * BS or k * BS + 1 (k <= max_blocks) in [low, max_blocks * BS], sometimes any length."""
    top = max_blocks * block_size
    if rng.random() < 0.25:
        return rng.randint(low, top)
    near = {k * block_size + d for k in range(max_blocks + 1) for d in (-1, 0, 1)}
    return rng.choice(sorted(n for n in near if low <= n <= top))


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

    def random_workload(rng: random.Random, num_blocks: int, num_ops: int):
        # Random operations against a model of what must hold: counts, no block handed out twice, a full pool
        # raises, a double free raises ValueError and changes nothing.
        alloc, refs, log = cls(num_blocks), {}, []
        for step in range(num_ops):
            r = rng.random()
            if r < 0.35:
                if len(refs) == num_blocks:
                    log.append("allocate() on a full pool")
                    assert _raises(alloc.allocate) is not None, (
                        f"operation {step}: all {num_blocks} blocks are in use, yet allocate() returned a block "
                        f"(operations so far: {log[-8:]})"
                    )
                else:
                    block = alloc.allocate()
                    log.append(f"allocate() -> {block}")
                    assert block not in refs, f"operation {step}: allocate() returned block {block}, which is in use"
                    assert 0 <= block < num_blocks, (
                        f"operation {step}: allocate() returned {block}, outside [0, {num_blocks})")
                    refs[block] = 1
            elif r < 0.9 and refs:
                block = rng.choice(sorted(refs))
                if r < 0.55:
                    alloc.share(block)
                    log.append(f"share({block})")
                    refs[block] += 1
                else:
                    alloc.free(block)
                    log.append(f"free({block})")
                    refs[block] -= 1
                    if refs[block] == 0:
                        del refs[block]
            elif len(refs) < num_blocks:  # a double free (or a free of a block never allocated)
                block = rng.choice([b for b in range(num_blocks) if b not in refs])
                log.append(f"free({block}), not allocated")
                err = _raises(alloc.free, block)
                assert isinstance(err, ValueError), (
                    f"operation {step}: block {block} is not allocated, so free({block}) must raise ValueError, got "
                    f"{err!r} (operations so far: {log[-8:]})"
                )
            assert_equal(alloc.num_free_blocks, num_blocks - len(refs),
                         what=f"num_free_blocks of a pool of {num_blocks} after {log[-8:]}")

    def counts_return_to_zero():
        # Allocate some blocks, share them (block 0 of them at least twice), then free every reference in a random
        # order: the whole pool must come back, each block exactly once.
        rng = ex.rng
        num_blocks = rng.randint(2, 10)
        alloc = cls(num_blocks)
        held = [alloc.allocate() for _ in range(rng.randint(1, num_blocks))]
        references = list(held) + [held[0], held[0]]
        alloc.share(held[0])
        alloc.share(held[0])
        for _ in range(rng.randint(0, 12)):
            block = rng.choice(held)
            alloc.share(block)
            references.append(block)
        rng.shuffle(references)
        remaining = {b: references.count(b) for b in held}
        for block in references:
            alloc.free(block)
            remaining[block] -= 1
            in_use = sum(1 for n in remaining.values() if n)
            assert_equal(alloc.num_free_blocks, num_blocks - in_use,
                         what=f"num_free_blocks after free({block}), references left {remaining}")
        again = [alloc.allocate() for _ in range(num_blocks)]
        assert_equal(sorted(again), list(range(num_blocks)),
                     what=f"blocks allocated from a pool of {num_blocks} after every reference was freed")
        assert _raises(alloc.allocate) is not None, "allocate() on a full pool must raise, it returned a block"

    with exercise("4.1", "a block allocator with reference counts") as ex:
        ex.check("hands out every block once, then raises", fresh_pool)
        ex.check("a freed block can be allocated again", free_and_reuse)
        ex.check("a shared block is freed only when its last reference goes", shared_block_stays)
        ex.check("a double free raises ValueError", double_free)
        ex.check("300 random allocate/share/free operations keep the counts right",
                 lambda: random_workload(random.Random(40), 8, 300))
        ex.check("random pool sizes and operations: a full pool raises, double frees raise, counts stay right",
                 lambda: [random_workload(ex.rng, ex.rng.randint(1, 12), 120) for _ in range(3)])
        ex.check("freeing every reference of shared blocks, in random order, returns the whole pool",
                 counts_return_to_zero)


def check_slot_mapping(fn: Callable) -> None:
    """Exercise 4.2. `fn(block_table, start, end, block_size) -> list[int]`: flat pool slots of positions [start, end).

    Position p lives in block ``block_table[p // block_size]`` at offset ``p % block_size``, i.e. in slot
    ``block_table[p // block_size] * block_size + p % block_size`` of the (NB * BS) flat pool.
    """

    def compare(table, start, end, bs):
        got = fn(list(table), start, end, bs)
        assert_equal([int(s) for s in got], slot_mapping_ref(table, start, end, bs),
                     what=f"slots of positions [{start}, {end}) with block_size={bs}, block_table={table}")
        return [int(s) for s in got]

    def case(seed, bs, num_blocks, start, end):
        compare(torch.randperm(64, generator=generator(seed))[:num_blocks].tolist(), start, end, bs)

    def slots_are_in_table_blocks():
        table, bs = [9, 3, 17, 0], 8
        slots = [int(s) for s in fn(table, 0, 30, bs)]
        assert_equal(len(set(slots)), 30, what="number of distinct slots for 30 positions")
        assert_equal(sorted({s // bs for s in slots}), sorted(table), what="blocks the slots fall in")

    def random_table(rng):
        bs = rng.choice(BLOCK_SIZES)
        num_blocks = rng.randint(1, max(2, 40 // bs))
        return rng.sample(range(80), num_blocks), bs  # scattered, block 0 possible

    def random_ranges():
        rng = ex.rng
        for _ in range(12):
            table, bs = random_table(rng)
            a = _near_block_boundary(rng, bs, len(table), low=0)
            b = _near_block_boundary(rng, bs, len(table), low=0)
            compare(table, min(a, b), max(a, b), bs)

    def chunks_concatenate():
        # A prefill cut into chunks writes the same slots as one pass; every slot is in its own table block.
        rng = ex.rng
        for _ in range(4):
            table, bs = random_table(rng)
            cuts = sorted(_near_block_boundary(rng, bs, len(table), low=0) for _ in range(3))
            whole = [int(s) for s in fn(list(table), cuts[0], cuts[2], bs)]
            parts = [int(s) for s in fn(list(table), cuts[0], cuts[1], bs)] + [
                int(s) for s in fn(list(table), cuts[1], cuts[2], bs)]
            assert_equal(parts, whole, what=f"slots of [{cuts[0]}, {cuts[1]}) + [{cuts[1]}, {cuts[2]}) vs "
                                            f"[{cuts[0]}, {cuts[2]}), block_size={bs}, block_table={table}")
            for p, s in zip(range(cuts[0], cuts[2]), whole):
                assert (s // bs, s % bs) == (table[p // bs], p % bs), (
                    f"position {p} (block_size={bs}, block_table={table}) went to slot {s}: block {s // bs} offset "
                    f"{s % bs}, expected block {table[p // bs]} offset {p % bs}"
                )

    with exercise("4.2", "slot mapping from a block table") as ex:
        ex.check("a whole prompt, block_size 4", lambda: case(50, 4, 5, 0, 18))
        ex.check("a chunk starting mid-block, block_size 16", lambda: case(51, 16, 6, 21, 90))
        ex.check("one decode position at a block boundary", lambda: case(52, 16, 3, 32, 33))
        ex.check("block_size 1 (one token per block)", lambda: case(53, 1, 9, 2, 9))
        ex.check("an empty range gives no slots", lambda: case(54, 8, 2, 5, 5))
        ex.check("30 positions land in 30 distinct slots of the table's blocks", slots_are_in_table_blocks)
        ex.check("random tables and ranges that start and end at block boundaries (k*BS - 1, k*BS, k*BS + 1)",
                 random_ranges)
        ex.check("random chunks: slots of [a, b) + [b, c) are the slots of [a, c), each in its table block",
                 chunks_concatenate)


def slot_mapping_ref(block_table: list[int], start: int, end: int, block_size: int) -> list[int]:
    """Slots of positions [start, end) by minillm's own BlockManager, for an arbitrary block table."""
    from minillm.kvcache.blocks import BlockManager

    bm = BlockManager(max(block_table) + 1, block_size, enable_prefix_caching=False)
    bm.tables[0] = list(block_table)  # the manager's own addressing, for this table
    return bm.slot_mapping(0, start, end)


def _paged_batch(ex: Exercise, B: int, H: int, Hkv: int, D: int, BS: int, lens: list[int], num_pad_columns: int,
                 dtype: torch.dtype, extreme: bool) -> tuple[torch.Tensor, ...]:
    """Random decode inputs: scattered tables (block 0 in use), random padding ids, garbage in every unused slot.

    With ``extreme``, every score is an exact integer multiple of 1/4 of magnitude ~24000 (D = 16): the query heads of
    sequence b point along +-60 u and its keys along 100 u (+ small integer noise), with the sign alternating across
    (sequence, head), so some heads have all their scores hugely positive and some hugely negative.
    """
    rng = ex.rng
    needed = [-(-n // BS) for n in lens]
    num_blocks = sum(needed) + rng.randint(1, 3)  # spare blocks nobody uses: garbage
    order = rng.sample(range(num_blocks), num_blocks)
    used = order[: sum(needed)]
    if 0 not in used:  # block 0 is an ordinary block: a table entry 0 does not mean "padding"
        used[rng.randrange(len(used))] = 0
    max_blocks = max(needed) + num_pad_columns
    tables = torch.tensor([[rng.randrange(num_blocks) for _ in range(max_blocks)] for _ in range(B)], dtype=torch.int32)
    valid = torch.zeros(num_blocks, BS, dtype=torch.bool)  # slots holding a token of some sequence
    owner = torch.zeros(num_blocks, dtype=torch.long)  # the sequence a block belongs to (0 for unused ones)
    first = 0
    for b, n in enumerate(lens):
        blocks = used[first : first + needed[b]]
        first += needed[b]
        tables[b, : needed[b]] = torch.tensor(blocks, dtype=torch.int32)
        owner[blocks] = b
        for p in range(n):
            valid[blocks[p // BS], p % BS] = True
    if extreme:
        assert D == 16, "the extreme case relies on scale = 1/4 (exact) and on |q . k| < 2**24"
        u = ex.randint(0, 2, B, Hkv, D).float() * 2 - 1  # +-1 directions
        k = 100 * u[owner][:, None] + ex.randint(-3, 4, num_blocks, BS, Hkv, D).float()  # (NB, BS, Hkv, D)
        sign = torch.tensor([[(-1.0) ** (b + h) for h in range(H)] for b in range(B)])
        q = 60 * sign[:, :, None] * u.repeat_interleave(H // Hkv, dim=1)  # (B, H, D)
        garbage_k = ex.randint(-1000, 1001, num_blocks, BS, Hkv, D).float()
    else:
        q, k = ex.randn(B, H, D), ex.randn(num_blocks, BS, Hkv, D)
        garbage_k = 3 * ex.randn(num_blocks, BS, Hkv, D)
    v, garbage_v = ex.randn(num_blocks, BS, Hkv, D), 100 * ex.randn(num_blocks, BS, Hkv, D)
    unused = ~valid[:, :, None, None]
    k_cache, v_cache = torch.where(unused, garbage_k, k), torch.where(unused, garbage_v, v)
    return (q.to(dtype), k_cache.to(dtype), v_cache.to(dtype), tables, torch.tensor(lens, dtype=torch.int32))


def check_paged_attention_gather(fn: Callable) -> None:
    """Exercise 4.3. `fn(q, k_cache, v_cache, block_tables, context_lens, scale=None) -> o`: decode by gathering.

    q (B, H, D); k_cache, v_cache (NB, BS, Hkv, D); block_tables (B, max_blocks) int32, padded with any valid block id;
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

    def compare(args, scale=None, atol=1e-5, what="output"):
        q, k_cache, _, tables, lens = args
        expected = paged_decode_attention_ref(*args, scale=scale)
        got = fn(*args) if scale is None else fn(*args, scale=scale)
        shapes = (f"B={q.shape[0]}, H={q.shape[1]}, Hkv={k_cache.shape[2]}, D={q.shape[2]}, BS={k_cache.shape[1]}, "
                  f"{q.dtype}, context_lens={lens.tolist()}, block_tables={tables.tolist()}, scale={scale}")
        assert_close(got, expected, atol=atol, rtol=atol, what=f"{what} ({shapes})")

    def case(B, H, Hkv, D, BS, lens, seed, dtype=torch.float32, scale=None, atol=1e-5):
        compare(inputs(B, H, Hkv, D, BS, lens, seed, dtype), scale, atol)

    def ignores_slots_past_the_end():
        q, k_cache, v_cache, tables, lens = inputs(2, 4, 2, 16, 8, [5, 11], seed=66)
        before = fn(q, k_cache, v_cache, tables, lens)
        k2, v2 = k_cache.clone(), v_cache.clone()
        k2[int(tables[0, 0]), 5:], v2[int(tables[0, 0]), 5:] = 30.0, -30.0  # the unused tail of sequence 0's only block
        k2[0], v2[0] = 30.0, -30.0  # the padding block
        assert_close(fn(q, k2, v2, tables, lens), before, what="output after changing slots past context_len")

    def random_batches():
        rng = ex.rng
        for _ in range(2):
            B, Hkv, G = rng.randint(1, 4), rng.choice([1, 2]), rng.choice([1, 2, 3])
            BS = rng.choice(BLOCK_SIZES)
            lens = [_near_block_boundary(rng, BS, max(1, 40 // BS)) for _ in range(B)]
            args = _paged_batch(ex, B, Hkv * G, Hkv, rng.choice([8, 16, 32]), BS, lens, rng.randint(0, 1),
                                torch.float32, extreme=False)
            compare(args, scale=rng.choice([None, round(rng.uniform(0.05, 0.5), 3)]))

    def extreme_scores(dtype, atol):
        rng = ex.rng
        B, Hkv, G, BS = rng.randint(2, 4), rng.choice([1, 2]), rng.choice([1, 2, 3]), rng.choice(BLOCK_SIZES)
        lens = [_near_block_boundary(rng, BS, max(1, 24 // BS)) for _ in range(B)]
        args = _paged_batch(ex, B, Hkv * G, Hkv, 16, BS, lens, 1, dtype, extreme=True)
        compare(args, atol=atol, what="output with scores of about +-24000, all exact in fp32")

    with exercise("4.3", "paged attention by gathering") as ex:
        ex.check("one sequence, full blocks, H = Hkv", lambda: case(1, 2, 2, 16, 4, [16], seed=60))
        ex.check("scattered blocks, odd lengths, GQA (H = 6, Hkv = 2)",
                 lambda: case(3, 6, 2, 16, 4, [13, 1, 30], seed=61))
        ex.check("block size 16, a one-token context", lambda: case(2, 4, 1, 32, 16, [1, 47], seed=62))
        ex.check("slots past context_len (and padding blocks) are never attended", ignores_slots_past_the_end)
        ex.check("an explicit scale", lambda: case(2, 4, 2, 16, 4, [9, 14], seed=63, scale=0.5))
        ex.check("fp16 in, fp16 out", lambda: case(2, 4, 2, 16, 8, [7, 20], seed=64, dtype=torch.float16, atol=2e-3))
        ex.check("random batches: lengths at block boundaries, block 0 in use, random padding, garbage past the end",
                 random_batches)
        ex.check("random extreme scores (+-24000, fp32): no overflow, masked slots get exactly nothing",
                 lambda: extreme_scores(torch.float32, 1e-5))
        ex.check("random extreme scores in fp16 inputs (q . k beyond fp16's 65504): compute in fp32",
                 lambda: extreme_scores(torch.float16, 2e-3))


def _manager_hashes(token_ids: list[int], block_size: int) -> list[int]:
    from minillm.kvcache.blocks import BlockManager

    bm = BlockManager(-(-len(token_ids) // block_size) + 1, block_size)
    bm.allocate_prompt(0, token_ids)
    bm.ensure_capacity(0, len(token_ids))
    bm.commit(0, token_ids, len(token_ids))
    return list(bm.seq_hashes[0])


def _tokens_with_repeated_blocks(rng: random.Random, length: int, block_size: int, vocab: int = 4) -> list[int]:
    """`length` tokens whose full blocks are drawn from two patterns (so blocks repeat) plus a random tail."""
    patterns = [[rng.randrange(vocab) for _ in range(block_size)] for _ in range(2)]
    ids = [t for _ in range(length // block_size) for t in rng.choice(patterns)]
    return ids + [rng.randrange(vocab) for _ in range(length - len(ids))]


def check_block_hashes(fn: Callable) -> None:
    """Exercise 4.4. `fn(token_ids, block_size) -> list[int]`: the prefix hash chain of a token sequence.

    One hash per *full* block: ``h_i = hash((h_{i-1}, tuple(block i's token ids)))`` with ``h_{-1} = None``, the
    chain ``minillm.kvcache.blocks.BlockManager`` keys its prefix cache with.
    """
    rng = generator(70)
    tokens = torch.randint(0, 49152, (37,), generator=rng).tolist()

    def case(ids, bs):
        assert_equal(list(fn(list(ids), bs)), _manager_hashes(list(ids), bs),
                     what=f"hashes of {len(ids)} tokens with block_size={bs}" + (f": {ids}" if len(ids) <= 40 else ""))

    def chain_names_the_prefix():
        other = [tokens[0] + 1] + tokens[1:]  # differs only in the first token
        a, b = fn(list(tokens), 4), fn(other, 4)
        assert all(x != y for x, y in zip(a, b)), (
            "changing token 0 must change every block's hash (each hash names the whole prefix), but blocks "
            f"{[i for i, (x, y) in enumerate(zip(a, b)) if x == y]} kept theirs"
        )

    def random_lengths():
        for _ in range(8):
            bs = ex.rng.choice(BLOCK_SIZES)
            n = _near_block_boundary(ex.rng, bs, max(1, 40 // bs), low=0)
            case(_tokens_with_repeated_blocks(ex.rng, n, bs), bs)

    def repeated_blocks():
        # The same block three times, then a tail: three different hashes (each names a longer prefix), and the
        # hashes of a prefix are the first hashes of the whole.
        rng = ex.rng
        bs = rng.choice(BLOCK_SIZES[1:])
        block = [rng.randrange(1000) for _ in range(bs)]
        ids = block * 3 + [rng.randrange(1000) for _ in range(rng.randint(0, bs - 1))]
        case(ids, bs)
        hashes = list(fn(list(ids), bs))
        assert len(set(hashes)) == 3, f"the same block at depths 0, 1, 2 must get 3 different hashes, got {hashes}"
        cut = _near_block_boundary(rng, bs, 3, low=0)
        assert_equal(list(fn(ids[:cut], bs)), hashes[: cut // bs],
                     what=f"hashes of the first {cut} tokens vs the first {cut // bs} hashes of all {len(ids)}")

    with exercise("4.4", "the prefix hash chain") as ex:
        ex.check("37 tokens, block_size 4: 9 full blocks", lambda: case(tokens, 4))
        ex.check("block_size 16", lambda: case(tokens, 16))
        ex.check("fewer tokens than a block: no hash", lambda: case(tokens[:3], 4))
        ex.check("a length that is a multiple of the block size", lambda: case(tokens[:32], 8))
        ex.check("a block's hash depends on every token before it", chain_names_the_prefix)
        ex.check("random lengths at block boundaries (0, k*BS - 1, k*BS, k*BS + 1), blocks that repeat",
                 random_lengths)
        ex.check("one block repeated 3 times: 3 different hashes; a prefix's hashes start the whole's",
                 repeated_blocks)


def _serve(bm: Any, seq_id: int, token_ids: list[int]) -> None:
    """Run a prompt through the manager (its full blocks enter the prefix cache), then free it."""
    bm.allocate_prompt(seq_id, token_ids)
    bm.ensure_capacity(seq_id, len(token_ids))
    bm.commit(seq_id, token_ids, len(token_ids))
    bm.free(seq_id)


def _evict(bm: Any, block_id: int) -> None:
    """Evict one cached, unreferenced block, as the manager does when it needs a fresh block."""
    assert bm.ref_counts[block_id] == 0, f"block {block_id} is in use"
    del bm.hash_to_block[bm.block_hashes[block_id]]
    bm.block_hashes[block_id] = bm.block_tokens[block_id] = None
    del bm.evictable[block_id]
    bm.free_block_ids.append(block_id)


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

    def served_manager(scattered=False):
        """A manager that served `first` and `exact`, then freed both (their full blocks stay cached)."""
        bm = BlockManager(32, bs)
        if scattered:  # hand out blocks in a scrambled order, as a pool does after a while
            bm.free_block_ids = deque(torch.randperm(32, generator=generator(81)).tolist())
        for seq_id, ids in ((0, first), (1, exact)):
            _serve(bm, seq_id, ids)
        return bm

    def compare(bm, prompt, block_size, what):
        cache = dict(bm.hash_to_block)
        got = [int(b) for b in fn(list(prompt), block_size, cache)]
        bm.allocate_prompt(99, list(prompt))
        expected = bm.block_table(99)
        bm.free(99)
        assert_equal(got, expected, what=f"{what} (block_size={block_size}, {len(prompt)} tokens)")

    def case(prompt, what, scattered=False):
        compare(served_manager(scattered), prompt, bs, what)

    def random_prompts():
        # A pool just big enough that serving evicts older cached blocks; prompts share a system prompt, blocks repeat.
        rng = ex.rng
        block_size = rng.choice(BLOCK_SIZES)
        max_blocks = max(3, 32 // block_size)
        system = _tokens_with_repeated_blocks(rng, _near_block_boundary(rng, block_size, max_blocks // 2), block_size)
        prompts = [system + _tokens_with_repeated_blocks(rng, rng.randint(1, max_blocks // 2 * block_size), block_size)
                   for _ in range(3)]
        bm = BlockManager(max(-(-len(p) // block_size) for p in prompts) + rng.randint(0, 4), block_size)
        bm.free_block_ids = deque(rng.sample(range(bm.num_blocks), bm.num_blocks))
        for seq_id, p in enumerate(prompts):
            _serve(bm, seq_id, p)
        # The last prompt served is still wholly cached: ask for its full blocks exactly, then plus a partial block.
        whole = prompts[-1][: len(prompts[-1]) // block_size * block_size]
        queries = [whole, whole + [rng.randrange(4) for _ in range(rng.randint(1, block_size))]] if whole else []
        for _ in range(6 - len(queries)):
            base = rng.choice(prompts)
            cut = _near_block_boundary(rng, block_size, -(-len(base) // block_size))
            prompt = base[: min(cut, len(base))] + [rng.randrange(4) for _ in range(rng.choice([0, 1, block_size]))]
            if rng.random() < 0.25:  # one token changed somewhere: the chain breaks there
                prompt[rng.randrange(len(prompt))] += 1
            queries.append(prompt)
        for prompt in queries:
            compare(bm, prompt, block_size, f"blocks reused by a random prompt {prompt}")

    def evicted_middle_block():
        # A cached prefix with one block evicted in its middle: the walk stops there, later hits do not count.
        rng = ex.rng
        block_size = rng.choice(BLOCK_SIZES[1:])
        num_full = rng.randint(3, 6)
        prompt = [rng.randrange(1000) for _ in range(num_full * block_size + rng.randint(1, block_size))]
        bm = BlockManager(num_full + 2, block_size)
        bm.free_block_ids = deque(rng.sample(range(bm.num_blocks), bm.num_blocks))
        _serve(bm, 0, prompt)
        bm.allocate_prompt(1, prompt)
        table = bm.block_table(1)
        bm.free(1)
        gone = rng.randint(1, num_full - 2)
        _evict(bm, table[gone])
        compare(bm, prompt, block_size, f"blocks reused when block {gone} of {num_full} cached ones was evicted")

    with exercise("4.5", "which cached blocks a new prompt reuses") as ex:
        ex.check("same system prompt, new question: its 2 full blocks",
                 lambda: case(system + [7, 7, 7, 7, 7], "blocks reused by system prompt + new question"))
        ex.check("a longer prompt extending a cached one: every full cached block",
                 lambda: case(first + [1, 2, 3, 4, 5, 6], "blocks reused by an extension of a cached prompt"))
        ex.check("a different first token: nothing (hashes chain through the prefix)",
                 lambda: case([system[0] + 1] + first[1:], "blocks reused after changing token 0"))
        ex.check("an identical 16-token prompt: not its last block (the last token is recomputed)",
                 lambda: case(exact, "blocks reused by an identical prompt of 4 full blocks"))
        ex.check("the 16 cached tokens + 2 more: all 4 blocks (only the block of the last token is recomputed)",
                 lambda: case(exact + [1, 2], "blocks reused by 4 cached full blocks + 2 tokens"))
        ex.check("blocks scattered over the pool come back in table order, not sorted",
                 lambda: case(first + [1], "blocks reused from a scrambled pool", scattered=True))
        ex.check("an empty cache: nothing", lambda: assert_equal(list(fn(list(first), bs, {})), [], what="blocks"))
        ex.check("random prompts sharing a system prompt, cut at block boundaries, after LRU evictions",
                 random_prompts)
        ex.check("random prefix with a block evicted in its middle: the walk stops at the miss", evicted_middle_block)


def paged_scores_ref(q: torch.Tensor, k_cache: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """Decode scores through block tables, for one KV head: what exercise 4.6's kernel computes.

    q (B, D); k_cache (NB, BS, D); block_tables (B, max_blocks) int32; context_lens (B,) int32. Returns (B, N) fp32 with
    N = max_blocks * BS: ``scale * q[b] . K_b[pos]`` for pos < context_lens[b], ``-inf`` past it, where K_b[pos] is
    ``k_cache[block_tables[b, pos // BS], pos % BS]``.
    """
    B, D = q.shape
    k = k_cache[block_tables.long()].reshape(B, -1, D)  # (B, N, D): the gather, blocks in table order
    scores = torch.einsum("bd,bnd->bn", q.float(), k.float()) * scale
    visible = torch.arange(k.shape[1], device=q.device) < context_lens[:, None].long()
    return scores.masked_fill(~visible, float("-inf"))


def check_paged_scores_kernel(fn: Callable) -> None:
    """Exercise 4.6. `fn(q, k_cache, block_tables, context_lens, scale) -> scores`: a Triton kernel reads K through
    block tables, one program per sequence; same contract as ``paged_scores_ref``.

    Runs on CUDA when available, else on the CPU in Triton's interpreter, which importing minillm switches on when
    there is no GPU (before the learner's kernel is defined). D is a power of two; shapes stay small.
    """
    from minillm.attention.paged import paged_decode_attention_ref

    device = triton_device("Exercise 4.6 (paged scores kernel)")

    def run(*args):
        return call_kernel(fn, *args)

    def views(q, pool, head, tables, lens):
        """The kernel's inputs as views into larger buffers: q one head of (B, H, D), K one head of the pool, the
        tables a corner of a wider table. A kernel must use the strides it is given; and one that reads a little past
        a table row or a block reads valid block ids and keys, not a wild address (which would crash the interpreter,
        and the notebook with it)."""
        B, M = tables.shape
        nb, BS, Hkv, D = pool.shape
        table_buf = torch.zeros(B + 1, 2 * M + 16, dtype=torch.int32)  # 0: a valid block id
        table_buf[:B, :M] = tables
        pool_buf = torch.zeros(nb + 64 // BS + 1, BS, Hkv, D)
        pool_buf[:nb] = pool
        return (q.to(device), pool_buf.to(device)[:nb, :, head], table_buf.to(device)[:B, :M],
                lens.to(device=device, dtype=torch.int32))

    def fixed(B, D, BS, lens, seed, num_heads=1, head=0):
        """Scattered tables with one spare column; K is head `head` of an (NB, BS, num_heads, D) pool."""
        nb = 24
        q = randn(B, num_heads, D, seed=seed)[:, head]
        pool = randn(nb, BS, num_heads, D, seed=seed + 1)
        perm = torch.randperm(nb, generator=generator(seed + 2)).tolist()
        max_blocks = max(-(-n // BS) for n in lens) + 1
        tables = torch.tensor([perm[b * max_blocks : (b + 1) * max_blocks] for b in range(B)], dtype=torch.int32)
        return views(q, pool, head, tables, torch.tensor(lens))

    def compare(args, scale, what):
        q, k_cache, tables, lens = args
        got = run(q, k_cache, tables, lens, scale)
        expected = paged_scores_ref(q, k_cache, tables, lens, scale)
        assert_close(got, expected, atol=1e-5, rtol=1e-5, what=(
            f"{what} (B={q.shape[0]}, D={q.shape[1]}, BS={k_cache.shape[1]}, scale={scale}, "
            f"context_lens={lens.tolist()}, block_tables={tables.tolist()})"))

    def random_batch(num_pad_columns):
        """Random inputs (block 0 in use, garbage past the end) and the V of the same head, (NB, BS, D)."""
        rng = ex.rng
        B, BS, D, Hkv = rng.randint(1, 4), rng.choice(BLOCK_SIZES), rng.choice([8, 16, 32]), rng.randint(1, 3)
        lens = [_near_block_boundary(rng, BS, max(1, 32 // BS)) for _ in range(B)]
        q, k_cache, v_cache, tables, context_lens = _paged_batch(ex, B, Hkv, Hkv, D, BS, lens, num_pad_columns,
                                                                 torch.float32, extreme=False)
        head = rng.randrange(Hkv)
        return views(q[:, head], k_cache, head, tables, context_lens), v_cache[:, :, head].to(device)

    def random_cases():
        for pad in (0, 1):
            args, _ = random_batch(pad)
            compare(args, round(ex.rng.uniform(0.1, 1.0), 3), "scores")

    def softmax_is_paged_attention():
        (q, k_cache, tables, lens), v_cache = random_batch(1)
        scale = 1 / math.sqrt(q.shape[1])
        p = torch.softmax(run(q, k_cache, tables, lens, scale), dim=-1)  # (B, N)
        v = v_cache[tables.long()].reshape(q.shape[0], -1, q.shape[1])  # (B, N, D)
        o = torch.einsum("bn,bnd->bd", p, v)
        expected = paged_decode_attention_ref(q[:, None], k_cache[:, :, None], v_cache[:, :, None], tables, lens)[:, 0]
        assert_close(o, expected, atol=1e-5, rtol=1e-5, what="softmax(your scores) @ V vs paged_decode_attention_ref")

    def shape_and_dtype():
        scores = run(*fixed(2, 16, 4, [8, 5], seed=90), 0.25)
        assert_shape(scores, (2, 12), what="scores of 2 sequences, block_tables (2, 3), BS = 4")
        assert_equal(scores.dtype, torch.float32, what="dtype of the scores")

    with exercise("4.6", "paged scores in Triton") as ex:
        ex.check("returns a (B, max_blocks * BS) float32 tensor", shape_and_dtype)
        ex.check("one sequence, full blocks", lambda: compare(fixed(1, 16, 4, [12], seed=91), 0.25, "scores"))
        ex.check("three sequences, scattered blocks, lengths not a multiple of BS: -inf past the end",
                 lambda: compare(fixed(3, 8, 4, [5, 11, 1], seed=92), 0.5, "scores"))
        ex.check("K is one head of an (NB, BS, Hkv, D) pool: the token stride is Hkv * D, not D",
                 lambda: compare(fixed(2, 16, 8, [13, 3], seed=93, num_heads=3, head=1), 0.25, "scores"))
        ex.check("random batches: lengths at block boundaries, BS from 1 to 16, block 0 in use, garbage past the end",
                 random_cases)
        ex.check("softmax of your scores times V is paged_decode_attention_ref's output (random batch)",
                 softmax_is_paged_attention)
