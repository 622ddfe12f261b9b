"""The grading framework, and every exercise check against a right answer, a plausible wrong one, and the stub.

To register a chapter's check, add to its section below:

    RIGHT_ANSWERS += [pytest.param(grading.check_rmsnorm, minillm.model.rms_norm, id="1.1-reference")]
    WRONG_ANSWERS += [pytest.param(grading.check_rmsnorm, rmsnorm_without_eps, id="1.1-no-eps")]

where a wrong answer is a mistake a learner would plausibly make (forgetting eps, softmax over the wrong axis,
an off-by-one in a block table), written as a small function in that section. Every check in either list is also
run against a stub that raises NotImplementedError, as the shipped exercise does.
"""

import re

import pytest
import torch

from minillm import grading
from minillm.grading import assert_close, assert_equal, assert_shape, exercise, randint, randn


# A toy exercise "0.1: softmax over the last axis", as a chapter would write its check in minillm/grading/.
def check_softmax(fn):
    x = randn(4, 7, seed=0)
    with exercise("0.1", "softmax") as ex:
        ex.check("returns a tensor of the input's shape", lambda: assert_shape(fn(x), x.shape, what="softmax(x)"))
        ex.check("matches torch.softmax", lambda: assert_close(fn(x), torch.softmax(x, -1), what="softmax(x)"))
        ex.check("is stable for large inputs", lambda: assert_close(fn(x + 100), torch.softmax(x + 100, -1)))


def softmax_right(x):
    e = (x - x.amax(-1, keepdim=True)).exp()
    return e / e.sum(-1, keepdim=True)


def softmax_wrong_axis(x):
    return x.exp() / x.exp().sum(0, keepdim=True)


def softmax_unstable(x):
    return x.exp() / x.exp().sum(-1, keepdim=True)


def stub(*args, **kwargs):
    raise NotImplementedError("Exercise N.M: the shipped stub")


RIGHT_ANSWERS = [pytest.param(check_softmax, softmax_right, id="toy-softmax")]
WRONG_ANSWERS = [
    pytest.param(check_softmax, softmax_wrong_axis, id="toy-softmax-wrong-axis"),
    pytest.param(check_softmax, softmax_unstable, id="toy-softmax-no-max-subtraction"),
]

# == Chapter 00: setup and roofline =================================================================================

# == Chapter 01: an LLM from scratch =================================================================================

import torch.nn.functional as F  # noqa: E402

from minillm.attention.reference import repeat_kv  # noqa: E402
from minillm.engine.sampling import apply_top_p  # noqa: E402
from minillm.model import RMSNorm, apply_rope  # noqa: E402


def rms_norm_right(x, weight, eps):
    norm = RMSNorm(x.shape[-1], eps).to(weight.dtype)
    norm.weight.data = weight
    return norm(x)


def rms_norm_without_eps(x, weight, eps):
    # Wrong: forgets eps, so inputs near zero are blown up to RMS 1.
    x32 = x.float()
    return weight * (x32 / x32.pow(2).mean(-1, keepdim=True).sqrt()).to(x.dtype)


def rms_norm_as_layer_norm(x, weight, eps):
    # Wrong: subtracts the mean first (that is LayerNorm without a bias, not RMSNorm).
    x32 = x.float() - x.float().mean(-1, keepdim=True)
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rope_adjacent_pairs(x, cos, sin):
    # Wrong: rotates adjacent pairs (x_0, x_1), (x_2, x_3)... (the GPT-J / original-paper layout) while the weights
    # were permuted for the half-split layout (x_i, x_{i+D/2}); a rotation all the same, so norms are preserved.
    half = x.shape[-1] // 2
    c, s = cos[:, None, :, :half], sin[:, None, :, :half]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2)


def repeat_kv_tiled(x, n_rep):
    # Wrong: Tensor.repeat tiles the heads (0, 1, 2, 0, 1, 2...) instead of repeating each (0, 0, 1, 1...).
    return x.repeat(1, n_rep, 1, 1)


def top_p_without_crossing_token(logits, p):
    # Wrong: keeps only tokens whose cumulative mass stays <= p, dropping the token that crosses p.
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    drop_sorted = cumulative > p
    drop_sorted[..., 0] = False
    return logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))


def swiglu_gate_on_up(x, gate_w, up_w, down_w):
    # Wrong: applies silu to the up projection instead of the gate.
    return F.linear(F.linear(x, gate_w) * F.silu(F.linear(x, up_w)), down_w)


RIGHT_ANSWERS += [
    pytest.param(grading.check_rmsnorm, rms_norm_right, id="1.1-reference"),
    pytest.param(grading.check_rope, apply_rope, id="1.2-reference"),
    pytest.param(grading.check_repeat_kv, repeat_kv, id="1.3-reference"),
    pytest.param(grading.check_top_p, apply_top_p, id="1.4-reference"),
    pytest.param(
        grading.check_swiglu_mlp,
        lambda x, g, u, d: F.linear(F.silu(F.linear(x, g)) * F.linear(x, u), d),
        id="1.5-reference",
    ),
]
WRONG_ANSWERS += [
    pytest.param(grading.check_rmsnorm, rms_norm_without_eps, id="1.1-no-eps"),
    pytest.param(grading.check_rmsnorm, rms_norm_as_layer_norm, id="1.1-layernorm"),
    pytest.param(grading.check_rope, rope_adjacent_pairs, id="1.2-adjacent-pairs"),
    pytest.param(grading.check_repeat_kv, repeat_kv_tiled, id="1.3-repeat-tiles-heads"),
    pytest.param(grading.check_top_p, top_p_without_crossing_token, id="1.4-drops-crossing-token"),
    pytest.param(grading.check_swiglu_mlp, swiglu_gate_on_up, id="1.5-silu-on-up"),
]


# == Chapter 02: attention ===========================================================================================

from minillm._triton import HAS_TRITON, tl, triton  # noqa: E402
from minillm.attention import attention_ref, online_attention, online_softmax_step  # noqa: E402


def masked_attention_top_left(q, k, v, key_padding_mask=None):
    # Wrong: tril(ones(T, S)) aligns the causal mask top-left, so a chunk after cached keys loses the cache.
    T, S = q.shape[2], k.shape[2]
    allowed = torch.ones(T, S, dtype=torch.bool).tril()
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :]
    scores = (q.float() @ k.float().transpose(-2, -1)) / q.shape[-1] ** 0.5
    return (torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ v.float()).to(q.dtype)


def online_step_without_rescaling_acc(m_i, l_i, acc, s, v):
    # Wrong: rescales the running sum but not the running output when the maximum grows.
    m_new = torch.maximum(m_i, s.amax(-1))
    m_safe = torch.where(m_new == float("-inf"), torch.zeros_like(m_new), m_new)
    p = torch.exp(s - m_safe[:, None])
    return m_new, torch.exp(m_i - m_safe) * l_i + p.sum(-1), acc + p @ v


def tiled_attention_no_diagonal_mask(q, k, v, block_m, block_n):
    # Wrong: skips the tiles above the diagonal but forgets the mask inside the diagonal tiles.
    T, S = q.shape[2], k.shape[2]
    o = torch.empty(q.shape)
    for m0 in range(0, T, block_m):
        qt = q[:, :, m0 : m0 + block_m].float() / q.shape[-1] ** 0.5
        m_i = torch.full(qt.shape[:3], float("-inf"))
        l_i, acc = torch.zeros(qt.shape[:3]), torch.zeros(qt.shape)
        for n0 in range(0, min(S, m0 + block_m + S - T), block_n):
            s = qt @ k[:, :, n0 : n0 + block_n].float().transpose(-2, -1)
            m_i, l_i, acc = online_softmax_step(m_i, l_i, acc, s, v[:, :, n0 : n0 + block_n].float())
        o[:, :, m0 : m0 + block_m] = acc / l_i[..., None]
    return o.to(q.dtype)


if HAS_TRITON:

    @triton.jit
    def _row_softmax_kernel(out_ptr, x_ptr, stride_xm, stride_om, N, BLOCK_N: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK_N)
        x = tl.load(x_ptr + row * stride_xm + cols, mask=cols < N, other=float("-inf"))
        num = tl.exp(x - tl.max(x, 0))
        tl.store(out_ptr + row * stride_om + cols, num / tl.sum(num, 0), mask=cols < N)

    @triton.jit
    def _row_softmax_kernel_zero_tail(out_ptr, x_ptr, stride_xm, stride_om, N, BLOCK_N: tl.constexpr):
        # Wrong: the masked tail loads as 0, not -inf, so exp(0 - max) leaks into every row's sum.
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK_N)
        x = tl.load(x_ptr + row * stride_xm + cols, mask=cols < N, other=0.0)
        num = tl.exp(x - tl.max(x, 0))
        tl.store(out_ptr + row * stride_om + cols, num / tl.sum(num, 0), mask=cols < N)

    def launch_row_softmax(kernel, x):
        y = torch.empty(x.shape, device=x.device, dtype=x.dtype)
        kernel[(x.shape[0],)](y, x, x.stride(0), y.stride(0), x.shape[1], BLOCK_N=triton.next_power_of_2(x.shape[1]))
        return y

    RIGHT_ANSWERS += [
        pytest.param(
            grading.check_softmax_kernel, lambda x: launch_row_softmax(_row_softmax_kernel, x), id="2.4-kernel"
        )
    ]
    WRONG_ANSWERS += [
        pytest.param(
            grading.check_softmax_kernel,
            lambda x: launch_row_softmax(_row_softmax_kernel_zero_tail, x),
            id="2.4-zero-tail",
        )
    ]

RIGHT_ANSWERS += [
    pytest.param(
        grading.check_masked_attention,
        lambda q, k, v, key_padding_mask=None: attention_ref(q, k, v, key_padding_mask=key_padding_mask),
        id="2.1-reference",
    ),
    pytest.param(grading.check_online_softmax_step, online_softmax_step, id="2.2-reference"),
    pytest.param(
        grading.check_tiled_attention,
        lambda q, k, v, block_m, block_n: online_attention(q, k, v, block_m=block_m, block_n=block_n),
        id="2.3-reference",
    ),
]
WRONG_ANSWERS += [
    pytest.param(grading.check_masked_attention, masked_attention_top_left, id="2.1-top-left-causal"),
    pytest.param(grading.check_online_softmax_step, online_step_without_rescaling_acc, id="2.2-acc-not-rescaled"),
    pytest.param(grading.check_tiled_attention, tiled_attention_no_diagonal_mask, id="2.3-no-diagonal-mask"),
]


# == Chapter 03: KV cache ============================================================================================

from minillm.kvcache.contiguous import left_pad  # noqa: E402
from minillm.kvcache.memory import kv_bytes_per_token  # noqa: E402


def kv_bytes_without_v(config, dtype):
    # Wrong: counts the keys only (forgets the factor 2 for K and V).
    return config.num_layers * config.num_kv_heads * config.head_dim * torch.empty((), dtype=dtype).element_size()


def kv_bytes_with_query_heads(config, dtype):
    # Wrong: uses the query heads H instead of the KV heads Hkv (no grouped-query attention).
    return 2 * config.num_layers * config.num_heads * config.head_dim * torch.empty((), dtype=dtype).element_size()


def decode_step_right(k_cache, v_cache, length, q, k, v):
    k_cache[:, :, length : length + 1], v_cache[:, :, length : length + 1] = k, v
    return attention_ref(q, k_cache[:, :, : length + 1], v_cache[:, :, : length + 1])


def decode_step_forgets_new_token(k_cache, v_cache, length, q, k, v):
    # Wrong: attends over the old columns only, then writes; the new token does not see itself.
    o = attention_ref(q, k_cache[:, :, :length], v_cache[:, :, :length])
    k_cache[:, :, length : length + 1], v_cache[:, :, length : length + 1] = k, v
    return o


def decode_step_reads_whole_slab(k_cache, v_cache, length, q, k, v):
    # Wrong: attends over all S_max columns, stale ones included.
    k_cache[:, :, length : length + 1], v_cache[:, :, length : length + 1] = k, v
    return attention_ref(q, k_cache, v_cache, causal=False)


def left_pad_right(token_ids, pad_token_id):
    ids, batch = left_pad(token_ids, pad_token_id)
    mask = batch.key_padding_mask if batch.key_padding_mask is not None else torch.ones_like(ids, dtype=torch.bool)
    return ids, batch.positions, mask


def left_pad_positions_count_pads(token_ids, pad_token_id):
    # Wrong: positions 0..P-1 in every row, so a padded row's tokens are shifted by its number of pads.
    ids, _, mask = left_pad_right(token_ids, pad_token_id)
    return ids, torch.arange(ids.shape[1]).expand(ids.shape).clone(), mask


def right_pad(token_ids, pad_token_id):
    # Wrong: pads on the right, so the rows' last tokens do not line up in one column.
    P = max(len(t) for t in token_ids)
    ids = torch.tensor([list(t) + [pad_token_id] * (P - len(t)) for t in token_ids])
    positions = torch.tensor([list(range(len(t))) + [0] * (P - len(t)) for t in token_ids])
    return ids, positions, torch.tensor([[True] * len(t) + [False] * (P - len(t)) for t in token_ids])


RIGHT_ANSWERS += [
    pytest.param(grading.check_kv_bytes_per_token, kv_bytes_per_token, id="3.1-reference"),
    pytest.param(grading.check_decode_step, decode_step_right, id="3.2-append-then-attend"),
    pytest.param(grading.check_left_pad_batch, left_pad_right, id="3.3-reference"),
]
WRONG_ANSWERS += [
    pytest.param(grading.check_kv_bytes_per_token, kv_bytes_without_v, id="3.1-keys-only"),
    pytest.param(grading.check_kv_bytes_per_token, kv_bytes_with_query_heads, id="3.1-query-heads"),
    pytest.param(grading.check_decode_step, decode_step_forgets_new_token, id="3.2-new-token-not-attended"),
    pytest.param(grading.check_decode_step, decode_step_reads_whole_slab, id="3.2-reads-stale-columns"),
    pytest.param(grading.check_left_pad_batch, left_pad_positions_count_pads, id="3.3-pads-shift-positions"),
    pytest.param(grading.check_left_pad_batch, right_pad, id="3.3-right-padding"),
]


# == Chapter 04: paged attention =====================================================================================

from collections import deque  # noqa: E402

from minillm.attention.paged import paged_decode_attention_ref  # noqa: E402


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

# == Chapter 05: continuous batching =================================================================================
def schedule_step_right(running, waiting, max_num_batched_tokens, max_num_seqs):
    """running: tokens left per running sequence (oldest first); waiting: prompt lengths (FCFS)."""
    budget = max_num_batched_tokens
    running_tokens = [0] * len(running)
    for i, left in enumerate(running):  # decodes first: one token each
        if left == 1 and budget > 0:
            running_tokens[i], budget = 1, budget - 1
    for i, left in enumerate(running):  # then unfinished prompts, in chunks
        if left > 1 and budget > 0:
            running_tokens[i] = min(left, budget)
            budget -= running_tokens[i]
    admitted = []
    for prompt_len in waiting:  # then new prompts, first come first served
        if budget == 0 or len(running) + len(admitted) >= max_num_seqs:
            break
        admitted.append(min(prompt_len, budget))
        budget -= admitted[-1]
    return running_tokens, admitted


def preempt_right(bm, running, seq_id, num_tokens):
    """Preempt the newest running sequences until `seq_id` can grow to `num_tokens` tokens."""
    victims = []
    while not bm.can_allocate(bm.num_blocks_needed(seq_id, num_tokens)):
        victim = running.pop()  # the newest
        bm.free(victim)
        victims.append(victim)
        if victim == seq_id:  # it gave its own blocks up: it will be recomputed later
            break
    return victims


def pack_batch_right(token_ids, num_computed, num_new, block_tables, block_size):
    """-> (input_ids, positions, slot_mapping, cu_seqlens_q, context_lens), all lists."""
    input_ids, positions, slot_mapping, cu_seqlens_q, context_lens = [], [], [], [0], []
    for tokens, start, n, table in zip(token_ids, num_computed, num_new, block_tables):
        for p in range(start, start + n):
            input_ids.append(tokens[p])
            positions.append(p)
            slot_mapping.append(table[p // block_size] * block_size + p % block_size)
        cu_seqlens_q.append(cu_seqlens_q[-1] + n)
        context_lens.append(start + n)
    return input_ids, positions, slot_mapping, cu_seqlens_q, context_lens


def schedule_step_prefills_first(running, waiting, max_num_batched_tokens, max_num_seqs):
    budget, running_tokens = max_num_batched_tokens, []
    for left in running:  # in list order: a long prompt can eat the budget of the decodes after it
        running_tokens.append(min(left, budget))
        budget -= running_tokens[-1]
    admitted = []
    for prompt_len in waiting:
        if budget == 0 or len(running) + len(admitted) >= max_num_seqs:
            break
        admitted.append(min(prompt_len, budget))
        budget -= admitted[-1]
    return running_tokens, admitted


def schedule_step_no_chunking(running, waiting, max_num_batched_tokens, max_num_seqs):
    running_tokens, admitted = schedule_step_right(running, [], max_num_batched_tokens, max_num_seqs)
    budget = max_num_batched_tokens - sum(running_tokens)
    for prompt_len in waiting:  # a prompt that does not fit whole waits
        if prompt_len > budget or len(running) + len(admitted) >= max_num_seqs:
            break
        admitted.append(prompt_len)
        budget -= prompt_len
    return running_tokens, admitted


def preempt_oldest(bm, running, seq_id, num_tokens):
    victims = []
    while not bm.can_allocate(bm.num_blocks_needed(seq_id, num_tokens)) and seq_id not in victims:
        victims.append(running.pop(0))
        bm.free(victims[-1])
    return victims


def preempt_never_itself(bm, running, seq_id, num_tokens):
    victims = []
    while not bm.can_allocate(bm.num_blocks_needed(seq_id, num_tokens)):
        victims.append([s for s in running if s != seq_id][-1])  # spares the growing sequence: wrong when newest
        running.remove(victims[-1])
        bm.free(victims[-1])
    return victims


def pack_batch_positions_from_zero(token_ids, num_computed, num_new, block_tables, block_size):
    ids, pos, slots, cu, ctx = pack_batch_right(token_ids, num_computed, num_new, block_tables, block_size)
    pos = [p for n in num_new for p in range(n)]  # forgets the cached tokens before the chunk
    return ids, pos, slots, cu, ctx


def pack_batch_cu_without_zero(token_ids, num_computed, num_new, block_tables, block_size):
    ids, pos, slots, cu, ctx = pack_batch_right(token_ids, num_computed, num_new, block_tables, block_size)
    return ids, pos, slots, cu[1:], ctx


RIGHT_ANSWERS += [
    pytest.param(grading.check_schedule_step, schedule_step_right, id="5.1-schedule-step"),
    pytest.param(grading.check_preempt, preempt_right, id="5.2-preempt"),
    pytest.param(grading.check_pack_batch, pack_batch_right, id="5.3-pack-batch"),
]
WRONG_ANSWERS += [
    pytest.param(grading.check_schedule_step, schedule_step_prefills_first, id="5.1-prefills-before-decodes"),
    pytest.param(grading.check_schedule_step, schedule_step_no_chunking, id="5.1-no-chunking"),
    pytest.param(grading.check_preempt, preempt_oldest, id="5.2-oldest-first"),
    pytest.param(grading.check_preempt, preempt_never_itself, id="5.2-spares-itself"),
    pytest.param(grading.check_pack_batch, pack_batch_positions_from_zero, id="5.3-positions-from-zero"),
    pytest.param(grading.check_pack_batch, pack_batch_cu_without_zero, id="5.3-cu-without-zero"),
]

# == Chapter 06: quantization ========================================================================================

from minillm.quant.awq import fake_quantize_int4, search_scale  # noqa: E402
from minillm.quant.numerics import pack_int4, quantize_asymmetric, quantize_symmetric  # noqa: E402


def absmax_right(w, bits):
    qmax = 2 ** (bits - 1) - 1
    scale = w.abs().amax(dim=1, keepdim=True) / qmax
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return torch.clamp(torch.round(w / scale), -qmax, qmax).to(torch.int8), scale


def absmax_from_max(w, bits):
    # Wrong: the scale comes from max(w), not max|w|, so rows whose largest magnitude is negative get clipped.
    qmax = 2 ** (bits - 1) - 1
    scale = w.amax(dim=1, keepdim=True).clamp(min=1e-8) / qmax
    return torch.clamp(torch.round(w / scale), -qmax, qmax).to(torch.int8), scale


def absmax_unsigned_range(w, bits):
    # Wrong: qmax = 2^bits - 1, the unsigned range, which overflows int8 and 4-bit codes.
    qmax = 2**bits - 1
    scale = w.abs().amax(dim=1, keepdim=True) / qmax
    return torch.clamp(torch.round(w / scale), -qmax, qmax).to(torch.int8), scale


def zero_point_right(w, bits):
    qmax = 2**bits - 1
    lo, hi = w.amin(dim=1, keepdim=True).clamp(max=0), w.amax(dim=1, keepdim=True).clamp(min=0)
    scale = (hi - lo) / qmax
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    zero = torch.clamp(torch.round(-lo / scale), 0, qmax)
    return torch.clamp(torch.round(w / scale) + zero, 0, qmax).to(torch.uint8), scale, zero


def zero_point_not_rounded(w, bits):
    # Wrong: a fractional zero-point, so 0.0 is no longer exactly representable.
    qmax = 2**bits - 1
    lo, hi = w.amin(dim=1, keepdim=True).clamp(max=0), w.amax(dim=1, keepdim=True).clamp(min=0)
    scale = (hi - lo) / qmax
    zero = -lo / scale
    return torch.clamp(torch.round(w / scale + zero), 0, qmax).to(torch.uint8), scale, zero


def zero_point_range_without_zero(w, bits):
    # Wrong: the range is [min w, max w] without 0, so all-positive rows get a negative zero-point clamped away.
    qmax = 2**bits - 1
    lo, hi = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
    scale = (hi - lo) / qmax
    zero = torch.clamp(torch.round(-lo / scale), 0, qmax)
    return torch.clamp(torch.round(w / scale) + zero, 0, qmax).to(torch.uint8), scale, zero


def group_right(w, bits, group_size):
    N, K = w.shape
    q, scale, zero = zero_point_right(w.reshape(-1, group_size), bits)  # every group is a row of its own
    return q.reshape(N, K), scale.reshape(N, K // group_size), zero.reshape(N, K // group_size)


def group_strided(w, bits, group_size):
    # Wrong: reshape(N, group_size, K / G) then transpose groups columns k, k + K/G, ... (strided, not consecutive).
    N, K = w.shape
    strided = w.reshape(N, group_size, K // group_size).transpose(1, 2).reshape(-1, group_size)
    q, scale, zero = zero_point_right(strided, bits)
    q = q.reshape(N, K // group_size, group_size).transpose(1, 2).reshape(N, K)
    return q, scale.reshape(N, K // group_size), zero.reshape(N, K // group_size)


def pack_right(q):
    return q[..., 0::2] | (q[..., 1::2] << 4)


def pack_swapped_nibbles(q):
    # Wrong: column 2j in the high nibble.
    return (q[..., 0::2] << 4) | q[..., 1::2]


def pack_gguf_halves(q):
    # Wrong here: GGUF's Q4_1 layout (first half of the block in the low nibbles, second half in the high ones).
    half = q.shape[-1] // 2
    return q[..., :half] | (q[..., half:] << 4)


def awq_search(x, weight, group_size, num_grid, sign=1):
    x_mean = x.abs().mean(0)
    ref = x @ weight.t()
    best = (float("inf"), None, None)
    losses = []
    for alpha in torch.linspace(0, 1, num_grid + 1).tolist():
        s = x_mean.pow(sign * alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        loss = ((x / s) @ fake_quantize_int4(weight * s, group_size).t() - ref).pow(2).mean().item()
        losses.append(loss)
        if loss < best[0]:
            best = (loss, alpha, s)
    return best[2], best[1], losses


def awq_right(x, weight, group_size, num_grid):
    return awq_search(x, weight, group_size, num_grid)


def awq_inverted_scales(x, weight, group_size, num_grid):
    # Wrong: s = mean|x|^-alpha scales the loud channels' weights *down*, giving them coarser steps.
    return awq_search(x, weight, group_size, num_grid, sign=-1)


def awq_x_not_divided(x, weight, group_size, num_grid):
    # Wrong: scales the weight but forgets to divide the input by s, so the product changes.
    x_mean = x.abs().mean(0)
    ref = x @ weight.t()
    best = (float("inf"), None, None)
    losses = []
    for alpha in torch.linspace(0, 1, num_grid + 1).tolist():
        s = x_mean.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        loss = (x @ fake_quantize_int4(weight * s, group_size).t() - ref).pow(2).mean().item()
        losses.append(loss)
        if loss < best[0]:
            best = (loss, alpha, s)
    return best[2], best[1], losses


RIGHT_ANSWERS += [
    pytest.param(grading.check_absmax_quantize, absmax_right, id="6.1-absmax"),
    pytest.param(grading.check_absmax_quantize, lambda w, bits: (lambda t: (t.q, t.scale))(
        quantize_symmetric(w, bits, "channel")), id="6.1-reference"),
    pytest.param(grading.check_zero_point_quantize, zero_point_right, id="6.2-zero-point"),
    pytest.param(grading.check_group_quantize, group_right, id="6.3-groups-as-rows"),
    pytest.param(grading.check_group_quantize, lambda w, bits, g: (lambda t: (t.q, t.scale, t.zero))(
        quantize_asymmetric(w, bits, "group", g)), id="6.3-reference"),
    pytest.param(grading.check_pack_int4, pack_right, id="6.4-pack"),
    pytest.param(grading.check_pack_int4, pack_int4, id="6.4-reference"),
    pytest.param(grading.check_awq_search, awq_right, id="6.5-awq"),
    pytest.param(grading.check_awq_search, lambda x, w, g, n: search_scale(x.abs().mean(0), x, w, g, n),
                 id="6.5-reference"),
]
WRONG_ANSWERS += [
    pytest.param(grading.check_absmax_quantize, absmax_from_max, id="6.1-scale-from-max"),
    pytest.param(grading.check_absmax_quantize, absmax_unsigned_range, id="6.1-unsigned-range"),
    pytest.param(grading.check_zero_point_quantize, zero_point_not_rounded, id="6.2-zero-not-rounded"),
    pytest.param(grading.check_zero_point_quantize, zero_point_range_without_zero, id="6.2-range-without-zero"),
    pytest.param(grading.check_group_quantize, group_strided, id="6.3-strided-groups"),
    pytest.param(grading.check_pack_int4, pack_swapped_nibbles, id="6.4-swapped-nibbles"),
    pytest.param(grading.check_pack_int4, pack_gguf_halves, id="6.4-gguf-halves"),
    pytest.param(grading.check_awq_search, awq_inverted_scales, id="6.5-inverted-scales"),
    pytest.param(grading.check_awq_search, awq_x_not_divided, id="6.5-x-not-divided"),
]

# == Chapter 07: pruning =============================================================================================

from minillm.prune import magnitude_mask, nm_mask, row_mask  # noqa: E402


def magnitude_mask_global_threshold(weight, sparsity):
    # Wrong: one threshold for the whole matrix, so rows of small weights lose far more than `sparsity`.
    k = round(sparsity * weight.numel())
    if k == 0:
        return torch.ones_like(weight, dtype=torch.bool)
    return weight.abs() > weight.abs().flatten().kthvalue(k).values


def magnitude_mask_signed(weight, sparsity):
    # Wrong: ranks by W instead of |W|, so large negative weights are dropped first.
    return row_mask(weight, sparsity)


def wanda_mask_right(weight, x, sparsity):
    norm = x.reshape(-1, x.shape[-1]).norm(dim=0)  # (in,): over every token
    return row_mask(weight.abs() * norm[None, :], sparsity)


def wanda_mask_norms_per_output(weight, x, sparsity):
    # Wrong: the norms multiply the rows (the output dim), which does not change a per-row ranking: magnitude again.
    norm = x.reshape(-1, x.shape[-1]).norm(dim=0)
    return row_mask(weight.abs() * norm[:, None], sparsity)


def wanda_mask_squared_norm(weight, x, sparsity):
    # Wrong: forgets the square root, ||X_j||^2 overweights loud channels.
    return row_mask(weight.abs() * x.reshape(-1, x.shape[-1]).pow(2).sum(dim=0)[None, :], sparsity)


def wanda_mask_magnitude_only(weight, x, sparsity):
    # Wrong: ignores the activations.
    return magnitude_mask(weight, sparsity)


def nm_mask_right(score, n, m):
    out_features, in_features = score.shape
    groups = score.reshape(out_features, in_features // m, m)  # (out, in/M, M)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, groups.topk(n, dim=-1).indices, True)
    return keep.reshape(out_features, in_features)


def nm_mask_along_outputs(score, n, m):
    # Wrong: groups M consecutive *output* rows (dim 0) instead of M consecutive inputs.
    return nm_mask_right(score.T.contiguous(), n, m).T


def nm_mask_strided_groups(score, n, m):
    # Wrong: reshape(out, M, in/M) groups inputs j, j + in/M, j + 2 in/M, ... (strided, not consecutive).
    out_features, in_features = score.shape
    groups = score.reshape(out_features, m, in_features // m).transpose(1, 2)  # (out, in/M, M), strided
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, groups.topk(n, dim=-1).indices, True)
    return keep.transpose(1, 2).reshape(out_features, in_features)


def nm_mask_drops_largest(score, n, m):
    # Wrong: keeps the N smallest scores of each group.
    return nm_mask_right(-score, n, m)


RIGHT_ANSWERS += [
    pytest.param(grading.check_magnitude_mask, magnitude_mask, id="7.1-reference"),
    pytest.param(grading.check_wanda_mask, wanda_mask_right, id="7.2-norm-over-tokens"),
    pytest.param(grading.check_nm_mask, nm_mask, id="7.3-reference"),
    pytest.param(grading.check_nm_mask, nm_mask_right, id="7.3-topk"),
]
WRONG_ANSWERS += [
    pytest.param(grading.check_magnitude_mask, magnitude_mask_global_threshold, id="7.1-global-threshold"),
    pytest.param(grading.check_magnitude_mask, magnitude_mask_signed, id="7.1-signed-weights"),
    pytest.param(grading.check_wanda_mask, wanda_mask_norms_per_output, id="7.2-norms-on-wrong-axis"),
    pytest.param(grading.check_wanda_mask, wanda_mask_squared_norm, id="7.2-squared-norm"),
    pytest.param(grading.check_wanda_mask, wanda_mask_magnitude_only, id="7.2-magnitude-only"),
    pytest.param(grading.check_nm_mask, nm_mask_along_outputs, id="7.3-groups-along-outputs"),
    pytest.param(grading.check_nm_mask, nm_mask_strided_groups, id="7.3-strided-groups"),
    pytest.param(grading.check_nm_mask, nm_mask_drops_largest, id="7.3-keeps-smallest"),
]

# == Chapter 08: fast decoding =======================================================================================


VERDICT = re.compile(r"^Exercise \d+\.\d+ passed: (\d+)/\1 checks$")


@pytest.mark.parametrize("check, answer", RIGHT_ANSWERS)
def test_right_answer_passes_with_one_line(check, answer, capsys):
    check(answer)
    out = capsys.readouterr().out
    assert VERDICT.match(out.strip()), f"a check must print exactly one verdict line, printed {out!r}"
    check(answer)
    assert capsys.readouterr().out == out, "the verdict line must be deterministic"


@pytest.mark.parametrize("check, answer", WRONG_ANSWERS)
def test_wrong_answer_fails(check, answer, capsys):
    with pytest.raises(AssertionError, match=r"Exercise \d+\.\d+ .*check \d+ failed"):
        check(answer)
    assert "passed" not in capsys.readouterr().out


ALL_CHECKS = sorted({p.values[0] for p in RIGHT_ANSWERS + WRONG_ANSWERS}, key=lambda f: f.__qualname__)


@pytest.mark.parametrize("check", ALL_CHECKS, ids=[f.__name__ for f in ALL_CHECKS])
def test_stub_fails_as_not_implemented(check):
    with pytest.raises(AssertionError, match="not implemented yet"):
        check(stub)


# The framework itself.


def test_first_failing_sub_check_is_named_and_later_ones_do_not_run():
    ran = []
    with pytest.raises(AssertionError) as info:
        with exercise("2.1", "toy") as ex:
            ex.check("first", lambda: ran.append(1))
            ex.check("second", lambda: assert_equal(1, 2, what="answer"))
            ex.check("third", lambda: ran.append(3))
    assert str(info.value) == "Exercise 2.1 (toy), check 2 failed: second\nanswer: expected 2, got 1"
    assert ran == [1]


def test_a_crash_in_learner_code_fails_the_sub_check():
    with pytest.raises(AssertionError, match="check 1 failed: shapes\nyour code raised RuntimeError"):
        with exercise("2.2", "toy") as ex:
            ex.check("shapes", lambda: torch.zeros(2, 3) @ torch.zeros(2, 3))


def test_not_implemented_outside_a_sub_check():
    with pytest.raises(AssertionError, match=r"Exercise 2.3 \(toy\): not implemented yet"):
        with exercise("2.3", "toy"):
            stub()


def test_check_returns_the_sub_check_result(capsys):
    with exercise("2.4", "toy") as ex:
        assert ex.check("value", lambda: 5) == 5
    assert capsys.readouterr().out == "Exercise 2.4 passed: 1/1 checks\n"


def test_assert_close_messages():
    expected = torch.zeros(2, 3)
    with pytest.raises(AssertionError, match=r"^out: expected shape \(2, 3\), got \(3, 2\)$"):
        assert_close(torch.zeros(3, 2), expected, what="out")
    with pytest.raises(AssertionError, match="expected dtype torch.float32, got torch.float16"):
        assert_close(expected.half(), expected)
    assert_close(expected.half(), expected, check_dtype=False)
    with pytest.raises(AssertionError, match="expected Tensor.*got list"):
        assert_close([0.0, 0.0], torch.zeros(2))
    got = expected.clone()
    got[1, 2] = 0.5
    with pytest.raises(AssertionError, match=r"1 of 6 elements differ.*index \(1, 2\): got 0.5, expected 0"):
        assert_close(got, expected)
    with pytest.raises(AssertionError, match="contains NaN"):
        assert_close(torch.full((2, 3), float("nan")), expected)
    assert_close(1.0 + 1e-7, 1.0)
    assert_close(torch.tensor(2.0), 2.0)


def test_assert_equal_messages():
    assert_equal(torch.tensor([1, 2, 3]), torch.tensor([1, 2, 3]))
    with pytest.raises(AssertionError, match=r"ids: 1 of 3 elements differ; first at index \(2,\): got 4, expected 3"):
        assert_equal(torch.tensor([1, 2, 4]), torch.tensor([1, 2, 3]), what="ids")
    with pytest.raises(AssertionError, match="expected dtype torch.int64, got torch.int32"):
        assert_equal(torch.tensor([1], dtype=torch.int32), torch.tensor([1]))
    with pytest.raises(AssertionError, match=r"blocks: expected \[0, 1\], got \[1, 0\]"):
        assert_equal([1, 0], [0, 1], what="blocks")


def test_seeded_inputs_are_reproducible():
    assert torch.equal(randn(3, 4, seed=7), randn(3, 4, seed=7))
    assert not torch.equal(randn(3, 4, seed=7), randn(3, 4, seed=8))
    assert randn(2, seed=0, dtype=torch.float16).dtype == torch.float16
    ids = randint(0, 10, 5, seed=1)
    assert ids.dtype == torch.int64 and ids.shape == (5,) and torch.equal(ids, randint(0, 10, 5, seed=1))
    assert grading.generator(3).initial_seed() == 3
