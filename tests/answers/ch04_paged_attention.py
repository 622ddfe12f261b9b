"""Chapter 04's graded checks against right answers and plausible wrong ones (collected by tests/test_grading.py).

A wrong answer is a mistake a learner would plausibly make, written as a small function with a comment saying what
is wrong; every check must reject each of its wrong answers and pass each right answer on every random seed. The
last test recomputes the worked example above each exercise in solutions/04_paged_attention.ipynb with the package's
reference, so the numbers a learner reads there are the reference's.
"""

import doctest
import math
import re
from collections import deque
from pathlib import Path

import pytest
import torch

from minillm import grading
from minillm._triton import HAS_TRITON, tl, triton
from minillm.attention.paged import paged_decode_attention_ref
from minillm.course import read_notebook
from minillm.grading.ch04_paged_attention import (
    _manager_hashes,
    paged_scores_ref,
    slot_mapping_ref,
)
from minillm.kvcache.blocks import BlockManager

RIGHT_ANSWERS = []
WRONG_ANSWERS = []

# --- 4.1 a block allocator ---------------------------------------------------------------------------------------


class BlockAllocatorRight:
    def __init__(self, num_blocks):
        self.free_block_ids, self.ref_counts = deque(range(num_blocks)), [0] * num_blocks

    @property
    def num_free_blocks(self):
        return len(self.free_block_ids)

    def allocate(self):
        if not self.free_block_ids:
            raise RuntimeError("out of blocks")
        block = self.free_block_ids.popleft()
        self.ref_counts[block] = 1
        return block

    def share(self, block):
        self.ref_counts[block] += 1

    def free(self, block):
        if self.ref_counts[block] == 0:
            raise ValueError(f"block {block} is not allocated")
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            self.free_block_ids.append(block)


class BlockAllocatorFreeIgnoresRefcount(BlockAllocatorRight):
    # Wrong: free() puts the block back on the free list at once, though another table still points at it.
    def free(self, block):
        if self.ref_counts[block] == 0:
            raise ValueError(f"block {block} is not allocated")
        self.ref_counts[block] = 0
        self.free_block_ids.append(block)


class BlockAllocatorNoDoubleFreeCheck(BlockAllocatorRight):
    # Wrong: never checks the count, so a double free puts a block on the free list twice.
    def free(self, block):
        self.ref_counts[block] = max(0, self.ref_counts[block] - 1)
        if self.ref_counts[block] == 0:
            self.free_block_ids.append(block)


class BlockAllocatorShareSetsTwo(BlockAllocatorRight):
    # Wrong: share() marks the block "shared" (count 2) instead of adding a reference: with a third table pointing
    # at it, the block goes back to the free list while a table still holds it.
    def share(self, block):
        self.ref_counts[block] = 2


class BlockAllocatorCountsReferences(BlockAllocatorRight):
    # Wrong: free blocks = num_blocks - (sum of reference counts): a block shared by two tables is counted twice.
    @property
    def num_free_blocks(self):
        return len(self.ref_counts) - sum(self.ref_counts)


class BlockAllocatorReservesBlockZero(BlockAllocatorRight):
    # Wrong: keeps block 0 off the free list ("0 pads the block tables"), so a pool of N hands out N - 1 blocks.
    def __init__(self, num_blocks):
        super().__init__(num_blocks)
        self.free_block_ids.popleft()


# --- 4.2 slot mapping --------------------------------------------------------------------------------------------


def slot_mapping_right(block_table, start, end, block_size):
    return [block_table[p // block_size] * block_size + p % block_size for p in range(start, end)]


def slot_mapping_block_plus_offset(block_table, start, end, block_size):
    # Wrong: adds the offset to the block id instead of to the block's first slot (block_id * block_size).
    return [block_table[p // block_size] + p % block_size for p in range(start, end)]


def slot_mapping_forgets_start(block_table, start, end, block_size):
    # Wrong: numbers the chunk's positions from 0, so a chunk that starts later overwrites the prompt's first slots.
    return [block_table[p // block_size] * block_size + p % block_size for p in range(end - start)]


def slot_mapping_contiguous_table(block_table, start, end, block_size):
    # Wrong: assumes the sequence's blocks are consecutive in the pool, starting at its first block.
    return [block_table[0] * block_size + p for p in range(start, end)]


def slot_mapping_blocks_from_start(block_table, start, end, block_size):
    # Wrong: counts blocks from the chunk's start, so a chunk starting mid-block changes block BS positions too late.
    first = start // block_size
    return [block_table[first + (p - start) // block_size] * block_size + p % block_size for p in range(start, end)]


def slot_mapping_rounds(block_table, start, end, block_size):
    # Wrong: round(p / BS) picks the next block for the second half of every block (the block index is a floor).
    return [block_table[round(p / block_size)] * block_size + p % block_size for p in range(start, end)]


# --- 4.3 paged attention by gathering ----------------------------------------------------------------------------


def _gather(q, cache, block_tables, repeat="interleave"):
    """(B, S, H, D): each sequence's K or V in table order, its KV heads repeated for the H query heads."""
    B, H, D = q.shape
    Hkv = cache.shape[2]
    x = cache[block_tables.long()].reshape(B, -1, Hkv, D)
    if repeat == "interleave":
        return x.repeat_interleave(H // Hkv, dim=2)  # query head h reads KV head h // (H // Hkv)
    return x.repeat(1, 1, H // Hkv, 1)  # query head h reads KV head h % Hkv


def _past_end(q, k, context_lens):
    return torch.arange(k.shape[1])[None, None, :] >= context_lens.long()[:, None, None]  # (B, 1, S)


def paged_gather_right(q, k_cache, v_cache, block_tables, context_lens, scale=None):
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    k, v = _gather(q, k_cache, block_tables).float(), _gather(q, v_cache, block_tables).float()
    scores = torch.einsum("bhd,bshd->bhs", q.float(), k) * scale
    probs = scores.masked_fill(_past_end(q, k, context_lens), float("-inf")).softmax(-1)
    return torch.einsum("bhs,bshd->bhd", probs, v).to(q.dtype)


def paged_gather_sorted_blocks(q, k_cache, v_cache, block_tables, context_lens, scale=None):
    # Wrong: gathers each sequence's blocks in sorted (physical) order instead of block-table (logical) order.
    tables = block_tables.clone()
    for b, n in enumerate(context_lens.tolist()):
        k = -(-n // k_cache.shape[1])
        tables[b, :k] = tables[b, :k].sort().values
    return paged_decode_attention_ref(q, k_cache, v_cache, tables, context_lens, scale)


def paged_gather_whole_blocks(q, k_cache, v_cache, block_tables, context_lens, scale=None):
    # Wrong: attends to every slot of every table entry, ignoring context_lens (the last block's tail, the padding).
    full = torch.full_like(context_lens, block_tables.shape[1] * k_cache.shape[1])
    return paged_decode_attention_ref(q, k_cache, v_cache, block_tables, full, scale)


def paged_gather_no_max_subtraction(q, k_cache, v_cache, block_tables, context_lens, scale=None):
    # Wrong: softmax by hand, exp(s) / sum(exp(s)), without subtracting the row max: large scores overflow exp to
    # inf, very negative ones underflow every exp to 0, and the output is NaN.
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    k, v = _gather(q, k_cache, block_tables).float(), _gather(q, v_cache, block_tables).float()
    e = (torch.einsum("bhd,bshd->bhs", q.float(), k) * scale).exp().masked_fill(_past_end(q, k, context_lens), 0.0)
    return torch.einsum("bhs,bshd->bhd", e / e.sum(-1, keepdim=True), v).to(q.dtype)


def paged_gather_fill_minus_1e4(q, k_cache, v_cache, block_tables, context_lens, scale=None):
    # Wrong: masks with -1e4 (BERT's trick) instead of -inf: when every real score is below -1e4, the masked slots
    # (garbage past the end) win the softmax.
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    k, v = _gather(q, k_cache, block_tables).float(), _gather(q, v_cache, block_tables).float()
    scores = torch.einsum("bhd,bshd->bhs", q.float(), k) * scale
    probs = scores.masked_fill(_past_end(q, k, context_lens), -1e4).softmax(-1)
    return torch.einsum("bhs,bshd->bhd", probs, v).to(q.dtype)


def paged_gather_in_input_dtype(q, k_cache, v_cache, block_tables, context_lens, scale=None):
    # Wrong: computes in q's dtype: in fp16, scores beyond 65504 overflow to inf and the softmax gives NaN.
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    k, v = _gather(q, k_cache, block_tables), _gather(q, v_cache, block_tables)
    scores = torch.einsum("bhd,bshd->bhs", q, k) * scale
    probs = scores.masked_fill(_past_end(q, k, context_lens), float("-inf")).softmax(-1)
    return torch.einsum("bhs,bshd->bhd", probs, v)


def paged_gather_block_zero_is_padding(q, k_cache, v_cache, block_tables, context_lens, scale=None):
    # Wrong: treats table entries equal to 0 as padding and masks them, but block 0 is an ordinary block too.
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    k, v = _gather(q, k_cache, block_tables).float(), _gather(q, v_cache, block_tables).float()
    padding = (block_tables.long() == 0).repeat_interleave(k_cache.shape[1], dim=1)[:, None, :]  # (B, 1, S)
    scores = torch.einsum("bhd,bshd->bhs", q.float(), k) * scale
    probs = scores.masked_fill(_past_end(q, k, context_lens) | padding, float("-inf")).softmax(-1)
    return torch.einsum("bhs,bshd->bhd", probs, v).to(q.dtype)


def paged_gather_gqa_repeat(q, k_cache, v_cache, block_tables, context_lens, scale=None):
    # Wrong: .repeat instead of .repeat_interleave on the head axis: query head h reads KV head h % Hkv, not h // G.
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    k, v = _gather(q, k_cache, block_tables, "repeat").float(), _gather(q, v_cache, block_tables, "repeat").float()
    scores = torch.einsum("bhd,bshd->bhs", q.float(), k) * scale
    probs = scores.masked_fill(_past_end(q, k, context_lens), float("-inf")).softmax(-1)
    return torch.einsum("bhs,bshd->bhd", probs, v).to(q.dtype)


# --- 4.4 the prefix hash chain -----------------------------------------------------------------------------------


def block_hashes_right(token_ids, block_size):
    hashes, parent = [], None
    for i in range(len(token_ids) // block_size):
        parent = hash((parent, tuple(token_ids[i * block_size : (i + 1) * block_size])))
        hashes.append(parent)
    return hashes


def block_hashes_without_parent(token_ids, block_size):
    # Wrong: hashes each block's tokens alone, so equal blocks after different prefixes get the same hash.
    return [hash((None, tuple(token_ids[i * block_size : (i + 1) * block_size])))
            for i in range(len(token_ids) // block_size)]


def block_hashes_memo_by_tokens(token_ids, block_size):
    # Wrong: remembers each block's hash by its tokens "to save work", so a block that repeats later in the prompt
    # gets the hash of its first occurrence, which names a different prefix.
    seen, hashes, parent = {}, [], None
    for i in range(len(token_ids) // block_size):
        tokens = tuple(token_ids[i * block_size : (i + 1) * block_size])
        if tokens not in seen:
            seen[tokens] = hash((parent, tokens))
        parent = seen[tokens]
        hashes.append(parent)
    return hashes


def block_hashes_partial_block(token_ids, block_size):
    # Wrong: ceil instead of floor: the partly filled last block gets a hash (and could be reused half-written).
    hashes, parent = [], None
    for i in range(-(-len(token_ids) // block_size)):
        parent = hash((parent, tuple(token_ids[i * block_size : (i + 1) * block_size])))
        hashes.append(parent)
    return hashes


def block_hashes_misses_last_block(token_ids, block_size):
    # Wrong: range(0, len - BS, BS) stops one block early when the length is a multiple of the block size.
    hashes, parent = [], None
    for start in range(0, len(token_ids) - block_size, block_size):
        parent = hash((parent, tuple(token_ids[start : start + block_size])))
        hashes.append(parent)
    return hashes


# --- 4.5 cached prefix blocks ------------------------------------------------------------------------------------


def cached_prefix_blocks_right(token_ids, block_size, hash_to_block):
    blocks = []
    for h in block_hashes_right(token_ids[: (len(token_ids) - 1) // block_size * block_size], block_size):
        if h not in hash_to_block:
            break
        blocks.append(hash_to_block[h])
    return blocks


def cached_prefix_blocks_with_last_token(token_ids, block_size, hash_to_block):
    # Wrong: also reuses the block holding the last prompt token, which must be computed for its logits.
    blocks = []
    for h in block_hashes_right(token_ids, block_size):
        if h not in hash_to_block:
            break
        blocks.append(hash_to_block[h])
    return blocks


def cached_prefix_blocks_skips_misses(token_ids, block_size, hash_to_block):
    # Wrong: `continue` instead of `break`: keeps collecting cached blocks after a miss, leaving a hole in the table.
    hashes = block_hashes_right(token_ids[: (len(token_ids) - 1) // block_size * block_size], block_size)
    return [hash_to_block[h] for h in hashes if h in hash_to_block]


def cached_prefix_blocks_drops_a_block(token_ids, block_size, hash_to_block):
    # Wrong: "all full blocks but the last": len // BS - 1 is one too few when the last block is partly filled.
    blocks = []
    for h in block_hashes_right(token_ids, block_size)[: len(token_ids) // block_size - 1]:
        if h not in hash_to_block:
            break
        blocks.append(hash_to_block[h])
    return blocks


def cached_prefix_blocks_as_a_set(token_ids, block_size, hash_to_block):
    # Wrong: collects the blocks in a set (no duplicates), which loses their order in the block table.
    blocks = set()
    for h in block_hashes_right(token_ids[: (len(token_ids) - 1) // block_size * block_size], block_size):
        if h not in hash_to_block:
            break
        blocks.add(hash_to_block[h])
    return sorted(blocks)


RIGHT_ANSWERS += [
    pytest.param(grading.check_block_allocator, BlockAllocatorRight, id="4.1-allocator"),
    pytest.param(grading.check_slot_mapping, slot_mapping_right, id="4.2-slot-mapping"),
    pytest.param(grading.check_paged_attention_gather, paged_decode_attention_ref, id="4.3-reference"),
    pytest.param(grading.check_paged_attention_gather, paged_gather_right, id="4.3-gather"),
    pytest.param(grading.check_block_hashes, block_hashes_right, id="4.4-hash-chain"),
    pytest.param(grading.check_cached_prefix_blocks, cached_prefix_blocks_right, id="4.5-cached-prefix"),
]
WRONG_ANSWERS += [
    pytest.param(grading.check_block_allocator, BlockAllocatorFreeIgnoresRefcount, id="4.1-free-ignores-refcount"),
    pytest.param(grading.check_block_allocator, BlockAllocatorNoDoubleFreeCheck, id="4.1-no-double-free-check"),
    pytest.param(grading.check_block_allocator, BlockAllocatorShareSetsTwo, id="4.1-share-sets-two"),
    pytest.param(grading.check_block_allocator, BlockAllocatorCountsReferences, id="4.1-free-counts-references"),
    pytest.param(grading.check_block_allocator, BlockAllocatorReservesBlockZero, id="4.1-reserves-block-zero"),
    pytest.param(grading.check_slot_mapping, slot_mapping_block_plus_offset, id="4.2-block-plus-offset"),
    pytest.param(grading.check_slot_mapping, slot_mapping_forgets_start, id="4.2-forgets-start"),
    pytest.param(grading.check_slot_mapping, slot_mapping_contiguous_table, id="4.2-contiguous-table"),
    pytest.param(grading.check_slot_mapping, slot_mapping_blocks_from_start, id="4.2-blocks-from-start"),
    pytest.param(grading.check_slot_mapping, slot_mapping_rounds, id="4.2-rounds"),
    pytest.param(grading.check_paged_attention_gather, paged_gather_sorted_blocks, id="4.3-sorted-blocks"),
    pytest.param(grading.check_paged_attention_gather, paged_gather_whole_blocks, id="4.3-ignores-context-lens"),
    pytest.param(grading.check_paged_attention_gather, paged_gather_no_max_subtraction, id="4.3-no-max-subtraction"),
    pytest.param(grading.check_paged_attention_gather, paged_gather_fill_minus_1e4, id="4.3-fill-minus-1e4"),
    pytest.param(grading.check_paged_attention_gather, paged_gather_in_input_dtype, id="4.3-fp16-compute"),
    pytest.param(grading.check_paged_attention_gather, paged_gather_block_zero_is_padding, id="4.3-block-0-is-padding"),
    pytest.param(grading.check_paged_attention_gather, paged_gather_gqa_repeat, id="4.3-gqa-repeat"),
    pytest.param(grading.check_block_hashes, block_hashes_without_parent, id="4.4-no-parent"),
    pytest.param(grading.check_block_hashes, block_hashes_memo_by_tokens, id="4.4-memo-by-tokens"),
    pytest.param(grading.check_block_hashes, block_hashes_partial_block, id="4.4-partial-block"),
    pytest.param(grading.check_block_hashes, block_hashes_misses_last_block, id="4.4-misses-last-block"),
    pytest.param(grading.check_cached_prefix_blocks, cached_prefix_blocks_with_last_token, id="4.5-reuses-last-block"),
    pytest.param(grading.check_cached_prefix_blocks, cached_prefix_blocks_skips_misses, id="4.5-skips-misses"),
    pytest.param(grading.check_cached_prefix_blocks, cached_prefix_blocks_drops_a_block, id="4.5-drops-a-block"),
    pytest.param(grading.check_cached_prefix_blocks, cached_prefix_blocks_as_a_set, id="4.5-sorted-set"),
]

# --- 4.6 a paged-scores kernel in Triton -------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _paged_scores_kernel(
        # Pointers
        q_ptr, k_cache_ptr, block_tables_ptr, context_lens_ptr, out_ptr,
        # Sizes
        N,
        # Strides
        stride_qb, stride_kb, stride_kt, stride_btb, stride_ob,
        # Meta-parameters
        scale, BS: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
    ):
        b = tl.program_id(0)
        context_len = tl.load(context_lens_ptr + b)
        pos = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D)
        visible = pos < context_len
        block = tl.load(block_tables_ptr + b * stride_btb + pos // BS, mask=visible, other=0)
        offset = pos % BS
        k = tl.load(k_cache_ptr + block[:, None] * stride_kb + offset[:, None] * stride_kt + offs_d[None, :],
                    mask=visible[:, None], other=0.0)
        q = tl.load(q_ptr + b * stride_qb + offs_d)
        scores = tl.sum(k * q[None, :], axis=1) * scale
        tl.store(out_ptr + b * stride_ob + pos, tl.where(visible, scores, float("-inf")), mask=pos < N)

    @triton.jit
    def _paged_scores_kernel_swapped(
        q_ptr, k_cache_ptr, block_tables_ptr, context_lens_ptr, out_ptr, N,
        stride_qb, stride_kb, stride_kt, stride_btb, stride_ob,
        scale, BS: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
    ):
        # Wrong: pos % BS and pos // BS swapped: the offset picks the table entry and the block index the slot.
        b = tl.program_id(0)
        context_len = tl.load(context_lens_ptr + b)
        pos = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D)
        visible = pos < context_len
        block = tl.load(block_tables_ptr + b * stride_btb + pos % BS, mask=visible, other=0)
        offset = pos // BS
        k = tl.load(k_cache_ptr + block[:, None] * stride_kb + offset[:, None] * stride_kt + offs_d[None, :],
                    mask=visible[:, None], other=0.0)
        q = tl.load(q_ptr + b * stride_qb + offs_d)
        scores = tl.sum(k * q[None, :], axis=1) * scale
        tl.store(out_ptr + b * stride_ob + pos, tl.where(visible, scores, float("-inf")), mask=pos < N)

    @triton.jit
    def _paged_scores_kernel_zero_tail(
        q_ptr, k_cache_ptr, block_tables_ptr, context_lens_ptr, out_ptr, N,
        stride_qb, stride_kb, stride_kt, stride_btb, stride_ob,
        scale, BS: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
    ):
        # Wrong: the loads are masked, but the store is not: slots past the end get score 0 (K loaded as 0), not
        # -inf, so a softmax would give them weight.
        b = tl.program_id(0)
        context_len = tl.load(context_lens_ptr + b)
        pos = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D)
        visible = pos < context_len
        block = tl.load(block_tables_ptr + b * stride_btb + pos // BS, mask=visible, other=0)
        offset = pos % BS
        k = tl.load(k_cache_ptr + block[:, None] * stride_kb + offset[:, None] * stride_kt + offs_d[None, :],
                    mask=visible[:, None], other=0.0)
        q = tl.load(q_ptr + b * stride_qb + offs_d)
        tl.store(out_ptr + b * stride_ob + pos, tl.sum(k * q[None, :], axis=1) * scale, mask=pos < N)

    @triton.jit
    def _paged_scores_kernel_no_row_offset(
        q_ptr, k_cache_ptr, block_tables_ptr, context_lens_ptr, out_ptr, N,
        stride_qb, stride_kb, stride_kt, stride_btb, stride_ob,
        scale, BS: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
    ):
        # Wrong: forgets b * stride_btb, so every sequence follows the block table of sequence 0.
        b = tl.program_id(0)
        context_len = tl.load(context_lens_ptr + b)
        pos = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D)
        visible = pos < context_len
        block = tl.load(block_tables_ptr + pos // BS, mask=visible, other=0)
        offset = pos % BS
        k = tl.load(k_cache_ptr + block[:, None] * stride_kb + offset[:, None] * stride_kt + offs_d[None, :],
                    mask=visible[:, None], other=0.0)
        q = tl.load(q_ptr + b * stride_qb + offs_d)
        scores = tl.sum(k * q[None, :], axis=1) * scale
        tl.store(out_ptr + b * stride_ob + pos, tl.where(visible, scores, float("-inf")), mask=pos < N)

    @triton.jit
    def _paged_scores_kernel_token_stride_d(
        q_ptr, k_cache_ptr, block_tables_ptr, context_lens_ptr, out_ptr, N,
        stride_qb, stride_kb, stride_kt, stride_btb, stride_ob,
        scale, BS: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
    ):
        # Wrong: steps D elements per token (a contiguous (NB, BS, D) cache) instead of stride_kt: with KV heads
        # interleaved in the pool, it reads other heads' keys.
        b = tl.program_id(0)
        context_len = tl.load(context_lens_ptr + b)
        pos = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D)
        visible = pos < context_len
        block = tl.load(block_tables_ptr + b * stride_btb + pos // BS, mask=visible, other=0)
        offset = pos % BS
        k = tl.load(k_cache_ptr + block[:, None] * stride_kb + offset[:, None] * D + offs_d[None, :],
                    mask=visible[:, None], other=0.0)
        q = tl.load(q_ptr + b * stride_qb + offs_d)
        scores = tl.sum(k * q[None, :], axis=1) * scale
        tl.store(out_ptr + b * stride_ob + pos, tl.where(visible, scores, float("-inf")), mask=pos < N)

    def launch_paged_scores(kernel, q, k_cache, block_tables, context_lens, scale):
        """The launcher the exercise cell gives the learner, for any of the kernels above."""
        B, D = q.shape
        BS = k_cache.shape[1]
        N = block_tables.shape[1] * BS
        if q.stride(1) != 1 or k_cache.stride(2) != 1 or block_tables.stride(1) != 1:
            raise ValueError("the last dimension of q, k_cache and block_tables must be contiguous")
        if D & (D - 1):
            raise ValueError(f"head dim D={D} must be a power of two (tl.arange)")
        out = torch.empty(B, N, device=q.device, dtype=torch.float32)
        kernel[(B,)](
            q, k_cache, block_tables, context_lens, out, N,
            q.stride(0), k_cache.stride(0), k_cache.stride(1), block_tables.stride(0), out.stride(0),
            scale, BS=BS, BLOCK_N=triton.next_power_of_2(N), D=D,
        )
        return out

    def _kernel_answer(kernel):
        return lambda q, k_cache, block_tables, context_lens, scale: launch_paged_scores(
            kernel, q, k_cache, block_tables, context_lens, scale)

    RIGHT_ANSWERS += [
        pytest.param(grading.check_paged_scores_kernel, _kernel_answer(_paged_scores_kernel), id="4.6-kernel"),
    ]
    WRONG_ANSWERS += [
        pytest.param(grading.check_paged_scores_kernel, _kernel_answer(_paged_scores_kernel_swapped),
                     id="4.6-div-mod-swapped"),
        pytest.param(grading.check_paged_scores_kernel, _kernel_answer(_paged_scores_kernel_zero_tail),
                     id="4.6-zero-tail"),
        pytest.param(grading.check_paged_scores_kernel, _kernel_answer(_paged_scores_kernel_no_row_offset),
                     id="4.6-no-row-offset"),
        pytest.param(grading.check_paged_scores_kernel, _kernel_answer(_paged_scores_kernel_token_stride_d),
                     id="4.6-token-stride-d"),
    ]


# --- The worked example above each exercise ------------------------------------------------------------------------
# Each is a doctest in the markdown cell "## Exercise 4.M: ..." of the solution notebook, run here with the package's
# reference in place of the learner's function: the numbers a learner reads there are the reference's.

SOLUTION = Path(__file__).resolve().parents[2] / "solutions" / "04_paged_attention.ipynb"


class _ManagerAllocator:
    """Exercise 4.1's interface on minillm's BlockManager: each reference to a block is a one-token sequence."""

    def __init__(self, num_blocks):
        self.bm = BlockManager(num_blocks, 1, enable_prefix_caching=False)
        self.holders, self.last_holder, self.num_seqs = {}, {}, 0

    @property
    def num_free_blocks(self):
        return self.bm.num_free_blocks

    def allocate(self):
        seq_id, self.num_seqs = self.num_seqs, self.num_seqs + 1
        self.bm.allocate_prompt(seq_id, [0])
        self.bm.ensure_capacity(seq_id, 1)
        block = self.bm.block_table(seq_id)[0]
        self.holders[block] = [seq_id]
        return block

    def share(self, block):
        seq_id, self.num_seqs = self.num_seqs, self.num_seqs + 1
        self.bm.fork(self.holders[block][0], seq_id)
        self.holders[block].append(seq_id)

    def free(self, block):
        holders = self.holders.get(block) or [self.last_holder.get(block)]
        self.last_holder[block] = holders.pop()
        self.bm.free(self.last_holder[block])  # a sequence freed twice: the manager raises ValueError


class _MatchesAnyTokens:
    """Stands in for a cached block's tokens: the example's cache is given by hashes only."""

    def __eq__(self, other):
        return True

    def __ne__(self, other):
        return False


def _manager_cached_prefix(token_ids, block_size, hash_to_block):
    """The blocks BlockManager.allocate_prompt reuses for `token_ids`, its prefix cache set to `hash_to_block`."""
    bm = BlockManager(max(hash_to_block.values(), default=0) + 1, block_size)
    for h, block in hash_to_block.items():  # cached blocks that no sequence holds
        bm.hash_to_block[h], bm.block_hashes[block], bm.block_tokens[block] = block, h, _MatchesAnyTokens()
        bm.free_block_ids.remove(block)
        bm.evictable[block] = None
    bm.allocate_prompt(0, list(token_ids))
    return bm.block_table(0)


REFERENCES = {
    "BlockAllocator": _ManagerAllocator,
    "slot_mapping": slot_mapping_ref,
    "paged_attention": paged_decode_attention_ref,
    "block_hashes": _manager_hashes,
    "cached_prefix_blocks": _manager_cached_prefix,
    "paged_scores": paged_scores_ref,
}


@pytest.mark.parametrize("number", ["4.1", "4.2", "4.3", "4.4", "4.5", "4.6"])
def test_worked_examples_match_the_reference(number):
    cells = [c.source for c in read_notebook(SOLUTION).cells if c.cell_type == "markdown"]
    text = next((s for s in cells if s.startswith(f"## Exercise {number}:")), None)
    assert text is not None, f"no markdown cell starting '## Exercise {number}:' in {SOLUTION.name}"
    examples = "\n".join(re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL))  # the fenced code blocks
    test = doctest.DocTestParser().get_doctest(examples, {"torch": torch, **REFERENCES}, f"Exercise {number}", None, 0)
    assert test.examples, f"Exercise {number}'s markdown has no worked example (a >>> doctest in a python block)"
    runner = doctest.DocTestRunner(optionflags=doctest.IGNORE_EXCEPTION_DETAIL)
    report = []
    runner.run(test, out=report.append)
    assert runner.failures == 0, f"Exercise {number}'s worked example disagrees with the reference:\n" + "".join(report)
