"""Chapter 06's graded checks against right answers and plausible wrong ones (collected by tests/test_grading.py).

A wrong answer is a mistake a learner would plausibly make, written as a small function with a comment saying what
is wrong; every check must reject each of its wrong answers and pass each right answer on every random seed.
"""

import pytest
import torch

from minillm import grading
from minillm.quant.awq import fake_quantize_int4, search_scale
from minillm.quant.numerics import pack_int4, quantize_asymmetric, quantize_symmetric

RIGHT_ANSWERS = []
WRONG_ANSWERS = []


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
