"""Chapter 04's graded checks against right answers and plausible wrong ones (collected by tests/test_grading.py).

A wrong answer is a mistake a learner would plausibly make, written as a small function with a comment saying what
is wrong; every check must reject each of its wrong answers and pass each right answer on every random seed.
"""

from collections import deque

import pytest
import torch

from minillm import grading
from minillm.attention.paged import paged_decode_attention_ref

RIGHT_ANSWERS = []
WRONG_ANSWERS = []


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


def slot_mapping_right(block_table, start, end, block_size):
    return [block_table[p // block_size] * block_size + p % block_size for p in range(start, end)]


def slot_mapping_block_plus_offset(block_table, start, end, block_size):
    # Wrong: adds the offset to the block id instead of to the block's first slot (block_id * block_size).
    return [block_table[p // block_size] + p % block_size for p in range(start, end)]


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


RIGHT_ANSWERS += [
    pytest.param(grading.check_block_allocator, BlockAllocatorRight, id="4.1-allocator"),
    pytest.param(grading.check_slot_mapping, slot_mapping_right, id="4.2-slot-mapping"),
    pytest.param(grading.check_paged_attention_gather, paged_decode_attention_ref, id="4.3-reference"),
    pytest.param(grading.check_block_hashes, block_hashes_right, id="4.4-hash-chain"),
    pytest.param(grading.check_cached_prefix_blocks, cached_prefix_blocks_right, id="4.5-cached-prefix"),
]
WRONG_ANSWERS += [
    pytest.param(grading.check_block_allocator, BlockAllocatorFreeIgnoresRefcount, id="4.1-free-ignores-refcount"),
    pytest.param(grading.check_block_allocator, BlockAllocatorNoDoubleFreeCheck, id="4.1-no-double-free-check"),
    pytest.param(grading.check_slot_mapping, slot_mapping_block_plus_offset, id="4.2-block-plus-offset"),
    pytest.param(grading.check_paged_attention_gather, paged_gather_sorted_blocks, id="4.3-sorted-blocks"),
    pytest.param(grading.check_paged_attention_gather, paged_gather_whole_blocks, id="4.3-ignores-context-lens"),
    pytest.param(grading.check_block_hashes, block_hashes_without_parent, id="4.4-no-parent"),
    pytest.param(grading.check_cached_prefix_blocks, cached_prefix_blocks_with_last_token, id="4.5-reuses-last-block"),
]
