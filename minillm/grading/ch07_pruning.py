"""Chapter 7 checks (pruning), used by solutions/07_pruning.ipynb.

Every check has a plausible wrong answer in tests/test_grading.py that it must reject.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from minillm.grading.framework import (
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
]

def _rows_of_different_scales(out_features: int, in_features: int, seed: int) -> torch.Tensor:
    """A weight whose rows differ in scale by 100x, like real layers: a global threshold would empty the small rows."""
    scale = torch.logspace(-1, 1, out_features)[:, None]
    return randn(out_features, in_features, seed=seed) * scale


def _assert_mask(got: Any, shape: tuple[int, int], what: str) -> None:
    assert_shape(got, shape, what=what)
    assert_equal(got.dtype, torch.bool, what=f"{what} dtype (a keep-mask: True = keep)")


def _assert_row_counts(mask: torch.Tensor, num_kept: int, what: str) -> None:
    kept = mask.sum(dim=1)
    bad = (kept != num_kept).nonzero().flatten().tolist()
    assert not bad, (
        f"{what}: every row must keep exactly {num_kept} of {mask.shape[1]} weights, but rows {bad[:5]} keep "
        f"{kept[bad[:5]].tolist()}"
    )


def _assert_keeps_largest(score: torch.Tensor, mask: torch.Tensor, what: str) -> None:
    """In every row, the smallest kept score is at least the largest dropped one."""
    kept_min = score.masked_fill(~mask, float("inf")).amin(dim=1)
    dropped_max = score.masked_fill(mask, float("-inf")).amax(dim=1)
    bad = (kept_min < dropped_max).nonzero().flatten().tolist()
    assert not bad, (
        f"{what}: rows {bad[:5]} keep a weight whose score is smaller than one they drop "
        f"(row {bad[0]}: kept min {kept_min[bad[0]].item():.4g} < dropped max {dropped_max[bad[0]].item():.4g})"
    )


def check_magnitude_mask(fn: Callable) -> None:
    """Exercise 7.1. `fn(weight, sparsity) -> mask`: per-row magnitude pruning of one weight.

    weight (out, in) float; sparsity in [0, 1). Returns a bool keep-mask (out, in) that drops, in every row, the
    ``round(sparsity * in)`` weights of smallest ``|W|``. Same contract as ``minillm.prune.magnitude_mask``.
    """
    from minillm.prune import magnitude_mask

    def matches(out_features, in_features, sparsity, seed):
        weight = _rows_of_different_scales(out_features, in_features, seed)
        got = fn(weight, sparsity)
        _assert_mask(got, weight.shape, what="mask")
        assert_equal(got, magnitude_mask(weight, sparsity),
                     what=f"mask at sparsity {sparsity} ({out_features} x {in_features})")

    def exact_per_row():
        weight = _rows_of_different_scales(16, 40, seed=72)
        mask = fn(weight, 0.3)
        _assert_mask(mask, weight.shape, what="mask")
        _assert_row_counts(mask, 28, what="sparsity 0.3 of 40 inputs")

    def keeps_largest():
        weight = _rows_of_different_scales(12, 64, seed=73)
        _assert_keeps_largest(weight.abs(), fn(weight, 0.75), what="|W| at sparsity 0.75")

    def negative_weights_count_by_size():
        weight = -_rows_of_different_scales(8, 32, seed=74).abs()  # all negative: |W| ranks them, not W
        assert_equal(fn(weight, 0.5), magnitude_mask(weight, 0.5), what="mask of an all-negative weight")

    with exercise("7.1", "a per-row magnitude mask") as ex:
        ex.check("50% of a 64 x 64 weight matches the reference", lambda: matches(64, 64, 0.5, seed=70))
        ex.check("25% of a 24 x 48 weight whose rows differ in scale", lambda: matches(24, 48, 0.25, seed=71))
        ex.check("every row loses exactly round(sparsity * in) weights", exact_per_row)
        ex.check("each row keeps its largest |W|", keeps_largest)
        ex.check("the sign does not matter: large negative weights are kept", negative_weights_count_by_size)
        ex.check("sparsity 0 keeps everything", lambda: matches(8, 16, 0.0, seed=75))


def _wanda_inputs(num_tokens: int, in_features: int, seed: int) -> torch.Tensor:
    """Calibration inputs (N, in) with a few outlier channels 30x louder than the rest, as in real LLM layers."""
    x = randn(num_tokens, in_features, seed=seed)
    outliers = torch.randperm(in_features, generator=generator(seed + 1))[:3]
    x[:, outliers] *= 30
    return x


def _wanda_mask_ref(weight: torch.Tensor, x: torch.Tensor, sparsity: float) -> torch.Tensor:
    from minillm.prune import row_mask, wanda_score

    norm = x.reshape(-1, x.shape[-1]).double().pow(2).sum(dim=0).sqrt().float()  # (in,), as InputNormCollector
    return row_mask(wanda_score(weight, norm), sparsity)


def check_wanda_mask(fn: Callable) -> None:
    """Exercise 7.2. `fn(weight, x, sparsity) -> mask`: the Wanda keep-mask of one linear layer.

    weight (out, in); x (..., in): the layer's inputs on calibration tokens (any leading dims: every token is one
    sample). Score ``S_ij = |W_ij| * ||X_j||_2`` with the L2 norm of input feature j over all tokens; drop the
    ``round(sparsity * in)`` lowest scores of every output row. Returns a bool keep-mask (out, in).
    """

    def matches(weight, x, sparsity, what):
        got = fn(weight, x, sparsity)
        _assert_mask(got, weight.shape, what="mask")
        assert_equal(got, _wanda_mask_ref(weight, x, sparsity), what=what)

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
        assert bool(mask[:, 5].all()), (
            f"input channel 5 carries activations 1000x larger than the rest; Wanda keeps its weights, "
            f"but the mask drops {int((~mask[:, 5]).sum())} of its 32"
        )

    def scale_free():
        weight, x = _rows_of_different_scales(24, 40, seed=88), _wanda_inputs(30, 40, seed=89)
        assert_equal(fn(weight, 7.0 * x, 0.5), fn(weight, x, 0.5), what="mask after scaling x by 7")

    with exercise("7.2", "the Wanda score and its per-row mask") as ex:
        ex.check("a square 48 x 48 layer at 50% matches the reference", square)
        ex.check("a 20 x 64 layer at 25% matches the reference", rectangular)
        ex.check("x with leading (B, T) dims: norms over every token", batched_tokens)
        ex.check("small weights on a loud input channel are kept", outlier_channel_survives)
        ex.check("scaling all inputs by a constant does not change the mask", scale_free)
        weight, x = _rows_of_different_scales(16, 48, seed=90), _wanda_inputs(20, 48, seed=91)
        ex.check("every row loses exactly round(sparsity * in) weights",
                 lambda: _assert_row_counts(fn(weight, x, 0.75), 12, what="sparsity 0.75 of 48 inputs"))


def check_nm_mask(fn: Callable) -> None:
    """Exercise 7.3. `fn(score, n, m) -> mask`: keep the N highest scores in every group of M consecutive inputs.

    score (out, in) with ``in % m == 0``; groups are ``score[r, g*m : (g+1)*m]`` along the input (last) dimension,
    the reduction dimension of ``x @ W.T`` that sparse tensor cores need. Returns a bool keep-mask (out, in).
    Same contract as ``minillm.prune.nm_mask``.
    """
    from minillm.prune import is_nm_sparse, nm_mask

    def matches(out_features, in_features, n, m, seed):
        score = randn(out_features, in_features, seed=seed).abs()
        got = fn(score, n, m)
        _assert_mask(got, score.shape, what="mask")
        assert_equal(got, nm_mask(score, n, m), what=f"{n}:{m} mask of a {out_features} x {in_features} score")

    def exact_pattern(n, m, seed):
        score = randn(12, 48, seed=seed).abs()
        mask = fn(score, n, m)
        _assert_mask(mask, score.shape, what="mask")
        kept = mask.reshape(12, 48 // m, m).sum(dim=-1)  # (out, in/M)
        bad = (kept != n).nonzero().tolist()
        assert not bad, (
            f"every group of {m} consecutive inputs in a row must keep exactly {n}; (row, group) {bad[0]} keeps "
            f"{kept[bad[0][0], bad[0][1]].item()} ({len(bad)} groups wrong)"
        )
        assert is_nm_sparse(score * mask, n, m), f"score * mask is not {n}:{m} sparse along the input dimension"

    def keeps_largest_in_group():
        score = randn(6, 32, seed=104).abs()
        mask = fn(score, 2, 4)
        _assert_mask(mask, score.shape, what="mask")
        _assert_keeps_largest(score.reshape(-1, 4), mask.reshape(-1, 4),
                              what="groups of 4 (the rows of score.reshape(-1, 4))")

    with exercise("7.3", "an N:M mask") as ex:
        ex.check("2:4 of a 16 x 32 score matches the reference", lambda: matches(16, 32, 2, 4, seed=100))
        ex.check("4:8 of a 10 x 64 score matches the reference", lambda: matches(10, 64, 4, 8, seed=101))
        ex.check("2:4: exactly 2 kept in every group of 4 consecutive inputs", lambda: exact_pattern(2, 4, seed=102))
        ex.check("1:4: exactly 1 kept in every group", lambda: exact_pattern(1, 4, seed=103))
        ex.check("each group keeps its largest scores", keeps_largest_in_group)
        ex.check("a single row of 8 inputs, 2:4", lambda: matches(1, 8, 2, 4, seed=105))
