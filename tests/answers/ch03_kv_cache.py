"""Chapter 03's graded checks against right answers and plausible wrong ones (collected by tests/test_grading.py).

A wrong answer is a mistake a learner would plausibly make, written as a small function with a comment saying what
is wrong; every check must reject each of its wrong answers and pass each right answer on every random seed.
"""

import pytest
import torch

from minillm import grading
from minillm.attention import attention_ref
from minillm.kvcache.contiguous import left_pad
from minillm.kvcache.memory import kv_bytes_per_token

RIGHT_ANSWERS = []
WRONG_ANSWERS = []


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
