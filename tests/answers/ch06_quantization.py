"""Chapter 06's graded checks against right answers and plausible wrong ones (collected by tests/test_grading.py).

A wrong answer is a mistake a learner would plausibly make, written as a small function with a comment saying what
is wrong; every check must reject each of its wrong answers and pass each right answer on every random seed. The
worked example above each exercise in the solution notebook is recomputed here with the package's reference.
"""

import ast
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from minillm import grading
from minillm._triton import HAS_TRITON, tl, triton
from minillm.course import read_notebook
from minillm.grading.ch06_quantization import group_quantize_ref
from minillm.quant.awq import fake_quantize_int4, search_scale
from minillm.quant.kernels import dequant_gemv_ref, dequantize_weight_ref
from minillm.quant.numerics import pack_int4, quantize_asymmetric, quantize_symmetric

RIGHT_ANSWERS = []
WRONG_ANSWERS = []
SOLUTION = Path(__file__).resolve().parents[2] / "solutions" / "06_quantization.ipynb"


# Exercise 6.1: absmax quantization per output channel.


def absmax_right(w, bits):
    qmax = 2 ** (bits - 1) - 1
    scale = w.abs().amax(dim=1, keepdim=True) / qmax
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return torch.clamp(torch.round(w / scale), -qmax, qmax).to(torch.int8), scale


def absmax_in_place_guard(w, bits):
    qmax = 2 ** (bits - 1) - 1
    scale = w.abs().max(dim=1).values.unsqueeze(1) / qmax
    scale[scale == 0] = 1.0
    return (w / scale).round().clamp(-qmax, qmax).to(torch.int8), scale


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


def absmax_full_int8_range(w, bits):
    # Wrong: "int8 is [-128, 127]": divides by 2^(bits-1) = 128 and clamps to [-128, 127], so no code reaches the max.
    qmax = 2 ** (bits - 1)
    scale = w.abs().amax(dim=1, keepdim=True) / qmax
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return torch.clamp(torch.round(w / scale), -qmax, qmax - 1).to(torch.int8), scale


def absmax_eps_clamp(w, bits):
    # Wrong: avoids dividing by zero with clamp(min=1e-8) instead of scale 1.0: an all-zero row gets scale 1e-8 / qmax,
    # and rows of tiny weights (max |w| < 1e-8) get a too-coarse step. (The old check accepted this.)
    qmax = 2 ** (bits - 1) - 1
    scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / qmax
    return torch.clamp(torch.round(w / scale), -qmax, qmax).to(torch.int8), scale


def absmax_plus_eps(w, bits):
    # Wrong: scale = max|w| / qmax + 1e-8, invisible on ordinary rows (an atol of 1e-5 let it through), but it is the
    # whole scale of a row of 1e-9 weights, whose codes then collapse. (The old check accepted this.)
    qmax = 2 ** (bits - 1) - 1
    scale = w.abs().amax(dim=1, keepdim=True) / qmax + 1e-8
    return torch.clamp(torch.round(w / scale), -qmax, qmax).to(torch.int8), scale


def absmax_zero_scale_kept(w, bits):
    # Wrong: leaves scale 0 on an all-zero row and repairs the 0 / 0 codes with nan_to_num; q * scale is still right
    # but the stored scale is not the 1.0 asked for (and 0 is no step size). (The old check accepted this.)
    qmax = 2 ** (bits - 1) - 1
    scale = w.abs().amax(dim=1, keepdim=True) / qmax
    return torch.nan_to_num(torch.clamp(torch.round(w / scale), -qmax, qmax)).to(torch.int8), scale


RIGHT_ANSWERS += [
    pytest.param(grading.check_absmax_quantize, absmax_right, id="6.1-absmax"),
    pytest.param(grading.check_absmax_quantize, absmax_in_place_guard, id="6.1-in-place-guard"),
    pytest.param(grading.check_absmax_quantize, lambda w, bits: (lambda t: (t.q, t.scale))(
        quantize_symmetric(w, bits, "channel")), id="6.1-reference"),
]
WRONG_ANSWERS += [
    pytest.param(grading.check_absmax_quantize, absmax_from_max, id="6.1-scale-from-max"),
    pytest.param(grading.check_absmax_quantize, absmax_unsigned_range, id="6.1-unsigned-range"),
    pytest.param(grading.check_absmax_quantize, absmax_full_int8_range, id="6.1-full-int8-range"),
    pytest.param(grading.check_absmax_quantize, absmax_eps_clamp, id="6.1-eps-clamp"),
    pytest.param(grading.check_absmax_quantize, absmax_plus_eps, id="6.1-plus-eps"),
    pytest.param(grading.check_absmax_quantize, absmax_zero_scale_kept, id="6.1-zero-scale-kept"),
]


# Exercise 6.2: zero-point quantization per output channel.


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


def zero_point_hi_not_clamped(w, bits):
    # Wrong: includes 0 at the bottom of the range (lo <= 0) but not at the top, so an all-negative row gets a range
    # [min, max] that stops short of 0: its zero-point overflows qmax and is clamped. (The old check accepted this:
    # it had all-positive rows, never all-negative ones.)
    qmax = 2**bits - 1
    lo, hi = w.amin(dim=1, keepdim=True).clamp(max=0), w.amax(dim=1, keepdim=True)
    scale = (hi - lo) / qmax
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    zero = torch.clamp(torch.round(-lo / scale), 0, qmax)
    return torch.clamp(torch.round(w / scale) + zero, 0, qmax).to(torch.uint8), scale, zero


def zero_point_eps_clamp(w, bits):
    # Wrong: clamp(min=1e-8) instead of scale 1.0 on an empty range, which also coarsens rows of tiny weights.
    # (The old check accepted this: it had no all-zero row.)
    qmax = 2**bits - 1
    lo, hi = w.amin(dim=1, keepdim=True).clamp(max=0), w.amax(dim=1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / qmax).clamp(min=1e-8)
    zero = torch.clamp(torch.round(-lo / scale), 0, qmax)
    return torch.clamp(torch.round(w / scale) + zero, 0, qmax).to(torch.uint8), scale, zero


def zero_point_guard_too_late(w, bits):
    # Wrong: the zero-point is computed before the scale of an all-zero row is replaced by 1.0, so it is 0 / 0 = NaN.
    # (The old check accepted this: it had no all-zero row.)
    qmax = 2**bits - 1
    lo, hi = w.amin(dim=1, keepdim=True).clamp(max=0), w.amax(dim=1, keepdim=True).clamp(min=0)
    scale = (hi - lo) / qmax
    zero = torch.clamp(torch.round(-lo / scale), 0, qmax)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return torch.clamp(torch.round(w / scale) + zero, 0, qmax).to(torch.uint8), scale, zero


RIGHT_ANSWERS += [
    pytest.param(grading.check_zero_point_quantize, zero_point_right, id="6.2-zero-point"),
    pytest.param(grading.check_zero_point_quantize, lambda w, bits: (lambda t: (t.q, t.scale, t.zero))(
        quantize_asymmetric(w, bits, "channel")), id="6.2-reference"),
]
WRONG_ANSWERS += [
    pytest.param(grading.check_zero_point_quantize, zero_point_not_rounded, id="6.2-zero-not-rounded"),
    pytest.param(grading.check_zero_point_quantize, zero_point_range_without_zero, id="6.2-range-without-zero"),
    pytest.param(grading.check_zero_point_quantize, zero_point_hi_not_clamped, id="6.2-max-not-clamped-at-0"),
    pytest.param(grading.check_zero_point_quantize, zero_point_eps_clamp, id="6.2-eps-clamp"),
    pytest.param(grading.check_zero_point_quantize, zero_point_guard_too_late, id="6.2-guard-after-zero-point"),
]


# Exercise 6.3: per-group quantization, a short last group when group_size does not divide K.


def group_right(w, bits, group_size):
    N, K = w.shape
    num_groups = -(-K // group_size)
    padded = F.pad(w, (0, num_groups * group_size - K))  # zeros never change a range that includes 0
    q, scale, zero = zero_point_right(padded.reshape(N * num_groups, group_size), bits)  # every group a row
    return q.reshape(N, -1)[:, :K], scale.reshape(N, num_groups), zero.reshape(N, num_groups)


def group_loop(w, bits, group_size):
    parts = [zero_point_right(chunk, bits) for chunk in w.split(group_size, dim=1)]  # the last chunk may be short
    return tuple(torch.cat(t, dim=1) for t in zip(*parts))


def group_strided(w, bits, group_size):
    # Wrong: reshape(N, group_size, K / G) then transpose groups columns k, k + K/G, ... (strided, not consecutive).
    N, K = w.shape
    strided = w.reshape(N, group_size, K // group_size).transpose(1, 2).reshape(-1, group_size)
    q, scale, zero = zero_point_right(strided, bits)
    q = q.reshape(N, K // group_size, group_size).transpose(1, 2).reshape(N, K)
    return q, scale.reshape(N, K // group_size), zero.reshape(N, K // group_size)


def group_needs_divisor(w, bits, group_size):
    # Wrong: assumes group_size divides K (the reshape fails for SmolLM2's 576 in groups of 128).
    N, K = w.shape
    q, scale, zero = zero_point_right(w.reshape(N * K // group_size, group_size), bits)
    return q.reshape(N, K), scale.reshape(N, K // group_size), zero.reshape(N, K // group_size)


def group_tail_joins_last_group(w, bits, group_size):
    # Wrong: K // G groups, the leftover columns added to the last full group (one group of 192 instead of 128 + 64).
    K = w.shape[1]
    num_groups = K // group_size
    bounds = [g * group_size for g in range(num_groups)] + [K]
    parts = [zero_point_right(w[:, a:b], bits) for a, b in zip(bounds[:-1], bounds[1:])]
    return tuple(torch.cat(t, dim=1) for t in zip(*parts))


def group_last_group_overlaps(w, bits, group_size):
    # Wrong: keeps every group G wide by taking the last G columns for the last group, so its range includes weights
    # of the group before it.
    K = w.shape[1]
    starts = list(range(0, K - group_size, group_size)) + [K - group_size]
    parts = [zero_point_right(w[:, a : a + group_size], bits) for a in starts]
    q = torch.cat([p[0] for p in parts[:-1]] + [parts[-1][0][:, (len(starts) - 1) * group_size - K + group_size :]], 1)
    return q, torch.cat([p[1] for p in parts], 1), torch.cat([p[2] for p in parts], 1)


def group_eps_clamp(w, bits, group_size):
    # Wrong: per group from scratch with clamp(min=1e-8) on the scale: an all-zero group gets 1e-8 / qmax, not 1.0,
    # and a group of tiny weights a too-coarse step. (The old check accepted this: it had no all-zero group.)
    N, K = w.shape
    num_groups = -(-K // group_size)
    g = F.pad(w, (0, num_groups * group_size - K)).reshape(N, num_groups, group_size)
    qmax = 2**bits - 1
    lo, hi = g.amin(-1, keepdim=True).clamp(max=0), g.amax(-1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / qmax).clamp(min=1e-8)
    zero = torch.clamp(torch.round(-lo / scale), 0, qmax)
    q = torch.clamp(torch.round(g / scale) + zero, 0, qmax).to(torch.uint8)
    return q.reshape(N, -1)[:, :K], scale.squeeze(-1), zero.squeeze(-1)


RIGHT_ANSWERS += [
    pytest.param(grading.check_group_quantize, group_right, id="6.3-groups-as-rows"),
    pytest.param(grading.check_group_quantize, group_loop, id="6.3-split-loop"),
    pytest.param(grading.check_group_quantize, group_quantize_ref, id="6.3-reference"),
]
WRONG_ANSWERS += [
    pytest.param(grading.check_group_quantize, group_strided, id="6.3-strided-groups"),
    pytest.param(grading.check_group_quantize, group_needs_divisor, id="6.3-needs-a-divisor"),
    pytest.param(grading.check_group_quantize, group_tail_joins_last_group, id="6.3-tail-joins-last-group"),
    pytest.param(grading.check_group_quantize, group_last_group_overlaps, id="6.3-last-group-overlaps"),
    pytest.param(grading.check_group_quantize, group_eps_clamp, id="6.3-eps-clamp"),
]


# Exercise 6.4: packing two 4-bit codes per byte.


def pack_right(q):
    return q[..., 0::2] | (q[..., 1::2] << 4)


def pack_pairs_view(q):
    pairs = q.reshape(*q.shape[:-1], -1, 2)
    return pairs[..., 0] + pairs[..., 1] * 16


def pack_swapped_nibbles(q):
    # Wrong: column 2j in the high nibble.
    return (q[..., 0::2] << 4) | q[..., 1::2]


def pack_gguf_halves(q):
    # Wrong here: GGUF's Q4_1 layout (first half of the block in the low nibbles, second half in the high ones).
    half = q.shape[-1] // 2
    return q[..., :half] | (q[..., half:] << 4)


def pack_squeezed(q):
    # Wrong: squeeze() "cleans up" the shape and drops size-1 leading dims, (1, 3, 8) -> (3, 4).
    q = q.squeeze()
    return q[..., 0::2] | (q[..., 1::2] << 4)


def pack_as_int32(q):
    # Wrong: widens to int32 "to be safe" with the shift and forgets to narrow back to uint8.
    q = q.to(torch.int32)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def pack_two_dims_only(q):
    # Wrong: indexes q[:, ...], which assumes exactly one leading dim.
    return q[:, 0::2] | (q[:, 1::2] << 4)


RIGHT_ANSWERS += [
    pytest.param(grading.check_pack_int4, pack_right, id="6.4-pack"),
    pytest.param(grading.check_pack_int4, pack_pairs_view, id="6.4-pairs-times-16"),
    pytest.param(grading.check_pack_int4, pack_int4, id="6.4-reference"),
]
WRONG_ANSWERS += [
    pytest.param(grading.check_pack_int4, pack_swapped_nibbles, id="6.4-swapped-nibbles"),
    pytest.param(grading.check_pack_int4, pack_gguf_halves, id="6.4-gguf-halves"),
    pytest.param(grading.check_pack_int4, pack_squeezed, id="6.4-squeezes-size-1-dims"),
    pytest.param(grading.check_pack_int4, pack_as_int32, id="6.4-int32"),
    pytest.param(grading.check_pack_int4, pack_two_dims_only, id="6.4-two-dims-only"),
]


# Exercise 6.5: AWQ's scale search.


def awq_search(x, weight, group_size, num_grid, sign=1, clamp_first=True, eps=1e-4, keep_last_tie=False):
    x_mean = x.abs().mean(0)
    ref = x @ weight.t()
    best = (float("inf"), None, None)
    losses = []
    for alpha in torch.linspace(0, 1, num_grid + 1).tolist():
        s = x_mean.pow(sign * alpha)
        if clamp_first:
            s = s.clamp(min=eps)
        s = s / (s.max() * s.min()).sqrt()
        if not clamp_first:
            s = s.clamp(min=eps)
        loss = ((x / s) @ fake_quantize_int4(weight * s, group_size).t() - ref).pow(2).mean().item()
        losses.append(loss)
        if loss < best[0] or (keep_last_tie and loss == best[0]):
            best = (loss, alpha, s)
    return best[2], best[1], losses


def awq_right(x, weight, group_size, num_grid):
    return awq_search(x, weight, group_size, num_grid)


def awq_unscale_weight(x, weight, group_size, num_grid):
    # Right, summed in another order: x @ (Q(W s) / s)^T instead of (x / s) @ Q(W s)^T; argmin picks the first tie.
    x_mean = x.abs().mean(0)
    ref = x @ weight.t()
    alphas = torch.linspace(0, 1, num_grid + 1).tolist()
    clamped = [x_mean.pow(a).clamp(min=1e-4) for a in alphas]
    scales = [s / (s.max() * s.min()).sqrt() for s in clamped]
    losses = [torch.mean((x @ (fake_quantize_int4(weight * s, group_size) / s).t() - ref) ** 2).item() for s in scales]
    i = int(torch.tensor(losses, dtype=torch.float64).argmin())
    return scales[i], alphas[i], losses


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


def awq_no_clamp(x, weight, group_size, num_grid):
    # Wrong: no clamp, so a dead input channel (mean |x| = 0) makes s.min() = 0 and the normalization divides by 0.
    # (The old check accepted this: its inputs had no dead channel.)
    return awq_search(x, weight, group_size, num_grid, eps=0.0)


def awq_clamp_after_normalizing(x, weight, group_size, num_grid):
    # Wrong: clamps after normalizing, too late to keep a dead channel's 0 out of sqrt(s.max() * s.min()).
    # (The old check accepted this.)
    return awq_search(x, weight, group_size, num_grid, clamp_first=False)


def awq_last_on_ties(x, weight, group_size, num_grid):
    # Wrong: `loss <= best` keeps the last of equal losses, so a search where scaling cannot help returns alpha = 1
    # instead of plain round to nearest. (The old check accepted this: its losses never tied.)
    return awq_search(x, weight, group_size, num_grid, keep_last_tie=True)


RIGHT_ANSWERS += [
    pytest.param(grading.check_awq_search, awq_right, id="6.5-awq"),
    pytest.param(grading.check_awq_search, awq_unscale_weight, id="6.5-unscale-weight-argmin"),
    pytest.param(grading.check_awq_search, lambda x, w, g, n: search_scale(x.abs().mean(0), x, w, g, n),
                 id="6.5-reference"),
]
WRONG_ANSWERS += [
    pytest.param(grading.check_awq_search, awq_inverted_scales, id="6.5-inverted-scales"),
    pytest.param(grading.check_awq_search, awq_x_not_divided, id="6.5-x-not-divided"),
    pytest.param(grading.check_awq_search, awq_no_clamp, id="6.5-no-clamp"),
    pytest.param(grading.check_awq_search, awq_clamp_after_normalizing, id="6.5-clamp-after-normalizing"),
    pytest.param(grading.check_awq_search, awq_last_on_ties, id="6.5-last-on-ties"),
]


# Exercise 6.6: the int4 dequantize-inside-GEMV kernel. Each kernel takes the same arguments as the notebook's, with
# one meta-parameter VARIANT picking the mistake, so every wrong kernel is the right one with one thing changed.

if HAS_TRITON:
    # Kernels read globals only as constexpr.
    RIGHT, HIGH_NIBBLE_FIRST, NO_ZERO_POINT, GROUP_OF_TILE, FLOOR_TILES, X_UNMASKED, CONTIGUOUS_ROWS, GROUP_OF_BYTE = (
        tl.constexpr(v) for v in range(8))

    @triton.jit
    def _int4_gemv_kernel(
        x_ptr, qw_ptr, scales_ptr, zeros_ptr, out_ptr,
        N, K, group_size,
        stride_xm, stride_qn, stride_sn, stride_om,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, VARIANT: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        m = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        mask_n = offs_n < N
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        num_tiles = tl.cdiv(K, BLOCK_K)
        if VARIANT == FLOOR_TILES:  # Wrong: K // BLOCK_K tiles, so the last K % BLOCK_K columns are never summed.
            num_tiles = K // BLOCK_K
        row_stride = stride_qn
        if VARIANT == CONTIGUOUS_ROWS:  # Wrong: assumes packed rows follow each other (K // 2 bytes apart).
            row_stride = K // 2
        for t in range(num_tiles):
            k0 = t * BLOCK_K
            offs_k = k0 + tl.arange(0, BLOCK_K)  # [BLOCK_K]
            mask_k = offs_k < K
            if VARIANT == X_UNMASKED:  # Wrong: no tail mask on x, so the last tile reads past the row.
                x = tl.load(x_ptr + m * stride_xm + offs_k)
            else:
                x = tl.load(x_ptr + m * stride_xm + offs_k, mask=mask_k, other=0.0)
            mask = mask_n[:, None] & mask_k[None, :]
            packed = tl.load(qw_ptr + offs_n[:, None] * row_stride + offs_k[None, :] // 2, mask=mask, other=0)
            if VARIANT == HIGH_NIBBLE_FIRST:  # Wrong: even k in the high nibble.
                q = (packed.to(tl.int32) >> (4 * (1 - offs_k[None, :] % 2))) & 0xF
            else:
                q = (packed.to(tl.int32) >> (4 * (offs_k[None, :] % 2))) & 0xF
            g = offs_k // group_size  # [BLOCK_K]
            if VARIANT == GROUP_OF_TILE:  # Wrong: one group per tile, from its first column (right iff BLOCK_K | G).
                g = offs_k * 0 + k0 // group_size
            if VARIANT == GROUP_OF_BYTE:  # Wrong: the group of the byte index k // 2, not of the column k.
                g = (offs_k // 2) // group_size
            s = tl.load(scales_ptr + offs_n[:, None] * stride_sn + g[None, :], mask=mask, other=0.0)
            z = tl.load(zeros_ptr + offs_n[:, None] * stride_sn + g[None, :], mask=mask, other=0)
            if VARIANT == NO_ZERO_POINT:  # Wrong: forgets the zero-point: w = code * scale.
                w = q.to(tl.float32) * s.to(tl.float32)
            else:
                w = (q.to(tl.float32) - z.to(tl.float32)) * s.to(tl.float32)  # [BLOCK_N, BLOCK_K]
            acc += tl.sum(w * x[None, :], axis=1)
        tl.store(out_ptr + m * stride_om + offs_n, acc, mask=mask_n)

    def int4_gemv(x, qweight, scales, zeros, group_size, variant=0):
        """The notebook's launcher, for one of the kernel variants."""
        M, K = x.shape
        N = qweight.shape[0]
        out = torch.empty((M, N), device=x.device, dtype=torch.float32)
        BLOCK_N, BLOCK_K = 16, 32
        grid = (triton.cdiv(N, BLOCK_N), M)
        _int4_gemv_kernel[grid](
            x, qweight, scales, zeros, out, N, K, group_size,
            x.stride(0), qweight.stride(0), scales.stride(0), out.stride(0),
            BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, VARIANT=variant,
        )
        return out

    def _variant(v):
        return lambda x, qweight, scales, zeros, group_size: int4_gemv(x, qweight, scales, zeros, group_size, v.value)

    RIGHT_ANSWERS += [pytest.param(grading.check_int4_gemv_kernel, _variant(RIGHT), id="6.6-kernel")]
    WRONG_ANSWERS += [
        pytest.param(grading.check_int4_gemv_kernel, _variant(HIGH_NIBBLE_FIRST), id="6.6-high-nibble-first"),
        pytest.param(grading.check_int4_gemv_kernel, _variant(NO_ZERO_POINT), id="6.6-zero-point-not-subtracted"),
        pytest.param(grading.check_int4_gemv_kernel, _variant(GROUP_OF_TILE), id="6.6-group-of-the-tile"),
        pytest.param(grading.check_int4_gemv_kernel, _variant(GROUP_OF_BYTE), id="6.6-group-of-the-byte"),
        pytest.param(grading.check_int4_gemv_kernel, _variant(FLOOR_TILES), id="6.6-floor-tile-count"),
        pytest.param(grading.check_int4_gemv_kernel, _variant(X_UNMASKED), id="6.6-no-tail-mask-on-x"),
        pytest.param(grading.check_int4_gemv_kernel, _variant(CONTIGUOUS_ROWS), id="6.6-ignores-row-stride"),
    ]

RIGHT_ANSWERS += [
    pytest.param(grading.check_int4_gemv_kernel, lambda x, q, s, z, g: dequant_gemv_ref(x, q, s, z, 4, g),
                 id="6.6-reference"),
]


# The worked example above each exercise: recomputed with the package's reference, found in the notebook's text.


def _tensor(text: str, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor(ast.literal_eval(text), dtype=dtype)


def worked_examples() -> dict[str, list[str]]:
    """Exercise number -> the lines its markdown cell must contain, each computed here with the reference."""
    w = "[[0.7, -2.1, 0.3, 1.4], [0.0, 0.0, 0.0, 0.0]]"
    ref = quantize_symmetric(_tensor(w), 4, "channel")
    example_61 = [
        (
            f">>> w = torch.tensor({w})\n>>> q, scale = absmax_quantize(w, bits=4)\n"
            f">>> q\n{ref.q!r}\n>>> scale\n{ref.scale!r}\n"
        )
    ]

    w = "[[-0.2, 0.4, 1.25, 2.8], [-1.0, 0.0, 0.26, 0.5]]"
    ref = quantize_asymmetric(_tensor(w), 4, "channel")
    example_62 = [
        (
            f">>> w = torch.tensor({w})\n>>> q, scale, zero = zero_point_quantize(w, bits=4)\n"
            f">>> q\n{ref.q!r}\n>>> scale\n{ref.scale!r}\n>>> zero\n{ref.zero!r}\n"
        )
    ]

    w = "[[0.1, -0.4, 0.2, 0.3, 2.0, 1.0, -0.5, 0.0, -0.6, 0.3]]"
    q, scale, zero = group_quantize_ref(_tensor(w), 4, 4)
    example_63 = [
        (
            f">>> w = torch.tensor({w})\n>>> q, scale, zero = group_quantize(w, bits=4, group_size=4)\n"
            f">>> q\n{q!r}\n>>> scale\n{scale!r}\n>>> zero\n{zero!r}\n"
        )
    ]

    codes = "[3, 10, 15, 0, 7, 8]"
    packed = pack_int4(_tensor(codes, torch.uint8))
    example_64 = [
        (
            f">>> packed = pack_int4(torch.tensor({codes}, dtype=torch.uint8))\n>>> packed\n{packed!r}\n"
            f">>> [f\"0x{{b:02x}}\" for b in packed.tolist()]\n{[f'0x{b:02x}' for b in packed.tolist()]!r}\n"
        )
    ]

    x = "[[1.0, 8.0, -1.0, 0.5], [-1.0, -8.0, 1.0, 0.5], [1.0, 8.0, 1.0, -0.5]]"
    weight = "[[0.3, -0.2, 0.9, -1.0], [0.5, 0.1, -0.7, 0.2]]"
    xt = _tensor(x)
    s, alpha, losses = search_scale(xt.abs().mean(0), xt, _tensor(weight), 4, 2)
    example_65 = [
        (
            f">>> x = torch.tensor({x})\n>>> weight = torch.tensor({weight})\n"
            f">>> s, alpha, losses = awq_search(x, weight, group_size=4, num_grid=2)\n"
            f">>> alpha, [round(loss, 4) for loss in losses]\n{(alpha, [round(v, 4) for v in losses])!r}\n"
            f">>> s\n{s!r}\n"
        )
    ]

    x, codes = "[[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]]", "[[9, 10, 11, 12, 8, 0], [0, 15, 8, 8, 1, 2]]"
    scales, zeros = "[[0.5, 2.0], [1.0, 0.25]]", "[[8, 8], [8, 0]]"
    args = (_tensor(x), pack_int4(_tensor(codes, torch.uint8)), _tensor(scales, torch.float16),
            _tensor(zeros, torch.uint8))
    example_66 = [
        (
            f">>> x = torch.tensor({x})\n"
            f">>> qweight = pack_int4(torch.tensor({codes}, dtype=torch.uint8))\n"
            f">>> scales = torch.tensor({scales}, dtype=torch.float16)\n"
            f">>> zeros = torch.tensor({zeros}, dtype=torch.uint8)\n"
            f">>> dequantize_weight_ref(qweight, scales, zeros, bits=4, group_size=4)  # the weight they stand for\n"
            f"{dequantize_weight_ref(*args[1:], 4, 4)!r}\n"
            f">>> int4_gemv(x, qweight, scales, zeros, group_size=4)\n{dequant_gemv_ref(*args, 4, 4)!r}\n"
        )
    ]
    return {"6.1": example_61, "6.2": example_62, "6.3": example_63, "6.4": example_64, "6.5": example_65,
            "6.6": example_66}


def test_worked_examples_match_the_reference():
    cells = [c.source for c in read_notebook(SOLUTION).cells if c.cell_type == "markdown"]
    for number, lines in worked_examples().items():
        text = next((s for s in cells if s.startswith(f"## Exercise {number}:")), None)
        assert text is not None, f"no markdown cell starting '## Exercise {number}:' in {SOLUTION.name}"
        for line in lines:
            assert line in text, f"Exercise {number}'s worked example lacks (or contradicts) this text:\n{line}"
