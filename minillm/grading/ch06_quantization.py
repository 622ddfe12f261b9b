"""Chapter 6 checks (quantization), used by solutions/06_quantization.ipynb.

Each check runs fixed cases and fresh random ones (drawn from the exercise's seed): weights whose rows or groups
include one of every awkward kind (all zero, constant, one sign, tiny and huge magnitudes, one outlier), odd widths
and width 1, group sizes that leave a short last group, parameters at their boundaries on real-size rows. Every
check has plausible wrong answers in tests/answers/ch06_quantization.py that it must reject.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from minillm.grading.framework import (
    Exercise,
    _describe,
    assert_close,
    assert_equal,
    assert_shape,
    call_kernel,
    exercise,
    generator,
    randint,
    randn,
    triton_device,
)

__all__ = [  # the checks, re-exported by minillm.grading
    "check_absmax_quantize",
    "check_zero_point_quantize",
    "check_group_quantize",
    "check_pack_int4",
    "check_awq_search",
    "check_int4_gemv_kernel",
]

def _weight_with_outliers(out_features: int, in_features: int, seed: int) -> torch.Tensor:
    """Rows of different scales, each with one outlier 8x its row's scale; negative in even rows, so max != absmax."""
    w = randn(out_features, in_features, seed=seed) * torch.logspace(-1, 0.5, out_features)[:, None]
    rows = torch.arange(out_features)
    cols = torch.randint(0, in_features, (out_features,), generator=generator(seed + 1))
    sign = torch.where(rows % 2 == 0, -1.0, 1.0)
    w[rows, cols] = sign * 8 * torch.logspace(-1, 0.5, out_features)
    return w


def _as_tuple(got: Any, n: int, names: str) -> tuple:
    assert isinstance(got, (tuple, list)) and len(got) == n, f"expected a tuple ({names}), got {_describe(got)}"
    return tuple(got)


# The awkward segments (rows, or groups of a row) every fresh weight contains, one of each, at random places.
SEGMENT_KINDS = ("zero", "constant", "positive", "negative", "tiny", "huge", "outlier", "one nonzero")


def _segment(ex: Exercise, kind: str, length: int) -> torch.Tensor:
    sign = ex.rng.choice([-1.0, 1.0])
    if kind == "zero":
        return torch.zeros(length)
    if kind == "constant":
        return torch.full((length,), sign * 10 ** ex.rng.uniform(-2, 1))
    if kind in ("positive", "negative"):
        mag = (ex.randn(length).abs() + 0.05) * 10 ** ex.rng.uniform(-1, 1)
        return mag if kind == "positive" else -mag
    if kind == "tiny":  # a scale of 1e-14..1e-9: an epsilon added to (or clamping) the scale changes the codes
        return ex.randn(length) * 10 ** ex.rng.uniform(-12, -7)
    if kind == "huge":
        return ex.randn(length) * 10 ** ex.rng.uniform(6, 12)
    seg = ex.randn(length) if kind == "outlier" else torch.zeros(length)
    seg[ex.rng.randrange(length)] = sign * ex.rng.uniform(20, 100)
    return seg


def _fresh_weight(ex: Exercise, N: int, K: int, group_size: int | None = None) -> torch.Tensor:
    """A fresh (N, K) weight: rows of random scales, with one segment of each SEGMENT_KINDS at random places.

    A segment is a row (group_size None) or a group of `group_size` consecutive weights of a row, the last one of a
    row shorter when group_size does not divide K. Needs N * ceil(K / group_size) >= len(SEGMENT_KINDS).
    """
    G = group_size or K
    num_groups = -(-K // G)
    w = ex.randn(N, K) * 10 ** (0.5 * ex.randn(N, 1))
    for kind, slot in zip(SEGMENT_KINDS, ex.rng.sample(range(N * num_groups), len(SEGMENT_KINDS))):
        n, g = divmod(slot, num_groups)
        start, stop = g * G, min((g + 1) * G, K)
        w[n, start:stop] = _segment(ex, kind, stop - start)
    return w


# ---------------------------------------------------------------------------------------------------------------------
# 6.1 absmax, 6.2 zero-point, 6.3 per group.
# ---------------------------------------------------------------------------------------------------------------------


def check_absmax_quantize(fn: Callable) -> None:
    """Exercise 6.1. `fn(w, bits) -> (q, scale)`: symmetric (absmax) quantization with one scale per output row.

    w (N, K) float; qmax = 2^(bits-1) - 1; scale (N, 1) float32 = max_k |w[n, k]| / qmax (1.0 for an all-zero row);
    q (N, K) int8 = clamp(round(w / scale), -qmax, qmax). Same as ``minillm.quant.quantize_symmetric(w, bits,
    "channel")``'s ``.q`` and ``.scale``.
    """
    from minillm.quant.numerics import quantize_symmetric

    def call(w, bits):
        return _as_tuple(fn(w, bits), 2, "q, scale")

    def same_as_reference(w, bits, what):
        q, scale = call(w, bits)
        ref = quantize_symmetric(w, bits, "channel")
        # atol=0: scales of 1e-12 must match too (an epsilon added to the scale is invisible at atol=1e-5)
        assert_close(scale, ref.scale, atol=0, rtol=1e-6, what=f"scale ({what}, {bits} bits)")
        assert_equal(q, ref.q, what=f"q ({what}, {bits} bits)")

    def matches(N, K, bits, seed):
        same_as_reference(_weight_with_outliers(N, K, seed), bits, f"{N} x {K}")

    def error_within_half_step():
        w = _weight_with_outliers(12, 40, seed=62)
        q, scale = call(w, 8)
        err = (q.float() * scale - w).abs()
        assert bool((err <= scale / 2 + 1e-6).all()), f"|q * scale - w| exceeds scale / 2 (worst {err.max():.4g})"

    def odd_symmetric():
        w = _weight_with_outliers(8, 32, seed=63)
        q_pos, _ = call(w, 4)
        q_neg, _ = call(-w, 4)
        assert_equal(q_neg, -q_pos, what="q of -w (must be -q: the range is symmetric)")

    def zero_row():
        w = _weight_with_outliers(4, 16, seed=64)
        w[2] = 0
        q, scale = call(w, 8)
        assert not torch.isnan(scale).any() and not torch.isnan(q.float()).any(), "an all-zero row gives NaN"
        assert_equal(q[2], torch.zeros(16, dtype=torch.int8), what="q of an all-zero row")
        assert_close(scale[2], torch.ones(1), atol=0, rtol=0, what="scale of an all-zero row (must be 1.0)")

    def fresh_rows():
        for K in (1, ex.rng.randrange(3, 71, 2)):  # a single column, and an odd width
            w = _fresh_weight(ex, len(SEGMENT_KINDS) + ex.rng.randrange(4), K)
            same_as_reference(w, ex.rng.randint(2, 8), f"fresh {tuple(w.shape)} weight")

    def real_size_boundary_bits():
        w = _fresh_weight(ex, len(SEGMENT_KINDS) + 1, 576)
        for bits in (2, 8):  # qmax = 1 and qmax = 127
            same_as_reference(w, bits, "fresh 9 x 576 weight")

    def properties():
        w = _fresh_weight(ex, len(SEGMENT_KINDS) + 2, ex.rng.randint(2, 64))
        bits = ex.rng.randint(2, 8)
        qmax = 2 ** (bits - 1) - 1
        q, scale = call(w, bits)
        assert bool((q.abs() <= qmax).all()), f"codes outside [-{qmax}, {qmax}] at {bits} bits"
        err = (q.double() * scale.double() - w.double()).abs()
        worst = int((err / scale.double()).argmax())
        assert bool((err <= scale.double() * (0.5 + 1e-4)).all()), (
            f"|q * scale - w| exceeds scale / 2 at flat index {worst} of a fresh {tuple(w.shape)} weight, {bits} bits")
        q_neg, _ = call(-w, bits)
        assert_equal(q_neg, -q, what="q of -w (must be -q)")

    with exercise("6.1", "absmax quantization per output channel") as ex:
        ex.check("int8 of a 16 x 64 weight with outliers matches the reference", lambda: matches(16, 64, 8, seed=60))
        ex.check("4 bits (qmax = 7) matches the reference", lambda: matches(10, 48, 4, seed=61))
        ex.check("every dequantized weight is within half a step", error_within_half_step)
        ex.check("negating w negates q", odd_symmetric)
        ex.check("an all-zero row gets scale 1.0 and codes 0", zero_row)
        ex.check("fresh weights (width 1 and odd; zero, constant, one-sign, tiny, huge rows) match the reference",
                 fresh_rows)
        ex.check("a real-size fresh row (K = 576) at 2 and 8 bits matches the reference", real_size_boundary_bits)
        ex.check("fresh weights: codes in range, within half a step, symmetric", properties)


def check_zero_point_quantize(fn: Callable) -> None:
    """Exercise 6.2. `fn(w, bits) -> (q, scale, zero)`: asymmetric (zero-point) quantization per output row.

    qmax = 2^bits - 1; per row: lo = min(min w, 0), hi = max(max w, 0); scale = (hi - lo) / qmax (1.0 if 0);
    zero = clamp(round(-lo / scale), 0, qmax) (an integer-valued float); q = clamp(round(w / scale) + zero, 0, qmax)
    as uint8. scale, zero (N, 1). Same as ``minillm.quant.quantize_asymmetric(w, bits, "channel")``.
    """
    from minillm.quant.numerics import quantize_asymmetric

    def call(w, bits):
        return _as_tuple(fn(w, bits), 3, "q, scale, zero")

    def matches(w, bits, what):
        q, scale, zero = call(w, bits)
        ref = quantize_asymmetric(w, bits, "channel")
        assert_close(scale, ref.scale, atol=0, rtol=1e-6, what=f"scale ({what})")
        assert_close(zero, ref.zero, atol=0, rtol=0, what=f"zero ({what})")
        assert_equal(q, ref.q, what=f"q ({what})")

    def integer_zero_in_range():
        _, _, zero = call(_weight_with_outliers(12, 32, seed=66), 4)
        assert bool((zero == zero.round()).all()), f"zero-points must be integers, got {zero.flatten()[:4].tolist()}"
        assert bool(((zero >= 0) & (zero <= 15)).all()), "zero-points must be valid 4-bit codes in [0, 15]"

    def zero_is_exact():
        w = _weight_with_outliers(8, 32, seed=67)
        w[:, ::5] = 0.0
        q, scale, zero = call(w, 4)
        deq = (q.float() - zero) * scale
        assert_equal(deq[:, ::5], torch.zeros_like(deq[:, ::5]), what="dequantized exact zeros (0.0 must map to zero)")

    def fresh_rows():
        for K in (1, ex.rng.randrange(3, 71, 2)):
            w = _fresh_weight(ex, len(SEGMENT_KINDS) + ex.rng.randrange(4), K)
            bits = ex.rng.randint(2, 8)
            matches(w, bits, f"fresh {tuple(w.shape)} weight, {bits} bits")

    def real_size_boundary_bits():
        w = _fresh_weight(ex, len(SEGMENT_KINDS) + 1, 576)
        for bits in (2, 8):  # codes [0, 3] and [0, 255]
            matches(w, bits, f"fresh 9 x 576 weight, {bits} bits")

    def properties():
        w = _fresh_weight(ex, len(SEGMENT_KINDS) + 2, ex.rng.randint(2, 64))
        w[ex.randn(*w.shape) > 1.0] = 0.0  # exact zeros scattered over the rows
        bits = ex.rng.randint(2, 8)
        qmax = 2**bits - 1
        q, scale, zero = call(w, bits)
        assert bool((zero == zero.round()).all() and ((zero >= 0) & (zero <= qmax)).all()), (
            f"zero-points must be integers in [0, {qmax}], got {zero.flatten().tolist()}")
        deq = (q.double() - zero.double()) * scale.double()
        assert_equal(deq[w == 0], torch.zeros_like(deq[w == 0]), what="dequantized exact zeros")
        err = (deq - w.double()).abs()
        worst = int((err / scale.double()).argmax())
        assert bool((err <= scale.double() * (0.5 + 1e-4)).all()), (
            f"|(q - zero) * scale - w| exceeds scale / 2 at flat index {worst} of a fresh {tuple(w.shape)} weight")

    with exercise("6.2", "zero-point quantization per output channel") as ex:
        ex.check("4 bits of a 16 x 64 weight matches the reference",
                 lambda: matches(_weight_with_outliers(16, 64, seed=65), 4, "4 bits"))
        ex.check("8 bits of all-positive rows (the range still includes 0)",
                 lambda: matches(_weight_with_outliers(6, 24, seed=68).abs() + 0.5, 8, "8 bits, w > 0"))
        ex.check("zero-points are integers in [0, 2^bits - 1]", integer_zero_in_range)
        ex.check("w = 0.0 dequantizes to exactly 0.0", zero_is_exact)
        ex.check("fresh weights (width 1 and odd; zero, constant, one-sign, tiny, huge rows) match the reference",
                 fresh_rows)
        ex.check("a real-size fresh row (K = 576) at 2 and 8 bits matches the reference", real_size_boundary_bits)
        ex.check("fresh weights: integer zero-points, exact zeros, within half a step", properties)


def group_quantize_ref(w: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, ...]:
    """The reference of exercise 6.3: zero-pad a short last group (zeros never change a range that includes 0),
    quantize per group with ``quantize_asymmetric``, drop the padding. As ``Int4Linear.from_linear`` and
    ``fake_quantize_int4`` store it."""
    from minillm.quant.numerics import quantize_asymmetric

    K = w.shape[1]
    ref = quantize_asymmetric(F.pad(w, (0, -K % group_size)), bits, "group", group_size)
    return ref.q[:, :K], ref.scale, ref.zero


def check_group_quantize(fn: Callable) -> None:
    """Exercise 6.3. `fn(w, bits, group_size) -> (q, scale, zero)`: zero-point quantization per group.

    Groups are `group_size` consecutive weights of a row (along K); each gets the scale and zero-point of exercise
    6.2. When group_size does not divide K the last group of each row is shorter. q (N, K) uint8; scale, zero
    (N, ceil(K / group_size)). Same as ``group_quantize_ref`` above (``quantize_asymmetric(w, bits, "group",
    group_size)`` when group_size divides K).
    """

    def call(w, bits, G):
        return _as_tuple(fn(w, bits, G), 3, "q, scale, zero")

    def same_as_reference(w, bits, G, what):
        q, scale, zero = call(w, bits, G)
        q_ref, scale_ref, zero_ref = group_quantize_ref(w, bits, G)
        what = f"{what}, G = {G}, {bits} bits"
        assert_close(scale, scale_ref, atol=0, rtol=1e-6, what=f"scale ({what})")
        assert_close(zero, zero_ref, atol=0, rtol=0, what=f"zero ({what})")
        assert_equal(q, q_ref, what=f"q ({what})")

    def matches(N, K, bits, G, seed):
        same_as_reference(_weight_with_outliers(N, K, seed), bits, G, f"{N} x {K}")

    def outlier_stays_in_its_group():
        w = _weight_with_outliers(4, 64, seed=73)
        w_out = w.clone()
        w_out[:, 3] = 50.0  # an outlier in group 0 of every row
        q, scale, _ = call(w, 4, 16)
        q_out, scale_out, _ = call(w_out, 4, 16)
        assert_equal(q_out[:, 16:], q[:, 16:], what="codes of groups 1..3 after an outlier in group 0")
        assert_close(scale_out[:, 1:], scale[:, 1:], what="scales of groups 1..3 after an outlier in group 0")

    def fresh_short_last_group():
        G = ex.rng.randint(3, 20)
        K = G * ex.rng.randint(1, 4) + ex.rng.randint(1, G - 1)  # a last group of 1 to G - 1 weights
        num_groups = -(-K // G)
        N = max(ex.rng.randint(2, 5), -(-len(SEGMENT_KINDS) // num_groups))
        same_as_reference(_fresh_weight(ex, N, K, G), ex.rng.randint(2, 8), G, f"fresh {N} x {K} weight")

    def boundary_group_sizes():
        w = _fresh_weight(ex, len(SEGMENT_KINDS), 576)
        bits = ex.rng.choice([(2, 8), (8, 2)])
        same_as_reference(w, bits[0], 1, "fresh 8 x 576 weight, one weight per group")
        same_as_reference(w, bits[1], 576, "fresh 8 x 576 weight, one group per row")

    with exercise("6.3", "per-group quantization") as ex:
        ex.check("4 bits, groups of 32 of an 8 x 128 weight", lambda: matches(8, 128, 4, 32, seed=70))
        ex.check("3 bits, groups of 16 of a 6 x 64 weight", lambda: matches(6, 64, 3, 16, seed=71))
        ex.check("one group per row is per-channel quantization", lambda: matches(5, 40, 4, 40, seed=72))
        ex.check("an outlier only changes its own group", outlier_stays_in_its_group)
        ex.check("SmolLM2's width: K = 576 in groups of 128 leaves a last group of 64",
                 lambda: matches(4, 576, 4, 128, seed=74))
        ex.check("fresh weights with a short last group (zero, constant, one-sign, tiny, huge groups)",
                 fresh_short_last_group)
        ex.check("a real-size fresh row (K = 576) with G = 1 and G = K", boundary_group_sizes)


# ---------------------------------------------------------------------------------------------------------------------
# 6.4 packing.
# ---------------------------------------------------------------------------------------------------------------------


def check_pack_int4(fn: Callable) -> None:
    """Exercise 6.4. `fn(q) -> packed`: two 4-bit codes per byte along the last dim.

    q (..., K) uint8 in [0, 15], K even -> (..., K / 2) uint8 where byte j = q[..., 2j] | (q[..., 2j + 1] << 4):
    column 2j in the low nibble, 2j + 1 in the high one. Same as ``minillm.quant.numerics.pack_int4``.
    """
    from minillm.quant.numerics import pack_int4, unpack_int4

    def codes(*shape, seed):
        return randint(0, 16, *shape, seed=seed).to(torch.uint8)

    def tiny():
        got = fn(torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8))
        assert_equal(got, torch.tensor([[0x21, 0x0F]], dtype=torch.uint8), what="pack([[1, 2, 15, 0]])")

    def round_trip():
        q = codes(3, 5, 18, seed=81)
        assert_equal(unpack_int4(fn(q)), q, what="unpack_int4(your packing)")

    def fresh_shapes():
        r = ex.rng.randint(1, 4)
        shapes = [
            (2 * ex.rng.randint(1, 33),),  # no leading dims
            (1, r, 2 * ex.rng.randrange(1, 34, 2)),  # a size-1 leading dim, an odd number of bytes
            (r, 1, 2),  # one byte per row
        ]
        for shape in shapes:
            q = ex.randint(0, 16, *shape).to(torch.uint8)
            assert_equal(fn(q), pack_int4(q), what=f"packed codes of shape {shape}")

    def extreme_codes():
        n = ex.rng.randint(1, 8)
        for pair, byte in (((0, 0), 0x00), ((15, 15), 0xFF), ((15, 0), 0x0F), ((0, 15), 0xF0), ((8, 7), 0x78)):
            q = torch.tensor(pair, dtype=torch.uint8).repeat(2, n)  # (2, 2n)
            assert_equal(fn(q), torch.full((2, n), byte, dtype=torch.uint8), what=f"pack of codes {pair} repeated")

    with exercise("6.4", "int4 packing") as ex:
        ex.check("[1, 2, 15, 0] packs to bytes 0x21, 0x0F", tiny)
        ex.check("an 8 x 64 code matrix matches the reference",
                 lambda: assert_equal(fn(codes(8, 64, seed=80)), pack_int4(codes(8, 64, seed=80)), what="packed"))
        ex.check("leading dims are kept, and minillm's unpacking inverts it", round_trip)
        ex.check("fresh codes: 1-D, size-1 leading dims, one byte per row", fresh_shapes)
        ex.check("extreme codes: 0 and 15 in either nibble", extreme_codes)


# ---------------------------------------------------------------------------------------------------------------------
# 6.5 AWQ's scale search.
# ---------------------------------------------------------------------------------------------------------------------


def _awq_inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Calibration rows x (64, 128) with 4 input channels 20x louder than the rest, and a weight (48, 128)."""
    x = randn(64, 128, seed=seed)
    loud = torch.randperm(128, generator=generator(seed + 1))[:4]
    x[:, loud] *= 20
    return x, randn(48, 128, seed=seed + 2)


def _awq_scale(x: torch.Tensor, alpha: float) -> torch.Tensor:
    s = x.abs().mean(0).pow(alpha).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def check_awq_search(fn: Callable) -> None:
    """Exercise 6.5. `fn(x, weight, group_size, num_grid) -> (s, alpha, losses)`: AWQ's scale search for one layer.

    x (n, K) calibration inputs, weight (N, K). x_mean = mean |x| over rows (K,). For every alpha in
    ``torch.linspace(0, 1, num_grid + 1).tolist()``: s = x_mean ** alpha clamped to >= 1e-4, then
    s = s / sqrt(s.max() * s.min()); W_q = fake_quantize_int4(weight * s, group_size) (from minillm.quant.awq);
    loss = mean((x / s) @ W_q^T - x @ weight^T)^2 as a float. Returns the s and alpha of the smallest loss (the first
    one on ties) and the list of all losses. Same as ``minillm.quant.awq.search_scale(x.abs().mean(0), x, weight,
    group_size, num_grid)``.
    """
    from minillm.quant.awq import fake_quantize_int4, search_scale

    def call(x, weight, G, num_grid):
        return _as_tuple(fn(x, weight, G, num_grid), 3, "s, alpha, losses")

    def same_as_reference(x, weight, G, num_grid, what):
        s, alpha, losses = call(x, weight, G, num_grid)
        _, _, losses_ref = search_scale(x.abs().mean(0), x, weight, G, num_grid)
        what = f"{what}, G = {G}, {num_grid + 1} alphas"
        assert isinstance(losses, (list, tuple)), f"losses: expected a list of floats, got {_describe(losses)}"
        assert_close(torch.tensor([float(v) for v in losses]), torch.tensor(losses_ref), rtol=1e-4, atol=1e-7,
                     what=f"losses ({what})")
        # The reference's alpha, or one whose loss ties with the smallest to float precision (an answer that sums in
        # another order may break a near-tie the other way; exact ties are checked on their own below).
        alphas = torch.linspace(0, 1, num_grid + 1).tolist()
        best = min(losses_ref)
        allowed = [a for a, loss in zip(alphas, losses_ref) if loss <= best * (1 + 1e-5)]
        shown = [f"{v:.4g}" for v in losses_ref]
        assert any(abs(float(alpha) - a) <= 1e-6 for a in allowed), (
            f"best alpha ({what}): got {float(alpha)}, expected {allowed[0]} (losses {shown})")
        assert_close(s, _awq_scale(x, float(alpha)), rtol=1e-4, atol=1e-6, what=f"best s ({what})")

    def matches(G, num_grid, seed):
        x, weight = _awq_inputs(seed)
        same_as_reference(x, weight, G, num_grid, "64 x 128 inputs")

    def alpha_zero_is_round_to_nearest():
        x, weight = _awq_inputs(92)
        _, _, losses = call(x, weight, 32, 4)
        rtn = (x @ fake_quantize_int4(weight, 32).t() - x @ weight.t()).pow(2).mean().item()
        assert_close(float(losses[0]), rtn, rtol=1e-4, what="loss at alpha = 0 (s = 1: plain round to nearest)")

    def helps_on_loud_channels():
        x, weight = _awq_inputs(93)
        _, alpha, losses = call(x, weight, 32, 10)
        assert float(alpha) > 0 and min(losses) < losses[0], (
            f"with 4 loud input channels the search should pick alpha > 0 and beat round to nearest; "
            f"got alpha {float(alpha)}, losses[0] {losses[0]:.4g}, min {min(losses):.4g}")

    def fresh_with_dead_channel():
        G = ex.rng.choice([16, 32])
        K = G * ex.rng.randint(1, 3) + ex.rng.randint(1, G - 1)  # a short last group
        n, N = ex.rng.randint(1, 24), ex.rng.randint(1, 24)
        x = ex.randn(n, K) * 10 ** ex.rng.uniform(-1, 1)
        channels = ex.rng.sample(range(K), 5)
        x[:, channels[:4]] *= ex.rng.uniform(10, 50)  # loud channels
        x[:, channels[4]] = 0.0  # a dead channel: mean |x| = 0, so s needs its clamp
        same_as_reference(x, ex.randn(N, K), G, ex.rng.randint(1, 8), f"fresh {n} x {K} inputs, a dead channel")

    def ties_pick_the_first():
        K, G = ex.rng.randint(17, 70), 16
        x = torch.where(ex.randn(ex.rng.randint(2, 16), K) < 0, -1.0, 1.0)  # mean |x| = 1 in every channel
        s, alpha, losses = call(x, ex.randn(ex.rng.randint(2, 16), K), G, 4)
        assert len({float(v) for v in losses}) == 1, (
            f"with mean |x| = 1 in every channel s = 1 for every alpha, so all losses are equal; got {list(losses)}")
        assert_close(float(alpha), 0.0, atol=0, what="best alpha when all losses tie (the first one)")
        assert_close(s, torch.ones(K), what="best s when all losses tie")

    with exercise("6.5", "AWQ's scale search for one layer") as ex:
        ex.check("losses, alpha and s match the reference (G = 32, 11 alphas)", lambda: matches(32, 10, seed=90))
        ex.check("the same with G = 64 and 5 alphas", lambda: matches(64, 4, seed=91))
        ex.check("alpha = 0 is round to nearest", alpha_zero_is_round_to_nearest)
        ex.check("loud channels make a scale worth it", helps_on_loud_channels)
        ex.check("fresh inputs with a dead input channel and a short last group match the reference",
                 fresh_with_dead_channel)
        ex.check("when every alpha gives the same loss, the first one wins", ties_pick_the_first)


# ---------------------------------------------------------------------------------------------------------------------
# 6.6 the int4 dequantize-inside-GEMV kernel.
# ---------------------------------------------------------------------------------------------------------------------

PAD_ROWS, PAD_COLS = 64, 64  # poisoned padding around every input of 6.6, wider than any tile reads past an edge


def _poisoned(t: torch.Tensor, fill: float) -> torch.Tensor:
    """`t` (R, C) as a view into a larger buffer whose padding holds `fill`: a read past an edge finds poison (NaN or
    out-of-range codes) instead of another tensor's memory, and rows have a stride bigger than their length."""
    buf = torch.full((t.shape[0] + PAD_ROWS, t.shape[1] + PAD_COLS), fill, dtype=t.dtype, device=t.device)
    buf[: t.shape[0], : t.shape[1]] = t
    return buf[: t.shape[0], : t.shape[1]]


def _int4_case(M: int, N: int, K: int, G: int, gen: torch.Generator, device: str) -> tuple[torch.Tensor, ...]:
    """x (M, K) fp32 and an int4 weight (N, K) stored as Int4Linear stores it: qweight (N, K / 2) uint8 (low nibble
    first), scales (N, ceil(K / G)) fp16, zeros (N, ceil(K / G)) uint8. Random codes, zero-points and scales."""
    from minillm.quant.numerics import pack_int4

    num_groups = -(-K // G)
    x = torch.randn(M, K, generator=gen)
    qweight = pack_int4(torch.randint(0, 16, (N, K), generator=gen))
    scales = (torch.rand(N, num_groups, generator=gen) * 0.2 + 0.01).half()
    zeros = torch.randint(0, 16, (N, num_groups), generator=gen).to(torch.uint8)
    return (
        _poisoned(x.to(device), float("nan")),
        _poisoned(qweight.to(device), 0xFF),
        _poisoned(scales.to(device), float("nan")),
        _poisoned(zeros.to(device), 0xFF),
    )


def check_int4_gemv_kernel(fn: Callable) -> None:
    """Exercise 6.6. `fn(x, qweight, scales, zeros, group_size) -> out`: x (M, K) fp32 @ W^T -> (M, N) fp32, where
    w[n, k] = (code[n, k] - zeros[n, k // G]) * scales[n, k // G] and code[n, k] is nibble k % 2 (low first) of
    qweight[n, k // 2], computed by a Triton kernel that dequantizes inside the GEMV.

    The inputs are views into larger buffers (row strides bigger than the rows) whose padding is poison. Runs on
    CUDA when available, else on the CPU in Triton's interpreter, which importing minillm switches on when there is
    no GPU (before the learner's kernel is defined). Same as ``minillm.quant.kernels.dequant_gemv_ref(x, qweight,
    scales, zeros, 4, group_size)``.
    """
    from minillm.quant.kernels import dequant_gemv_ref

    device = triton_device("Exercise 6.6 (int4 dequantize-inside-GEMV kernel)")

    def run(*args):
        return call_kernel(fn, *args)

    def case(M, N, K, G, gen, what):
        x, qweight, scales, zeros = _int4_case(M, N, K, G, gen, device)
        out = run(x, qweight, scales, zeros, G)
        assert_shape(out, (M, N), what=f"out ({what})")
        expected = dequant_gemv_ref(x, qweight, scales, zeros, 4, G)
        assert_close(out, expected, atol=1e-4, rtol=1e-4, what=f"out ({what}: M={M}, N={N}, K={K}, G={G})")

    def fresh(num_cases):
        for _ in range(num_cases):
            K = 2 * ex.rng.randint(1, 50)
            G = ex.rng.choice([1, ex.rng.randint(2, K), K])
            gen = generator(ex.rng.randrange(2**31))
            case(ex.rng.randint(1, 2), ex.rng.randint(1, 40), K, G, gen, "fresh shapes, codes and scales")

    with exercise("6.6", "int4 dequantize-inside-GEMV kernel") as ex:
        ex.check("one row, K = 64 in groups of 32, N = 24 (a partial block of outputs)",
                 lambda: case(1, 24, 64, 32, generator(100), "aligned groups"))
        ex.check("a K tail and a short last group: K = 72 = 2 x 32 + 8, two rows of x",
                 lambda: case(2, 40, 72, 32, generator(101), "short last group"))
        ex.check("groups smaller than a K tile and not dividing it: K = 100, G = 24",
                 lambda: case(1, 17, 100, 24, generator(102), "G = 24"))
        ex.check("fresh shapes, codes, zero-points and scales (G = 1, G = K, or anything between)",
                 lambda: fresh(2))
