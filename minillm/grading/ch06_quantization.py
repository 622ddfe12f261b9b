"""Chapter 6 checks (quantization), used by solutions/06_quantization.ipynb.

Every check has a plausible wrong answer in tests/test_grading.py that it must reject.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from minillm.grading.framework import (
    _describe,
    assert_close,
    assert_equal,
    exercise,
    generator,
    randint,
    randn,
)


__all__ = [  # the checks, re-exported by minillm.grading
    "check_absmax_quantize",
    "check_zero_point_quantize",
    "check_group_quantize",
    "check_pack_int4",
    "check_awq_search",
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


def check_absmax_quantize(fn: Callable) -> None:
    """Exercise 6.1. `fn(w, bits) -> (q, scale)`: symmetric (absmax) quantization with one scale per output row.

    w (N, K) float; qmax = 2^(bits-1) - 1; scale (N, 1) float32 = max_k |w[n, k]| / qmax (1.0 for an all-zero row);
    q (N, K) int8 = clamp(round(w / scale), -qmax, qmax). Same as ``minillm.quant.quantize_symmetric(w, bits,
    "channel")``'s ``.q`` and ``.scale``.
    """
    from minillm.quant.numerics import quantize_symmetric

    def matches(N, K, bits, seed):
        w = _weight_with_outliers(N, K, seed)
        q, scale = _as_tuple(fn(w, bits), 2, "q, scale")
        ref = quantize_symmetric(w, bits, "channel")
        assert_close(scale, ref.scale, what=f"scale ({bits} bits)")
        assert_equal(q, ref.q, what=f"q ({bits} bits)")

    def error_within_half_step():
        w = _weight_with_outliers(12, 40, seed=62)
        q, scale = _as_tuple(fn(w, 8), 2, "q, scale")
        err = (q.float() * scale - w).abs()
        assert bool((err <= scale / 2 + 1e-6).all()), f"|q * scale - w| exceeds scale / 2 (worst {err.max():.4g})"

    def odd_symmetric():
        w = _weight_with_outliers(8, 32, seed=63)
        q_pos, _ = _as_tuple(fn(w, 4), 2, "q, scale")
        q_neg, _ = _as_tuple(fn(-w, 4), 2, "q, scale")
        assert_equal(q_neg, -q_pos, what="q of -w (must be -q: the range is symmetric)")

    def zero_row():
        w = _weight_with_outliers(4, 16, seed=64)
        w[2] = 0
        q, scale = _as_tuple(fn(w, 8), 2, "q, scale")
        assert not torch.isnan(scale).any() and not torch.isnan(q.float()).any(), "an all-zero row gives NaN"
        assert_equal(q[2], torch.zeros(16, dtype=torch.int8), what="q of an all-zero row")

    with exercise("6.1", "absmax quantization per output channel") as ex:
        ex.check("int8 of a 16 x 64 weight with outliers matches the reference", lambda: matches(16, 64, 8, seed=60))
        ex.check("4 bits (qmax = 7) matches the reference", lambda: matches(10, 48, 4, seed=61))
        ex.check("every dequantized weight is within half a step", error_within_half_step)
        ex.check("negating w negates q", odd_symmetric)
        ex.check("an all-zero row does not divide by zero", zero_row)


def check_zero_point_quantize(fn: Callable) -> None:
    """Exercise 6.2. `fn(w, bits) -> (q, scale, zero)`: asymmetric (zero-point) quantization per output row.

    qmax = 2^bits - 1; per row: lo = min(min w, 0), hi = max(max w, 0); scale = (hi - lo) / qmax (1.0 if 0);
    zero = clamp(round(-lo / scale), 0, qmax) (an integer-valued float); q = clamp(round(w / scale) + zero, 0, qmax)
    as uint8. scale, zero (N, 1). Same as ``minillm.quant.quantize_asymmetric(w, bits, "channel")``.
    """
    from minillm.quant.numerics import quantize_asymmetric

    def matches(w, bits, what):
        q, scale, zero = _as_tuple(fn(w, bits), 3, "q, scale, zero")
        ref = quantize_asymmetric(w, bits, "channel")
        assert_close(scale, ref.scale, what=f"scale ({what})")
        assert_close(zero, ref.zero, what=f"zero ({what})")
        assert_equal(q, ref.q, what=f"q ({what})")

    def integer_zero_in_range():
        _, _, zero = _as_tuple(fn(_weight_with_outliers(12, 32, seed=66), 4), 3, "q, scale, zero")
        assert bool((zero == zero.round()).all()), f"zero-points must be integers, got {zero.flatten()[:4].tolist()}"
        assert bool(((zero >= 0) & (zero <= 15)).all()), "zero-points must be valid 4-bit codes in [0, 15]"

    def zero_is_exact():
        w = _weight_with_outliers(8, 32, seed=67)
        w[:, ::5] = 0.0
        q, scale, zero = _as_tuple(fn(w, 4), 3, "q, scale, zero")
        deq = (q.float() - zero) * scale
        assert_equal(deq[:, ::5], torch.zeros_like(deq[:, ::5]), what="dequantized exact zeros (0.0 must map to zero)")

    with exercise("6.2", "zero-point quantization per output channel") as ex:
        ex.check("4 bits of a 16 x 64 weight matches the reference",
                 lambda: matches(_weight_with_outliers(16, 64, seed=65), 4, "4 bits"))
        ex.check("8 bits of all-positive rows (the range still includes 0)",
                 lambda: matches(_weight_with_outliers(6, 24, seed=68).abs() + 0.5, 8, "8 bits, w > 0"))
        ex.check("zero-points are integers in [0, 2^bits - 1]", integer_zero_in_range)
        ex.check("w = 0.0 dequantizes to exactly 0.0", zero_is_exact)


def check_group_quantize(fn: Callable) -> None:
    """Exercise 6.3. `fn(w, bits, group_size) -> (q, scale, zero)`: zero-point quantization per group.

    Groups are `group_size` consecutive weights of a row (along K, which group_size divides); each gets the scale and
    zero-point of exercise 6.2. q (N, K) uint8; scale, zero (N, K // group_size). Same as
    ``minillm.quant.quantize_asymmetric(w, bits, "group", group_size)``.
    """
    from minillm.quant.numerics import quantize_asymmetric

    def matches(N, K, bits, G, seed):
        w = _weight_with_outliers(N, K, seed)
        q, scale, zero = _as_tuple(fn(w, bits, G), 3, "q, scale, zero")
        ref = quantize_asymmetric(w, bits, "group", G)
        assert_close(scale, ref.scale, what=f"scale (G = {G})")
        assert_close(zero, ref.zero, what=f"zero (G = {G})")
        assert_equal(q, ref.q, what=f"q (G = {G})")

    def outlier_stays_in_its_group():
        w = _weight_with_outliers(4, 64, seed=73)
        w_out = w.clone()
        w_out[:, 3] = 50.0  # an outlier in group 0 of every row
        q, scale, _ = _as_tuple(fn(w, 4, 16), 3, "q, scale, zero")
        q_out, scale_out, _ = _as_tuple(fn(w_out, 4, 16), 3, "q, scale, zero")
        assert_equal(q_out[:, 16:], q[:, 16:], what="codes of groups 1..3 after an outlier in group 0")
        assert_close(scale_out[:, 1:], scale[:, 1:], what="scales of groups 1..3 after an outlier in group 0")

    with exercise("6.3", "per-group quantization") as ex:
        ex.check("4 bits, groups of 32 of an 8 x 128 weight", lambda: matches(8, 128, 4, 32, seed=70))
        ex.check("3 bits, groups of 16 of a 6 x 64 weight", lambda: matches(6, 64, 3, 16, seed=71))
        ex.check("one group per row is per-channel quantization", lambda: matches(5, 40, 4, 40, seed=72))
        ex.check("an outlier only changes its own group", outlier_stays_in_its_group)


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

    with exercise("6.4", "int4 packing") as ex:
        ex.check("[1, 2, 15, 0] packs to bytes 0x21, 0x0F", tiny)
        ex.check("an 8 x 64 code matrix matches the reference",
                 lambda: assert_equal(fn(codes(8, 64, seed=80)), pack_int4(codes(8, 64, seed=80)), what="packed"))
        ex.check("leading dims are kept, and minillm's unpacking inverts it", round_trip)


def _awq_inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Calibration rows x (64, 128) with 4 input channels 20x louder than the rest, and a weight (48, 128)."""
    x = randn(64, 128, seed=seed)
    loud = torch.randperm(128, generator=generator(seed + 1))[:4]
    x[:, loud] *= 20
    return x, randn(48, 128, seed=seed + 2)


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

    def matches(G, num_grid, seed):
        x, weight = _awq_inputs(seed)
        s, alpha, losses = _as_tuple(fn(x, weight, G, num_grid), 3, "s, alpha, losses")
        s_ref, alpha_ref, losses_ref = search_scale(x.abs().mean(0), x, weight, G, num_grid)
        assert_close(torch.tensor(list(losses)), torch.tensor(losses_ref), rtol=1e-4, atol=1e-7,
                     what=f"losses (G = {G}, {num_grid + 1} alphas)")
        assert_close(float(alpha), alpha_ref, atol=1e-6, what="best alpha")
        assert_close(s, s_ref, rtol=1e-4, atol=1e-6, what="best s")

    def alpha_zero_is_round_to_nearest():
        x, weight = _awq_inputs(92)
        _, _, losses = _as_tuple(fn(x, weight, 32, 4), 3, "s, alpha, losses")
        rtn = (x @ fake_quantize_int4(weight, 32).t() - x @ weight.t()).pow(2).mean().item()
        assert_close(float(losses[0]), rtn, rtol=1e-4, what="loss at alpha = 0 (s = 1: plain round to nearest)")

    def helps_on_loud_channels():
        x, weight = _awq_inputs(93)
        _, alpha, losses = _as_tuple(fn(x, weight, 32, 10), 3, "s, alpha, losses")
        assert float(alpha) > 0 and min(losses) < losses[0], (
            f"with 4 loud input channels the search should pick alpha > 0 and beat round to nearest; "
            f"got alpha {float(alpha)}, losses[0] {losses[0]:.4g}, min {min(losses):.4g}")

    with exercise("6.5", "AWQ's scale search for one layer") as ex:
        ex.check("losses, alpha and s match the reference (G = 32, 11 alphas)", lambda: matches(32, 10, seed=90))
        ex.check("the same with G = 64 and 5 alphas", lambda: matches(64, 4, seed=91))
        ex.check("alpha = 0 is round to nearest", alpha_zero_is_round_to_nearest)
        ex.check("loud channels make a scale worth it", helps_on_loud_channels)
