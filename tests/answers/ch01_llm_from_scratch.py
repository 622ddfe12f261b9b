"""Chapter 01's graded checks against right answers and plausible wrong ones (collected by tests/test_grading.py).

A wrong answer is a mistake a learner would plausibly make, written as a small function with a comment saying what
is wrong; every check must reject each of its wrong answers and pass each right answer on every random seed.
"""

import pytest
import torch
import torch.nn.functional as F

from minillm import grading
from minillm.attention.reference import repeat_kv
from minillm.engine.sampling import apply_top_p
from minillm.model import RMSNorm, apply_rope

RIGHT_ANSWERS = []
WRONG_ANSWERS = []


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
