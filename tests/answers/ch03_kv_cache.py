"""Chapter 03's graded checks against right answers and plausible wrong ones (collected by tests/test_grading.py).

A wrong answer is a mistake a learner would plausibly make, written as a small function with a comment saying what
is wrong; every check must reject each of its wrong answers and pass each right answer on every random seed.
`test_worked_examples_match_the_reference` recomputes the example shown above each exercise in the solution notebook.
"""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from minillm import grading
from minillm.attention import attention_ref
from minillm.config import ModelConfig
from minillm.course import read_notebook
from minillm.kvcache.contiguous import left_pad
from minillm.kvcache.memory import (
    contiguous_reservation,
    kv_bytes_per_token,
    paged_reservation,
)

RIGHT_ANSWERS = []
WRONG_ANSWERS = []
SOLUTION = Path(__file__).resolve().parents[2] / "solutions" / "03_kv_cache.ipynb"


def element_size(dtype):
    return torch.empty((), dtype=dtype).element_size()


# Exercise 3.1: KV bytes per token.


def kv_bytes_without_v(config, dtype):
    # Wrong: counts the keys only (forgets the factor 2 for K and V).
    return config.num_layers * config.num_kv_heads * config.head_dim * element_size(dtype)


def kv_bytes_with_query_heads(config, dtype):
    # Wrong: uses the query heads H instead of the KV heads Hkv (no grouped-query attention).
    return 2 * config.num_layers * config.num_heads * config.head_dim * element_size(dtype)


def kv_bytes_with_group_size(config, dtype):
    # Wrong: uses H // Hkv, the query heads that share one KV head, as if it were the number of KV heads.
    return 2 * config.num_layers * (config.num_heads // config.num_kv_heads) * config.head_dim * element_size(dtype)


def kv_bytes_head_dim_from_hidden(config, dtype):
    # Wrong: derives D as hidden_size // num_heads, ignoring an explicit config.head_dim.
    return 2 * config.num_layers * config.num_kv_heads * (config.hidden_size // config.num_heads) * element_size(dtype)


def kv_bytes_assumes_fp16(config, dtype):
    # Wrong: two bytes per element whatever the dtype.
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * 2


def kv_bytes_size_table(config, dtype):
    # Wrong: a table of the dtypes the learner knows, one byte for everything else (float64 has 8).
    # The old check accepted it: its dtypes were fp16, fp32, bf16 and int8 only.
    size = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}.get(dtype, 1)
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * size


# Exercise 3.2: one decode step.


def decode_step_right(k_cache, v_cache, length, q, k, v):
    k_cache[:, :, length : length + 1], v_cache[:, :, length : length + 1] = k, v
    return attention_ref(q, k_cache[:, :, : length + 1], v_cache[:, :, : length + 1])


def decode_step_by_hand(k_cache, v_cache, length, q, k, v):
    # Right: the solution notebook's answer, softmax and grouped-query heads written out.
    k_cache[:, :, length : length + 1] = k
    v_cache[:, :, length : length + 1] = v
    n_rep = q.shape[1] // k.shape[1]
    keys = k_cache[:, :, : length + 1].float().repeat_interleave(n_rep, dim=1)
    values = v_cache[:, :, : length + 1].float().repeat_interleave(n_rep, dim=1)
    scores = q.float() @ keys.transpose(-2, -1) / math.sqrt(q.shape[-1])
    return (torch.softmax(scores, dim=-1) @ values).to(q.dtype)


def decode_step_forgets_new_token(k_cache, v_cache, length, q, k, v):
    # Wrong: attends over the old columns only, then writes; the new token does not see itself.
    o = attention_ref(q, k_cache[:, :, :length], v_cache[:, :, :length])
    k_cache[:, :, length : length + 1], v_cache[:, :, length : length + 1] = k, v
    return o


def decode_step_reads_whole_slab(k_cache, v_cache, length, q, k, v):
    # Wrong: attends over all S_max columns, stale ones included.
    k_cache[:, :, length : length + 1], v_cache[:, :, length : length + 1] = k, v
    return attention_ref(q, k_cache, v_cache, causal=False)


def decode_step_masks_stale_columns(k_cache, v_cache, length, q, k, v):
    # Wrong: attends over the whole slab with -inf scores past `length`. The weights there are 0, but 0 * NaN = NaN:
    # stale memory is read all the same. The old check accepted it: its stale values were finite.
    k_cache[:, :, length : length + 1], v_cache[:, :, length : length + 1] = k, v
    S_max = k_cache.shape[2]
    real = (torch.arange(S_max) <= length)[None, :].expand(k_cache.shape[0], S_max)
    return attention_ref(q, k_cache, v_cache, causal=False, key_padding_mask=real)


def decode_step_sdpa_is_causal(k_cache, v_cache, length, q, k, v):
    # Wrong: SDPA's is_causal aligns the mask top-left, so the single query sees key 0 only.
    k_cache[:, :, length : length + 1], v_cache[:, :, length : length + 1] = k, v
    n_rep = q.shape[1] // k.shape[1]
    keys = k_cache[:, :, : length + 1].repeat_interleave(n_rep, dim=1)
    values = v_cache[:, :, : length + 1].repeat_interleave(n_rep, dim=1)
    return F.scaled_dot_product_attention(q, keys, values, is_causal=True)


def decode_step_repeat_not_interleave(k_cache, v_cache, length, q, k, v):
    # Wrong: .repeat tiles the KV heads (0, 1, 0, 1), so query head h uses KV head h % Hkv, not h // (H // Hkv).
    k_cache[:, :, length : length + 1], v_cache[:, :, length : length + 1] = k, v
    n_rep = q.shape[1] // k.shape[1]
    keys = k_cache[:, :, : length + 1].float().repeat(1, n_rep, 1, 1)
    values = v_cache[:, :, : length + 1].float().repeat(1, n_rep, 1, 1)
    scores = q.float() @ keys.transpose(-2, -1) / math.sqrt(q.shape[-1])
    return (torch.softmax(scores, dim=-1) @ values).to(q.dtype)


def decode_step_naive_softmax(k_cache, v_cache, length, q, k, v):
    # Wrong: exp(scores) / sum without subtracting the max: a score above ~88 overflows fp32 to inf, inf / inf = NaN.
    # The old check accepted it: its random scores were small.
    k_cache[:, :, length : length + 1], v_cache[:, :, length : length + 1] = k, v
    n_rep = q.shape[1] // k.shape[1]
    keys = k_cache[:, :, : length + 1].float().repeat_interleave(n_rep, dim=1)
    values = v_cache[:, :, : length + 1].float().repeat_interleave(n_rep, dim=1)
    e = (q.float() @ keys.transpose(-2, -1) / math.sqrt(q.shape[-1])).exp()
    return (e / e.sum(-1, keepdim=True) @ values).to(q.dtype)


def decode_step_in_input_dtype(k_cache, v_cache, length, q, k, v):
    # Wrong: computes scores in the input dtype; in fp16 a score above 65504 is inf and the softmax NaN.
    # The old check accepted it: fp16 rounding stayed within its tolerance.
    k_cache[:, :, length : length + 1], v_cache[:, :, length : length + 1] = k, v
    n_rep = q.shape[1] // k.shape[1]
    keys = k_cache[:, :, : length + 1].repeat_interleave(n_rep, dim=1)
    values = v_cache[:, :, : length + 1].repeat_interleave(n_rep, dim=1)
    scores = q @ keys.transpose(-2, -1) / math.sqrt(q.shape[-1])
    return torch.softmax(scores, dim=-1) @ values


def decode_step_squeezes(k_cache, v_cache, length, q, k, v):
    # Wrong: q.squeeze() drops the T = 1 axis but also B or H when they are 1, and the einsum breaks.
    # The old check accepted it: its B and H were never 1.
    k_cache[:, :, length : length + 1], v_cache[:, :, length : length + 1] = k, v
    n_rep = q.shape[1] // k.shape[1]
    keys = k_cache[:, :, : length + 1].float().repeat_interleave(n_rep, dim=1)
    values = v_cache[:, :, : length + 1].float().repeat_interleave(n_rep, dim=1)
    scores = torch.einsum("bhd,bhsd->bhs", q.float().squeeze(), keys) / math.sqrt(q.shape[-1])
    return torch.einsum("bhs,bhsd->bhd", torch.softmax(scores, -1), values)[:, :, None].to(q.dtype)


# Exercise 3.3: a left-padded batch.


def left_pad_right(token_ids, pad_token_id):
    ids, batch = left_pad(token_ids, pad_token_id)
    mask = batch.key_padding_mask if batch.key_padding_mask is not None else torch.ones_like(ids, dtype=torch.bool)
    return ids, batch.positions, mask


def left_pad_by_cumsum(token_ids, pad_token_id):
    # Right: the mask from the lengths, positions as a running count of real tokens.
    P = max(len(t) for t in token_ids)
    lengths = torch.tensor([len(t) for t in token_ids])
    mask = torch.arange(P)[None, :] >= (P - lengths)[:, None]
    ids = torch.full((len(token_ids), P), pad_token_id, dtype=torch.long)
    for row, t in enumerate(token_ids):
        ids[row, P - len(t) :] = torch.tensor(t, dtype=torch.long)
    return ids, (mask.long().cumsum(-1) - 1).clamp(min=0), mask


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


def left_pad_mask_from_pad_id(token_ids, pad_token_id):
    # Wrong: finds the pads by comparing with pad_token_id, so a real token equal to it (EOS used as pad) is masked.
    # The old check accepted it: its prompts never contained the pad id.
    P = max(len(t) for t in token_ids)
    ids = torch.tensor([[pad_token_id] * (P - len(t)) + list(t) for t in token_ids])
    mask = ids != pad_token_id
    return ids, (mask.long().cumsum(-1) - 1).clamp(min=0), mask


def left_pad_pads_at_minus_one(token_ids, pad_token_id):
    # Wrong: positions = cumsum(mask) - 1 without the clamp: pads get -1 instead of 0.
    ids, _, mask = left_pad_right(token_ids, pad_token_id)
    return ids, mask.long().cumsum(-1) - 1, mask


def left_pad_mask_as_ints(token_ids, pad_token_id):
    # Wrong: a 0/1 int64 mask instead of a bool one (masked_fill and indexing need bool).
    ids, positions, mask = left_pad_right(token_ids, pad_token_id)
    return ids, positions, mask.long()


def left_pad_int32(token_ids, pad_token_id):
    # Wrong: int32 input ids and positions (embedding lookups and the package use int64).
    ids, positions, mask = left_pad_right(token_ids, pad_token_id)
    return ids.int(), positions.int(), mask


# Exercise 3.4: reserved but never filled.


def kv_waste_right(lengths, max_len, block_size):
    config = ModelConfig.tiny()
    return (contiguous_reservation(lengths, max_len, config).waste,
            paged_reservation(lengths, block_size, config).waste)


def kv_waste_by_hand(lengths, max_len, block_size):
    # Right: the solution notebook's answer.
    used = sum(lengths)
    contiguous = len(lengths) * max_len
    paged = sum(math.ceil(n / block_size) * block_size for n in lengths)
    return 1 - used / contiguous, 1 - used / paged


def kv_waste_floor_blocks(lengths, max_len, block_size):
    # Wrong: n // block_size drops the last, partial block (the paged waste can even go negative).
    used = sum(lengths)
    return 1 - used / (len(lengths) * max_len), 1 - used / sum(n // block_size * block_size for n in lengths)


def kv_waste_one_block_extra(lengths, max_len, block_size):
    # Wrong: n // block_size + 1 blocks, one too many when n is a whole number of blocks.
    used = sum(lengths)
    return 1 - used / (len(lengths) * max_len), 1 - used / sum((n // block_size + 1) * block_size for n in lengths)


def kv_waste_rounded_blocks(lengths, max_len, block_size):
    # Wrong: round(n / block_size) rounds a partial block down when it is less than half full.
    used = sum(lengths)
    paged = sum(max(1, round(n / block_size)) * block_size for n in lengths)
    return 1 - used / (len(lengths) * max_len), 1 - used / paged


def kv_waste_pooled_blocks(lengths, max_len, block_size):
    # Wrong: rounds the total up to blocks once, as if requests shared their last blocks; a block holds one request.
    used = sum(lengths)
    return 1 - used / (len(lengths) * max_len), 1 - used / (math.ceil(used / block_size) * block_size)


def kv_waste_reserves_longest(lengths, max_len, block_size):
    # Wrong: reserves the longest request's length, which a contiguous cache cannot know before generating.
    used = sum(lengths)
    paged = sum(math.ceil(n / block_size) * block_size for n in lengths)
    return 1 - used / (len(lengths) * max(lengths)), 1 - used / paged


def kv_waste_inverted(lengths, max_len, block_size):
    # Wrong: returns the fraction used, not the fraction wasted.
    used = sum(lengths)
    return used / (len(lengths) * max_len), used / sum(math.ceil(n / block_size) * block_size for n in lengths)


def kv_waste_per_used_token(lengths, max_len, block_size):
    # Wrong: idle slots per used token (overhead), not the fraction of the reservation that is idle.
    used = sum(lengths)
    contiguous, paged = len(lengths) * max_len, sum(math.ceil(n / block_size) * block_size for n in lengths)
    return (contiguous - used) / used, (paged - used) / used


RIGHT_ANSWERS += [
    pytest.param(grading.check_kv_bytes_per_token, kv_bytes_per_token, id="3.1-reference"),
    pytest.param(grading.check_decode_step, decode_step_right, id="3.2-append-then-attend"),
    pytest.param(grading.check_decode_step, decode_step_by_hand, id="3.2-by-hand"),
    pytest.param(grading.check_left_pad_batch, left_pad_right, id="3.3-reference"),
    pytest.param(grading.check_left_pad_batch, left_pad_by_cumsum, id="3.3-cumsum"),
    pytest.param(grading.check_kv_waste, kv_waste_right, id="3.4-reference"),
    pytest.param(grading.check_kv_waste, kv_waste_by_hand, id="3.4-by-hand"),
]
WRONG_ANSWERS += [
    pytest.param(grading.check_kv_bytes_per_token, kv_bytes_without_v, id="3.1-keys-only"),
    pytest.param(grading.check_kv_bytes_per_token, kv_bytes_with_query_heads, id="3.1-query-heads"),
    pytest.param(grading.check_kv_bytes_per_token, kv_bytes_with_group_size, id="3.1-group-size"),
    pytest.param(grading.check_kv_bytes_per_token, kv_bytes_head_dim_from_hidden, id="3.1-head-dim-from-hidden"),
    pytest.param(grading.check_kv_bytes_per_token, kv_bytes_assumes_fp16, id="3.1-always-2-bytes"),
    pytest.param(grading.check_kv_bytes_per_token, kv_bytes_size_table, id="3.1-dtype-size-table"),
    pytest.param(grading.check_decode_step, decode_step_forgets_new_token, id="3.2-new-token-not-attended"),
    pytest.param(grading.check_decode_step, decode_step_reads_whole_slab, id="3.2-reads-stale-columns"),
    pytest.param(grading.check_decode_step, decode_step_masks_stale_columns, id="3.2-masks-but-reads-stale"),
    pytest.param(grading.check_decode_step, decode_step_sdpa_is_causal, id="3.2-sdpa-is-causal-top-left"),
    pytest.param(grading.check_decode_step, decode_step_repeat_not_interleave, id="3.2-repeat-not-interleave"),
    pytest.param(grading.check_decode_step, decode_step_naive_softmax, id="3.2-softmax-without-max"),
    pytest.param(grading.check_decode_step, decode_step_in_input_dtype, id="3.2-fp16-scores"),
    pytest.param(grading.check_decode_step, decode_step_squeezes, id="3.2-squeeze-drops-size-1"),
    pytest.param(grading.check_left_pad_batch, left_pad_positions_count_pads, id="3.3-pads-shift-positions"),
    pytest.param(grading.check_left_pad_batch, right_pad, id="3.3-right-padding"),
    pytest.param(grading.check_left_pad_batch, left_pad_mask_from_pad_id, id="3.3-mask-from-pad-id"),
    pytest.param(grading.check_left_pad_batch, left_pad_pads_at_minus_one, id="3.3-pads-at-minus-one"),
    pytest.param(grading.check_left_pad_batch, left_pad_mask_as_ints, id="3.3-int-mask"),
    pytest.param(grading.check_left_pad_batch, left_pad_int32, id="3.3-int32"),
    pytest.param(grading.check_kv_waste, kv_waste_floor_blocks, id="3.4-floor-blocks"),
    pytest.param(grading.check_kv_waste, kv_waste_one_block_extra, id="3.4-one-block-extra"),
    pytest.param(grading.check_kv_waste, kv_waste_rounded_blocks, id="3.4-rounded-blocks"),
    pytest.param(grading.check_kv_waste, kv_waste_pooled_blocks, id="3.4-pooled-blocks"),
    pytest.param(grading.check_kv_waste, kv_waste_reserves_longest, id="3.4-reserves-longest"),
    pytest.param(grading.check_kv_waste, kv_waste_inverted, id="3.4-fraction-used"),
    pytest.param(grading.check_kv_waste, kv_waste_per_used_token, id="3.4-per-used-token"),
]


# The worked example above each exercise: recomputed with the package's reference, found in the notebook's text.


def worked_examples() -> dict[str, list[str]]:
    """Exercise number -> the lines its markdown cell must contain, each computed here with the reference."""
    tiny = ModelConfig.tiny()
    example_31 = [
        (f"{tiny.num_layers} layers, {tiny.num_heads} query heads, {tiny.num_kv_heads} KV heads of `head_dim` "
         f"{tiny.head_dim}"),
        f">>> kv_bytes_per_token(ModelConfig.tiny(), torch.float16)\n{kv_bytes_per_token(tiny, torch.float16)}\n",
    ]

    k_cache = torch.tensor([[[[1.0, 0.0], [0.0, 1.0], [9.0, 9.0], [9.0, 9.0]]]])
    v_cache = torch.tensor([[[[1.0, 2.0], [3.0, 4.0], [9.0, 9.0], [9.0, 9.0]]]])
    q, k, v = torch.tensor([[[[1.0, 1.0]]]]), torch.tensor([[[[1.0, 1.0]]]]), torch.tensor([[[[5.0, 6.0]]]])
    o = decode_step_right(k_cache, v_cache, 2, q, k, v)
    example_32 = [
        ">>> k_cache = torch.tensor([[[[1., 0.], [0., 1.], [9., 9.], [9., 9.]]]])",
        ">>> v_cache = torch.tensor([[[[1., 2.], [3., 4.], [9., 9.], [9., 9.]]]])",
        ">>> q, k, v = torch.tensor([[[[1., 1.]]]]), torch.tensor([[[[1., 1.]]]]), torch.tensor([[[[5., 6.]]]])",
        f">>> decode_step(k_cache, v_cache, 2, q, k, v)\n{o!r}\n",
        f">>> k_cache[0, 0, 2:]\n{k_cache[0, 0, 2:]!r}\n>>> v_cache[0, 0, 2:]\n{v_cache[0, 0, 2:]!r}\n",
    ]

    ids, positions, mask = left_pad_right([[5, 6, 7], [8], [0, 9]], 0)
    example_33 = [
        ">>> input_ids, positions, mask = left_pad_batch([[5, 6, 7], [8], [0, 9]], pad_token_id=0)",
        f">>> input_ids\n{ids!r}\n>>> positions\n{positions!r}\n>>> mask\n{mask!r}\n",
    ]

    lengths, max_len, block_size = [5, 16, 20], 32, 16
    contiguous = contiguous_reservation(lengths, max_len, tiny)
    paged = paged_reservation(lengths, block_size, tiny)
    per_request = " + ".join(str(-(-n // block_size) * block_size) for n in lengths)
    example_34 = [
        (f">>> [round(w, 4) for w in kv_waste({lengths}, max_len={max_len}, block_size={block_size})]\n"
         f"{[round(contiguous.waste, 4), round(paged.waste, 4)]}\n"),
        f"{sum(lengths)} tokens",
        f"{len(lengths)} × {max_len} = {contiguous.reserved_tokens} slots",
        f"{per_request} = {paged.reserved_tokens} slots",
    ]
    return {"3.1": example_31, "3.2": example_32, "3.3": example_33, "3.4": example_34}


def test_worked_examples_match_the_reference():
    cells = [c.source for c in read_notebook(SOLUTION).cells if c.cell_type == "markdown"]
    for number, lines in worked_examples().items():
        text = next((s for s in cells if s.startswith(f"## Exercise {number}:")), None)
        assert text is not None, f"no markdown cell starting '## Exercise {number}:' in {SOLUTION.name}"
        for line in lines:
            assert line in text, f"Exercise {number}'s worked example lacks (or contradicts) this text:\n{line}"
