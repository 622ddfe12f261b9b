"""Chapter 7 checks (pruning), used by solutions/07_pruning.ipynb.

Each check runs fixed cases and fresh random ones (``ex.randn``/``ex.rng``, a new seed every run): odd shapes and
size 1, sparsities whose product with the row length is not whole (the count is rounded as the package rounds it,
``magnitude.num_pruned_per_row``), all-zero rows and ties, extreme magnitudes, loud input channels. Where ties or
rounding make more than one mask right, the check tests properties (exact count per row or group, the kept entries
are the largest by the score) instead of equality with the reference. Every check has plausible wrong answers in
tests/answers/ch07_pruning.py that it must reject.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from minillm.grading.framework import (
    Exercise,
    assert_close,
    assert_equal,
    assert_shape,
    exercise,
    generator,
    randn,
)

__all__ = [  # the checks, re-exported by minillm.grading
    "check_magnitude_mask",
    "check_wanda_mask",
    "check_nm_mask",
    "check_prune_mlp_channels",
]


# ---------------------------------------------------------------------------------------------------------------------
# Shared helpers: inputs, random draws, and the properties every mask must have.
# ---------------------------------------------------------------------------------------------------------------------


def _rows_of_different_scales(out_features: int, in_features: int, seed: int) -> torch.Tensor:
    """A weight whose rows differ in scale by 100x, like real layers: a global threshold would empty the small rows."""
    scale = torch.logspace(-1, 1, out_features)[:, None]
    return randn(out_features, in_features, seed=seed) * scale


def _num_pruned(width: int, sparsity: float) -> int:
    from minillm.prune.magnitude import num_pruned_per_row

    return num_pruned_per_row(width, sparsity)


def _rounding(width: int, sparsity: float) -> str:
    """How the package counts, for messages: 'round(0.7 * 37) = round(25.9) = 26'."""
    product, count = sparsity * width, _num_pruned(width, sparsity)
    if product == int(product):
        return f"{sparsity:g} * {width} = {count}"
    text = f"round({sparsity:g} * {width}) = round({product:.4g}) = {count}"
    if product % 1 == 0.5:
        text += " (Python's round, like torch.round, takes an exact half to the even integer)"
    return text


def _odd_size(ex: Exercise, high: int) -> int:
    """1, or an odd size up to `high` (sizes that are not multiples of anything nice)."""
    return ex.rng.choice([1, ex.rng.randrange(3, high + 1, 2)])


def _fractional_sparsity(ex: Exercise, width: int, above_half: bool, keep_one: bool = False) -> float:
    """A sparsity whose product with `width` is not whole: (k + u) / width with u in (0.05, 0.45) or (0.55, 0.95).

    keep_one: k < width - 1, so that at least one entry survives the rounding (for width > 1).
    """
    u = ex.rng.uniform(0.55, 0.95) if above_half else ex.rng.uniform(0.05, 0.45)
    return (ex.rng.randrange(max(width - 1, 1) if keep_one else width) + u) / width


def _sparsity_near_one(ex: Exercise, width: int) -> float:
    """A sparsity in [0.9, 1): a row keeps one weight, none, or a few."""
    return min(ex.rng.uniform(0.9, 1.0), 1 - 1e-6) if width > 1 else ex.rng.uniform(0.55, 0.95)


def _integer_weight(ex: Exercise, out_features: int, in_features: int) -> torch.Tensor:
    """Small integers in [-2, 2] (many exact ties, equal |W| of opposite signs), with some rows all zero."""
    weight = ex.randint(-2, 3, out_features, in_features).float()
    weight[ex.randint(0, 2, out_features).bool()] = 0.0  # about half the rows all zero
    return weight


def _leaves_inputs_alone(fn: Callable, names: tuple[str, ...]) -> Callable:
    """`fn`, checked on every call not to change its tensor arguments in place (``weight.abs_()``, zeroing the
    pruned weights): a mask function that does corrupts the model it is asked about."""

    def call(*args):
        before = [a.clone() if isinstance(a, torch.Tensor) else None for a in args]
        got = fn(*args)
        for name, a, b in zip(names, args, before):
            if b is not None and not torch.equal(a, b):
                raise AssertionError(
                    f"your function changed its argument `{name}` in place; compute on a copy (`{name}.abs()`, not "
                    f"`{name}.abs_()`) and leave the caller's tensor as it was"
                )
        return got

    return call


def _assert_mask(got: Any, shape: tuple[int, ...], what: str = "mask") -> None:
    assert_shape(got, shape, what=what)
    assert_equal(got.dtype, torch.bool, what=f"{what} dtype (a keep-mask: True = keep)")


def _assert_row_counts(mask: torch.Tensor, num_kept: int, what: str) -> None:
    kept = mask.sum(dim=1)
    bad = (kept != num_kept).nonzero().flatten().tolist()
    assert not bad, (
        f"{what}: every row must keep exactly {num_kept} of {mask.shape[1]} weights, but rows {bad[:5]} keep "
        f"{kept[bad[:5]].tolist()}"
    )


def _assert_pruned_per_row(mask: torch.Tensor, sparsity: float, what: str) -> None:
    in_features = mask.shape[1]
    _assert_row_counts(mask, in_features - _num_pruned(in_features, sparsity),
                       what=f"{what}: {_rounding(in_features, sparsity)} dropped per row")


def _assert_keeps_largest(score: torch.Tensor, mask: torch.Tensor, what: str, rtol: float = 0.0) -> None:
    """In every row, the smallest kept score is at least the largest dropped one (ties either way are fine).

    `rtol` forgives near-ties within rounding of the score, for learners who compute it in another order or dtype.
    """
    score = score.double()
    kept_min = score.masked_fill(~mask, float("inf")).amin(dim=1)
    dropped_max = score.masked_fill(mask, float("-inf")).amax(dim=1)
    slack = torch.where(dropped_max.isfinite(), rtol * dropped_max.abs(), torch.zeros_like(dropped_max))
    bad = (kept_min < dropped_max - slack).nonzero().flatten().tolist()
    assert not bad, (
        f"{what}: rows {bad[:5]} keep a weight whose score is smaller than one they drop "
        f"(row {bad[0]}: kept min {kept_min[bad[0]].item():.6g} < dropped max {dropped_max[bad[0]].item():.6g})"
    )


def _assert_row_mask(score: torch.Tensor, mask: Any, sparsity: float, what: str, rtol: float = 0.0) -> None:
    """A right per-row mask of `score` when ties or rounding allow several: exact count per row, largest kept."""
    _assert_mask(mask, tuple(score.shape))
    _assert_pruned_per_row(mask, sparsity, what=what)
    _assert_keeps_largest(score, mask, what=what, rtol=rtol)


# ---------------------------------------------------------------------------------------------------------------------
# Exercise 7.1: the per-row magnitude mask.
# ---------------------------------------------------------------------------------------------------------------------


def check_magnitude_mask(fn: Callable) -> None:
    """Exercise 7.1. `fn(weight, sparsity) -> mask`: per-row magnitude pruning of one weight.

    weight (out, in) float; sparsity in [0, 1). Returns a bool keep-mask (out, in) that drops, in every row, the
    ``round(sparsity * in)`` weights of smallest ``|W|``. Same contract as ``minillm.prune.magnitude_mask``.
    """
    fn = _leaves_inputs_alone(fn, ("weight", "sparsity"))
    from minillm.prune import magnitude_mask

    def matches(weight, sparsity):
        got = fn(weight, sparsity)
        _assert_mask(got, tuple(weight.shape))
        assert_equal(got, magnitude_mask(weight, sparsity),
                     what=f"mask of a {weight.shape[0]} x {weight.shape[1]} weight at sparsity {sparsity:g}")

    def fixed(out_features, in_features, sparsity, seed):
        return lambda: matches(_rows_of_different_scales(out_features, in_features, seed), sparsity)

    def exact_per_row():
        # 0.3 * 37 = 11.1 and 0.7 * 37 = 25.9 round to 11 and 26; 0.5 * 5 = 2.5 and 0.5 * 7 = 3.5 round to even.
        cases = [(37, 0.3), (37, 0.7), (5, 0.5), (7, 0.5), (10, 0.25)]
        for above_half in (False, True, False, True):
            width = ex.rng.randrange(3, 80)
            cases.append((width, _fractional_sparsity(ex, width, above_half)))
        for in_features, sparsity in cases:
            weight = ex.randn(3, in_features)
            mask = fn(weight, sparsity)
            _assert_mask(mask, tuple(weight.shape))
            _assert_pruned_per_row(mask, sparsity, what=f"sparsity {sparsity:g} of {in_features} inputs")

    def keeps_largest():
        weight = _rows_of_different_scales(12, 64, seed=73)
        _assert_keeps_largest(weight.abs(), fn(weight, 0.75), what="|W| at sparsity 0.75")

    def negative_weights_count_by_size():
        weight = -_rows_of_different_scales(8, 32, seed=74).abs()  # all negative: |W| ranks them, not W
        assert_equal(fn(weight, 0.5), magnitude_mask(weight, 0.5), what="mask of an all-negative weight")

    def sparsity_zero():
        matches(_rows_of_different_scales(8, 16, seed=75), 0.0)
        matches(ex.randn(_odd_size(ex, 9), _odd_size(ex, 65)), 0.0)

    def random_odd_shapes():
        shapes = [(1, 1), (1, _odd_size(ex, 65)), (_odd_size(ex, 9), 1)]
        shapes += [(_odd_size(ex, 13), ex.rng.randrange(2, 90)) for _ in range(4)]
        for i, (out_features, in_features) in enumerate(shapes):
            sparsity = _fractional_sparsity(ex, in_features, above_half=i % 2 == 1)
            matches(ex.randn(out_features, in_features) * ex.randn(out_features, 1).abs(), sparsity)

    def ties_and_zero_rows():
        weight = torch.tensor([[0.0] * 7, [1.0] * 7, [-1.0, 1.0] * 3 + [1.0], [2.0, -1.0, 0.0, 1.0, -2.0, 1.0, 0.0]])
        _assert_row_mask(weight.abs(), fn(weight, 0.3), 0.3, what="all-zero, all-equal and tied rows at 0.3")
        for above_half in (False, True):
            in_features = ex.rng.randrange(3, 40)
            weight = _integer_weight(ex, ex.rng.randrange(2, 9), in_features)
            sparsity = _fractional_sparsity(ex, in_features, above_half)
            _assert_row_mask(weight.abs(), fn(weight, sparsity), sparsity, what="integer weights with zero rows")
        weight = ex.randn(_odd_size(ex, 9), ex.rng.randrange(8, 70), dtype=torch.float16)  # float16: many ties
        sparsity = _fractional_sparsity(ex, weight.shape[1], above_half=True)
        _assert_row_mask(weight.abs(), fn(weight, sparsity), sparsity, what="a float16 weight")

    def near_one():
        matches(_rows_of_different_scales(4, 37, seed=76), 0.99)  # round(36.63) = 37: every weight goes
        for _ in range(3):
            in_features = ex.rng.randrange(1, 70)
            matches(ex.randn(_odd_size(ex, 9), in_features), _sparsity_near_one(ex, in_features))

    def extreme_magnitudes():
        weight = randn(6, 24, seed=77) * torch.tensor([1e-30, 1e-20, 1e-5, 1e5, 1e20, 1e30])[:, None]
        matches(weight, 0.5)
        out_features = ex.rng.randrange(2, 9)
        scale = torch.tensor([10.0 ** ex.rng.uniform(-30, 30) for _ in range(out_features)])[:, None]
        in_features = ex.rng.randrange(3, 50)
        matches(ex.randn(out_features, in_features) * scale, _fractional_sparsity(ex, in_features, True))

    with exercise("7.1", "a per-row magnitude mask") as ex:
        ex.check("50% of a 64 x 64 weight matches the reference", fixed(64, 64, 0.5, seed=70))
        ex.check("25% of a 24 x 48 weight whose rows differ in scale", fixed(24, 48, 0.25, seed=71))
        ex.check("every row loses exactly round(sparsity * in) weights, also when sparsity * in is not whole",
                 exact_per_row)
        ex.check("each row keeps its largest |W|", keeps_largest)
        ex.check("the sign does not matter: large negative weights are kept", negative_weights_count_by_size)
        ex.check("sparsity 0 keeps everything", sparsity_zero)
        ex.check("fresh random weights of odd shapes (1 x 1, one row, one column) match the reference",
                 random_odd_shapes)
        ex.check("ties and all-zero rows: exact count per row, never a smaller |W| kept over a larger",
                 ties_and_zero_rows)
        ex.check("sparsity near 1 (a row may lose every weight) matches the reference", near_one)
        ex.check("weights from 1e-30 to 1e30 match the reference", extreme_magnitudes)


# ---------------------------------------------------------------------------------------------------------------------
# Exercise 7.2: the Wanda mask.
# ---------------------------------------------------------------------------------------------------------------------


def _wanda_inputs(num_tokens: int, in_features: int, seed: int) -> torch.Tensor:
    """Calibration inputs (N, in) with a few outlier channels 30x louder than the rest, as in real LLM layers."""
    x = randn(num_tokens, in_features, seed=seed)
    outliers = torch.randperm(in_features, generator=generator(seed + 1))[:3]
    x[:, outliers] *= 30
    return x


def _input_norm(x: torch.Tensor) -> torch.Tensor:
    """(in,) float64: the L2 norm of every input feature over all tokens, as ``InputNormCollector`` accumulates it."""
    return x.reshape(-1, x.shape[-1]).double().pow(2).sum(dim=0).sqrt()


def _wanda_mask_ref(weight: torch.Tensor, x: torch.Tensor, sparsity: float) -> torch.Tensor:
    from minillm.prune import row_mask, wanda_score

    return row_mask(wanda_score(weight, _input_norm(x).float()), sparsity)


def _wanda_true_score(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return weight.double().abs() * _input_norm(x)[None, :]  # (out, in) float64


def check_wanda_mask(fn: Callable) -> None:
    """Exercise 7.2. `fn(weight, x, sparsity) -> mask`: the Wanda keep-mask of one linear layer.

    weight (out, in); x (..., in): the layer's inputs on calibration tokens (any leading dims: every token is one
    sample). Score ``S_ij = |W_ij| * ||X_j||_2`` with the L2 norm of input feature j over all tokens; drop the
    ``round(sparsity * in)`` lowest scores of every output row. Returns a bool keep-mask (out, in).
    """
    fn = _leaves_inputs_alone(fn, ("weight", "x", "sparsity"))

    def matches(weight, x, sparsity, what):
        got = fn(weight, x, sparsity)
        _assert_mask(got, tuple(weight.shape))
        assert_equal(got, _wanda_mask_ref(weight, x, sparsity), what=what)

    def is_right_mask(weight, x, sparsity, what, rtol=1e-5):
        """Count and ranking against the float64 score: a norm computed in another order may flip a near-tie."""
        _assert_row_mask(_wanda_true_score(weight, x), fn(weight, x, sparsity), sparsity, what=what, rtol=rtol)

    def square():
        weight, x = _rows_of_different_scales(48, 48, seed=80), _wanda_inputs(96, 48, seed=81)
        matches(weight, x, 0.5, what="mask of a 48 x 48 weight at sparsity 0.5")

    def rectangular():
        weight, x = _rows_of_different_scales(20, 64, seed=82), _wanda_inputs(50, 64, seed=83)
        matches(weight, x, 0.25, what="mask of a 20 x 64 weight at sparsity 0.25")

    def batched_tokens():
        weight, x = _rows_of_different_scales(16, 32, seed=84), _wanda_inputs(3 * 10, 32, seed=85)
        matches(weight, x.reshape(3, 10, 32), 0.5, what="mask with x of shape (B=3, T=10, in=32)")

    def outlier_channel_survives():
        weight = randn(32, 64, seed=86)
        x = randn(40, 64, seed=87)
        x[:, 5] *= 1000  # one loud input channel
        weight[:, 5] = 0.02 * weight[:, 5].sign()  # small weights: magnitude pruning would drop all of them
        mask = fn(weight, x, 0.5)
        _assert_mask(mask, tuple(weight.shape))
        assert bool(mask[:, 5].all()), (
            f"input channel 5 carries activations 1000x larger than the rest; Wanda keeps its weights, "
            f"but the mask drops {int((~mask[:, 5]).sum())} of its 32"
        )

    def scale_free():
        weight, x = _rows_of_different_scales(24, 40, seed=88), _wanda_inputs(30, 40, seed=89)
        assert_equal(fn(weight, 7.0 * x, 0.5), fn(weight, x, 0.5), what="mask after scaling x by 7")

    def exact_per_row():
        cases = [(37, 0.7), (37, 0.3), (5, 0.5)]
        for above_half in (False, True):
            width = ex.rng.randrange(3, 80)
            cases.append((width, _fractional_sparsity(ex, width, above_half)))
        for in_features, sparsity in cases:
            weight, x = ex.randn(4, in_features), ex.randn(ex.rng.randrange(1, 20), in_features)
            mask = fn(weight, x, sparsity)
            _assert_mask(mask, tuple(weight.shape))
            _assert_pruned_per_row(mask, sparsity, what=f"sparsity {sparsity:g} of {in_features} inputs")

    def massive_activation():
        # A channel that is large and nearly constant over tokens (the "massive activations" of LLMs, arXiv
        # 2402.17762): its norm is large even though it hardly varies. Its weights are small, so only the norm
        # of the raw activations keeps them.
        weight = randn(16, 32, seed=92)
        x = randn(24, 32, seed=93)
        x[:, 7] = 50.0 + 0.01 * x[:, 7]
        weight[:, 7] = 0.05 * weight[:, 7].sign()
        mask = fn(weight, x, 0.5)
        _assert_mask(mask, tuple(weight.shape))
        assert bool(mask[:, 7].all()), (
            "input channel 7 is about 50 on every token: its L2 norm over the tokens is large, so Wanda keeps its "
            f"weights, but the mask drops {int((~mask[:, 7]).sum())} of its 16 (an L2 norm, not a spread around "
            "the mean)"
        )

    def random_layers():
        for leading in [(), (1,), (2,), (3, 1)]:  # x of shape (N, in), (1, N, in), (2, N, in), (3, 1, N, in)
            out_features, in_features = _odd_size(ex, 13), ex.rng.randrange(1, 70)
            weight = ex.randn(out_features, in_features) * ex.randn(out_features, 1).abs()
            x = ex.randn(*leading, ex.rng.randrange(1, 12), in_features)
            x = x + 3 * ex.randn(in_features)  # every channel has its own mean, as real activations do
            loud = ex.randint(0, in_features, 2)
            x[..., loud] *= 10.0 ** ex.rng.uniform(1, 3)
            sparsity = _fractional_sparsity(ex, in_features, above_half=ex.rng.random() < 0.5)
            is_right_mask(weight, x, sparsity, what=f"a {out_features} x {in_features} layer, x of shape "
                                                    f"{tuple(x.shape)}, sparsity {sparsity:g}")

    def silent_channels_and_zero_rows():
        weight = randn(6, 10, seed=94)
        weight[1] = 0.0  # a row of zeros: every score 0
        x = randn(8, 10, seed=95)
        x[:, [2, 5, 6]] = 0.0  # silent channels: score 0 in every row
        is_right_mask(weight, x, 0.3, what="zero row 1 and silent channels 2, 5, 6 at sparsity 0.3")
        in_features = ex.rng.randrange(4, 40)
        weight = _integer_weight(ex, ex.rng.randrange(2, 9), in_features)
        x = ex.randn(ex.rng.randrange(1, 10), in_features)
        x[:, ex.randint(0, in_features, in_features // 3)] = 0.0
        sparsity = _fractional_sparsity(ex, in_features, above_half=True)
        is_right_mask(weight, x, sparsity, what="integer weights, silent input channels")

    def half_precision():
        # A float16 model's activations: a few hundred on every channel, so squares overflow float16 (max 65504).
        for seed, num_tokens, in_features in [(96, 16, 24), (None, None, None)]:
            if seed is None:
                num_tokens, in_features = ex.rng.randrange(8, 33), ex.rng.randrange(8, 60)
                weight, x = ex.randn(_odd_size(ex, 9), in_features), ex.randn(num_tokens, in_features)
            else:
                weight, x = randn(8, in_features, seed=seed), randn(num_tokens, in_features, seed=seed + 1)
            x = x * torch.linspace(100, 500, in_features)
            weight, x = weight.half(), x.half()
            sparsity = 0.5 if seed is not None else _fractional_sparsity(ex, in_features, above_half=False)
            is_right_mask(weight, x, sparsity, rtol=4e-3,
                          what=f"float16 weight and x (values up to {x.abs().max().item():.0f}), sparsity {sparsity:g}")

    with exercise("7.2", "the Wanda score and its per-row mask") as ex:
        ex.check("a square 48 x 48 layer at 50% matches the reference", square)
        ex.check("a 20 x 64 layer at 25% matches the reference", rectangular)
        ex.check("x with leading (B, T) dims: norms over every token", batched_tokens)
        ex.check("small weights on a loud input channel are kept", outlier_channel_survives)
        ex.check("scaling all inputs by a constant does not change the mask", scale_free)
        ex.check("every row loses exactly round(sparsity * in) weights, also when sparsity * in is not whole",
                 exact_per_row)
        ex.check("a loud channel that is nearly constant over the tokens counts as loud", massive_activation)
        ex.check("fresh random layers: odd shapes, 1 to 3 leading dims, channel means, loud channels", random_layers)
        ex.check("all-zero rows and silent input channels (ties at score 0)", silent_channels_and_zero_rows)
        ex.check("float16 activations in the hundreds (their squares overflow float16)", half_precision)


# ---------------------------------------------------------------------------------------------------------------------
# Exercise 7.3: the N:M mask.
# ---------------------------------------------------------------------------------------------------------------------


def check_nm_mask(fn: Callable) -> None:
    """Exercise 7.3. `fn(score, n, m) -> mask`: keep the N highest scores in every group of M consecutive inputs.

    score (out, in) with ``in % m == 0``; groups are ``score[r, g*m : (g+1)*m]`` along the input (last) dimension,
    the reduction dimension of ``x @ W.T`` that sparse tensor cores need. Returns a bool keep-mask (out, in). A width
    that is not a multiple of M is refused with an error (groups would straddle two rows). Same contract as
    ``minillm.prune.nm_mask``.
    """
    fn = _leaves_inputs_alone(fn, ("score", "n", "m"))
    from minillm.prune import is_nm_sparse, nm_mask

    def matches(score, n, m):
        got = fn(score, n, m)
        _assert_mask(got, tuple(score.shape))
        assert_equal(got, nm_mask(score, n, m), what=f"{n}:{m} mask of a {score.shape[0]} x {score.shape[1]} score")

    def fixed(out_features, in_features, n, m, seed):
        return lambda: matches(randn(out_features, in_features, seed=seed).abs(), n, m)

    def is_right_nm_mask(score, mask, n, m, what):
        out_features, in_features = score.shape
        _assert_mask(mask, tuple(score.shape))
        kept = mask.reshape(out_features, in_features // m, m).sum(dim=-1)  # (out, in/M)
        bad = (kept != n).nonzero().tolist()
        assert not bad, (
            f"{what}: every group of {m} consecutive inputs in a row must keep exactly {n}; (row, group) {bad[0]} "
            f"keeps {kept[bad[0][0], bad[0][1]].item()} ({len(bad)} groups wrong)"
        )
        assert is_nm_sparse(torch.where(mask, 1.0, 0.0), n, m), f"{what}: the mask is not {n}:{m} along the inputs"
        _assert_keeps_largest(score.reshape(-1, m), mask.reshape(-1, m),
                              what=f"{what}, groups of {m} (the rows of score.reshape(-1, {m}))")

    def exact_pattern(n, m, seed):
        score = randn(12, 48, seed=seed).abs()
        is_right_nm_mask(score, fn(score, n, m), n, m, what=f"{n}:{m} of a 12 x 48 score")

    def keeps_largest_in_group():
        score = randn(6, 32, seed=104).abs()
        is_right_nm_mask(score, fn(score, 2, 4), 2, 4, what="2:4 of a 6 x 32 score")

    def random_patterns():
        # N = 1, N = M - 1 and any N; one row, one group per row, odd numbers of groups.
        for kind in ["one", "all-but-one", "any", "one row", "one group"]:
            m = ex.rng.choice([2, 3, 4, 5, 6, 8, 16])
            n = {"one": 1, "all-but-one": m - 1}.get(kind, ex.rng.randrange(1, m))
            out_features = 1 if kind == "one row" else _odd_size(ex, 9)
            num_groups = 1 if kind == "one group" else _odd_size(ex, 9)
            matches(ex.randn(out_features, num_groups * m).abs(), n, m)

    def ties_and_zero_rows():
        score = torch.tensor([[0.0] * 8, [1.0] * 8, [1.0, 0.0, 1.0, 1.0, 2.0, 2.0, 0.0, 2.0]])
        for n in (1, 2, 3):
            is_right_nm_mask(score, fn(score, n, 4), n, 4, what=f"all-zero, all-equal and tied rows, {n}:4")
        m = ex.rng.choice([4, 8])
        n = ex.rng.randrange(1, m)
        score = _integer_weight(ex, ex.rng.randrange(2, 9), m * ex.rng.randrange(1, 6)).abs()
        is_right_nm_mask(score, fn(score, n, m), n, m, what=f"integer scores with zero rows, {n}:{m}")

    def refuses_bad_width():
        group = ex.rng.choice([3, 4, 8])
        width = group * ex.rng.randrange(1, 4) + ex.rng.randrange(1, group)
        # M rows of a width that M does not divide: out * in is still a multiple of M, so a reshape(-1, M) would
        # run and silently build groups that straddle two rows.
        for shape, n, m in [((4, 6), 2, 4), ((group, width), 1, group)]:
            try:
                got = fn(randn(*shape, seed=106).abs(), n, m)
            except NotImplementedError:
                raise
            except Exception:  # refused: ValueError, or the RuntimeError of an impossible reshape
                continue
            raise AssertionError(
                f"fn(score of shape {shape}, {n}, {m}) returned {type(got).__name__} instead of raising: {shape[1]} "
                f"inputs are not a multiple of M={m}, so some group of {m} consecutive inputs would straddle two "
                f"rows. Raise a ValueError when in % m != 0"
            )

    with exercise("7.3", "an N:M mask") as ex:
        ex.check("2:4 of a 16 x 32 score matches the reference", fixed(16, 32, 2, 4, seed=100))
        ex.check("4:8 of a 10 x 64 score matches the reference", fixed(10, 64, 4, 8, seed=101))
        ex.check("2:4: exactly 2 kept in every group of 4 consecutive inputs", lambda: exact_pattern(2, 4, seed=102))
        ex.check("1:4: exactly 1 kept in every group", lambda: exact_pattern(1, 4, seed=103))
        ex.check("each group keeps its largest scores", keeps_largest_in_group)
        ex.check("a single row of 8 inputs, 2:4", fixed(1, 8, 2, 4, seed=105))
        ex.check("fresh random N:M patterns (1:M, (M-1):M, one row, one group) match the reference", random_patterns)
        ex.check("ties and all-zero rows: exactly N per group, never a smaller score kept over a larger",
                 ties_and_zero_rows)
        ex.check("a width that is not a multiple of M is refused", refuses_bad_width)


# ---------------------------------------------------------------------------------------------------------------------
# Exercise 7.4: structured pruning of MLP channels.
# ---------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _MLPConfig:
    intermediate_size: int


def _mlp_model(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> nn.Module:
    """The smallest model ``prune_mlp_channels`` accepts: ``model.layers[0].mlp`` with these weights, and a config."""
    I, C = gate.shape
    mlp = nn.Module()
    for name, weight in [("gate_proj", gate), ("up_proj", up), ("down_proj", down)]:
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
        setattr(mlp, name, linear)
    layer = nn.Module()
    layer.mlp = mlp
    model = nn.Module()
    model.layers = nn.ModuleList([layer])
    model.config = _MLPConfig(intermediate_size=I)
    return model


def prune_mlp_channels_ref(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, fraction: float
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``minillm.prune.prune_mlp_channels(model, fraction, score="magnitude")`` on one MLP given by its weights:
    gate (I, C), up (I, C), down (C, I) -> the pruned (I', C), (I', C), (C, I')."""
    from minillm.prune import prune_mlp_channels

    with torch.random.fork_rng(devices=[]):  # building nn.Linear draws from the global RNG: leave the learner's alone
        model = _mlp_model(gate, up, down)
        prune_mlp_channels(model, fraction, score="magnitude")
    mlp = model.layers[0].mlp
    return mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach(), mlp.down_proj.weight.detach()


def _channel_score(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """(I,) float64: the norm of each channel's weights in gate, up and down together."""
    gate, up, down = gate.double(), up.double(), down.double()
    return (gate.pow(2).sum(dim=1) + up.pow(2).sum(dim=1) + down.pow(2).sum(dim=0)).sqrt()


def _mlp(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return F.silu(x @ gate.T) * (x @ up.T) @ down.T  # (N, C)


def _mlp_weights(num_channels: int, hidden: int, source: int | Exercise
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """gate, up (I, C) and down (C, I) whose channels differ in scale (0.1 to 10) independently in each matrix, so
    that ranking by one matrix alone, or by the sum of the three norms, picks other channels than the joint norm.

    `source`: a seed (fixed cases, the same everywhere) or the Exercise (fresh cases from its seed).
    """
    if isinstance(source, Exercise):
        draw = source.randn
        permutation = lambda: torch.tensor(source.rng.sample(range(num_channels), num_channels))  # noqa: E731
    else:
        g = generator(source)
        draw = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
        permutation = lambda: torch.randperm(num_channels, generator=g)  # noqa: E731
    scale = torch.logspace(-1, 1, num_channels)
    gate = draw(num_channels, hidden) * scale[permutation()][:, None]
    up = draw(num_channels, hidden) * scale[permutation()][:, None]
    down = draw(hidden, num_channels) * scale[permutation()][None, :]
    return gate, up, down


def check_prune_mlp_channels(fn: Callable) -> None:
    """Exercise 7.4. `fn(gate, up, down, fraction) -> (gate', up', down')`: remove the weakest MLP channels.

    gate, up (I, C) and down (C, I) are the weights of ``down(silu(gate x) * up x)``; channel c owns row c of gate
    and up and column c of down. Remove the ``round(fraction * I)`` channels of smallest
    ``sqrt(|gate[c]|^2 + |up[c]|^2 + |down[:, c]|^2)``; return the kept rows and columns, in their original order.
    Same contract as ``minillm.prune.prune_mlp_channels(model, fraction, score="magnitude")`` on one MLP.
    """
    fn = _leaves_inputs_alone(fn, ("gate", "up", "down", "fraction"))

    def pruned(gate, up, down, fraction, what):
        """Call fn and check the three shapes: (I', C), (I', C), (C, I') with I' = I - round(fraction * I)."""
        (I, C), num_removed = gate.shape, _num_pruned(gate.shape[0], fraction)
        got = fn(gate, up, down, fraction)
        assert isinstance(got, (tuple, list)) and len(got) == 3, (
            f"{what}: return the three pruned weights (gate, up, down), got {type(got).__name__}"
        )
        kept = I - num_removed
        why = f"{what}: I={I} channels, {_rounding(I, fraction)} removed, {kept} kept"
        for name, tensor, shape in [("gate", got[0], (kept, C)), ("up", got[1], (kept, C)), ("down", got[2], (C, kept))]:
            assert_shape(tensor, shape, what=f"{why}; {name}")
        return got

    def kept_channels(gate, up, down, got, what):
        """The original channel of every returned one: (gate row, up row, down column) must be one channel's, in
        increasing order. Identical channels (duplicates, zeros) may stand for each other."""
        channels = torch.cat([gate, up, down.T], dim=1)  # (I, 3C): one row per channel
        returned = torch.cat([got[0], got[1], got[2].T], dim=1)  # (I', 3C)
        same = (returned[:, None, :] == channels[None, :, :]).all(dim=-1)  # (I', I)
        kept, previous = [], -1
        for r in range(returned.shape[0]):
            candidates = same[r].nonzero().flatten().tolist()
            if not candidates:
                owners = [(m[r:r + 1] == w).all(dim=1).nonzero().flatten().tolist()[:3]
                          for m, w in [(got[0], gate), (got[1], up), (got[2].T, down.T)]]
                raise AssertionError(
                    f"{what}: returned channel {r} (row {r} of gate and up, column {r} of down) is not one channel "
                    f"of the original MLP: it takes gate from channel(s) {owners[0]}, up from {owners[1]}, down from "
                    f"{owners[2]}. A channel's gate row, up row and down column go together"
                )
            later = [c for c in candidates if c > previous]
            if not later:
                raise AssertionError(
                    f"{what}: keep the channels in their original order: returned channel {r} is original channel "
                    f"{candidates[0]}, which comes before channel {previous}, returned just before it"
                )
            previous = later[0]
            kept.append(previous)
        return kept

    def is_right(gate, up, down, fraction, what, rtol=1e-5):
        """Shapes, whole channels in order, and the largest scores kept (ties either way)."""
        got = pruned(gate, up, down, fraction, what)
        kept = torch.zeros(gate.shape[0], dtype=torch.bool)
        kept[kept_channels(gate, up, down, got, what)] = True
        score = _channel_score(gate, up, down)  # (I,)
        if kept.all() or not kept.any():
            return
        weakest_kept = score.masked_fill(~kept, float("inf")).argmin().item()
        strongest_removed = score.masked_fill(kept, float("-inf")).argmax().item()
        assert score[weakest_kept] >= score[strongest_removed] * (1 - rtol), (
            f"{what}: channel {weakest_kept} is kept with score {score[weakest_kept].item():.6g} but channel "
            f"{strongest_removed} is removed with score {score[strongest_removed].item():.6g} (the score of channel c: "
            f"sqrt(|gate[c]|^2 + |up[c]|^2 + |down[:, c]|^2), the norm of all its weights together)"
        )

    def counts():
        cases = [(37, 0.3), (37, 0.7), (5, 0.5), (7, 0.5)]
        for above_half in (False, True):
            width = ex.rng.randrange(3, 60)
            cases.append((width, _fractional_sparsity(ex, width, above_half, keep_one=True)))
        for I, fraction in cases:
            gate, up, down = ex.randn(I, 3), ex.randn(I, 3), ex.randn(3, I)
            pruned(gate, up, down, fraction, what=f"fraction {fraction:g}")

    def together_and_exact():
        gate, up, down = _mlp_weights(20, 8, 111)
        got = pruned(gate, up, down, 0.4, what="20 channels at 0.4")
        removed = torch.ones(20, dtype=torch.bool)
        removed[kept_channels(gate, up, down, got, what="20 channels at 0.4")] = False
        x = randn(7, 8, seed=112)
        zeroed = [gate.masked_fill(removed[:, None], 0.0), up, down.masked_fill(removed[None, :], 0.0)]
        assert_close(_mlp(*got, x), _mlp(*zeroed, x), atol=1e-5, rtol=1e-4,
                     what="output of the pruned MLP vs the original with the removed channels zeroed")

    def original_order():
        gate, up, down = _mlp_weights(16, 6, 113)
        kept_channels(gate, up, down, pruned(gate, up, down, 0.5, what="16 channels at 0.5"), what="16 channels at 0.5")

    def largest_score():
        # Channel 0 is big only in down, channel 1 only in up, channel 2 in gate; 3 is medium in all three (its sum
        # of norms is the largest, its joint norm is not); 4 and 5 are small.
        gate = torch.tensor([[0.1, 0.0], [0.1, 0.0], [3.1, 0.0], [1.5, 0.5], [0.5, 0.0], [0.0, 0.4]])
        up = torch.tensor([[0.0, 0.1], [2.9, 0.0], [0.0, 0.1], [0.5, 1.5], [0.0, 0.5], [0.3, 0.0]])
        down = torch.tensor([[3.0, 0.0, 0.1, 1.5, 0.0, 0.2], [0.0, 0.1, 0.0, 0.5, 0.5, 0.1]])
        is_right(gate, up, down, 0.5, what="6 channels at 0.5")

    def matches_reference():
        gate, up, down = _mlp_weights(24, 16, 114)
        got = pruned(gate, up, down, 0.25, what="24 channels at 0.25")
        for name, g, e in zip(["gate", "up", "down"], got, prune_mlp_channels_ref(gate, up, down, 0.25)):
            assert_equal(g, e, what=f"pruned {name} (24 channels at 0.25)")

    def random_mlps():
        for i in range(4):
            I, C = ex.rng.choice([1, 2, ex.rng.randrange(3, 40)]), _odd_size(ex, 9)
            fraction = _fractional_sparsity(ex, I, above_half=i % 2 == 1 and I > 1, keep_one=True)
            is_right(*_mlp_weights(I, C, ex), fraction, what=f"an MLP with I={I}, C={C} at fraction {fraction:g}")

    def ties_and_zero_channels():
        gate, up, down = _mlp_weights(8, 3, 115)
        for c in (1, 2, 4, 6, 7):
            gate[c], up[c], down[:, c] = 0.0, 0.0, 0.0
        is_right(gate, up, down, 0.5, what="8 channels, 5 of them all zero, at 0.5", rtol=0.0)
        I = ex.rng.randrange(6, 30)
        gate, up, down = (t.round() for t in _mlp_weights(I, 2, ex))  # small integers: tied scores
        zero = ex.randint(0, 2, I).bool()
        gate[zero], up[zero], down[:, zero] = 0.0, 0.0, 0.0
        gate[-1], up[-1], down[:, -1] = gate[0], up[0], down[:, 0]  # a duplicated channel
        fraction = _fractional_sparsity(ex, I, above_half=True, keep_one=True)
        is_right(gate, up, down, fraction, what=f"{I} channels with zero and duplicated ones at {fraction:g}",
                 rtol=0.0)

    def fraction_zero():
        for gate, up, down in [_mlp_weights(9, 4, 116), _mlp_weights(_odd_size(ex, 31), _odd_size(ex, 9), ex)]:
            got = pruned(gate, up, down, 0.0, what="fraction 0")
            for name, g, e in zip(["gate", "up", "down"], got, (gate, up, down)):
                assert_equal(g, e, what=f"{name} at fraction 0 (every channel kept, unchanged)")

    def near_one():
        for _ in range(2):
            I = ex.rng.randrange(2, 40)
            fraction = (I - 1 + ex.rng.uniform(-0.45, 0.45)) / I  # round(fraction * I) = I - 1: one channel left
            is_right(*_mlp_weights(I, _odd_size(ex, 9), ex), fraction, what=f"I={I} at fraction {fraction:g}")

    with exercise("7.4", "structured pruning of MLP channels") as ex:
        ex.check("round(fraction * I) channels removed, also when fraction * I is not whole", counts)
        ex.check("a channel's gate row, up row and down column stay together: the kept channels' output is exact",
                 together_and_exact)
        ex.check("the kept channels stay in their original order", original_order)
        ex.check("the kept channels have the largest joint norm over gate, up and down", largest_score)
        ex.check("a 24-channel MLP at 25% matches the reference", matches_reference)
        ex.check("fresh random MLPs (1 channel, C = 1, odd sizes)", random_mlps)
        ex.check("ties: all-zero and duplicated channels", ties_and_zero_channels)
        ex.check("fraction 0 keeps every channel unchanged", fraction_zero)
        ex.check("fraction near 1: one channel left", near_one)
