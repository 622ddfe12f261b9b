"""Chapter 07's graded checks against right answers and plausible wrong ones (collected by tests/test_grading.py).

A wrong answer is a mistake a learner would plausibly make, written as a small function with a comment saying what
is wrong; every check must reject each of its wrong answers and pass each right answer on every random seed. The
last test recomputes the worked example above each exercise in the solution notebook with minillm's reference.
"""

import math
from pathlib import Path

import pytest
import torch

from answers.worked_examples import check_worked_examples
from minillm import grading
from minillm.grading.ch07_pruning import _wanda_mask_ref, prune_mlp_channels_ref
from minillm.prune import magnitude_mask, nm_mask, row_mask

RIGHT_ANSWERS = []
WRONG_ANSWERS = []


# ---------------------------------------------------------------------------------------------------------------------
# 7.1 magnitude mask
# ---------------------------------------------------------------------------------------------------------------------


def magnitude_mask_topk(weight, sparsity):  # the solution notebook's answer: topk breaks ties its own way
    num_pruned = round(sparsity * weight.shape[1])
    mask = torch.ones_like(weight, dtype=torch.bool)
    if num_pruned > 0:
        mask.scatter_(1, weight.abs().topk(num_pruned, dim=1, largest=False).indices, False)
    return mask


def magnitude_mask_argsort(weight, sparsity):  # keeps the top entries of a descending argsort instead
    num_kept = weight.shape[1] - round(sparsity * weight.shape[1])
    order = weight.abs().argsort(dim=1, descending=True)  # (out, in)
    return torch.zeros_like(weight, dtype=torch.bool).scatter_(1, order[:, :num_kept], True)


def magnitude_mask_global_threshold(weight, sparsity):
    # Wrong: one threshold for the whole matrix, so rows of small weights lose far more than `sparsity`.
    k = round(sparsity * weight.numel())
    if k == 0:
        return torch.ones_like(weight, dtype=torch.bool)
    return weight.abs() > weight.abs().flatten().kthvalue(k).values


def magnitude_mask_signed(weight, sparsity):
    # Wrong: ranks by W instead of |W|, so large negative weights are dropped first.
    return row_mask(weight, sparsity)


def magnitude_mask_truncates(weight, sparsity):
    # Wrong: int() truncates the count: 0.7 * 37 = 25.9 drops 25 weights, not round(25.9) = 26.
    num_pruned = int(sparsity * weight.shape[1])
    order = weight.abs().argsort(dim=1)
    return torch.ones_like(weight, dtype=torch.bool).scatter_(1, order[:, :num_pruned], False)


def magnitude_mask_ceil(weight, sparsity):
    # Wrong: rounds the count up ("at least the requested sparsity"): 0.3 * 37 = 11.1 drops 12.
    return magnitude_mask_topk_count(weight, math.ceil(sparsity * weight.shape[1]))


def magnitude_mask_half_up(weight, sparsity):
    # Wrong: int(x + 0.5) rounds an exact half up (0.5 * 5 = 2.5 drops 3); Python's round, like torch.round, goes
    # to the even integer (2).
    return magnitude_mask_topk_count(weight, int(sparsity * weight.shape[1] + 0.5))


def magnitude_mask_rounds_kept_count(weight, sparsity):
    # Wrong: rounds the number *kept*, round((1 - sparsity) * in): at 0.5 of 5 it keeps round(2.5) = 2, so drops 3.
    return magnitude_mask_topk_count(weight, weight.shape[1] - round((1 - sparsity) * weight.shape[1]))


def magnitude_mask_topk_count(weight, num_pruned):
    mask = torch.ones_like(weight, dtype=torch.bool)
    return mask.scatter_(1, weight.abs().topk(num_pruned, dim=1, largest=False).indices, False)


def magnitude_mask_row_threshold(weight, sparsity):
    # Wrong: a per-row threshold, |W| > the k-th smallest |W|: on ties (zero rows, equal weights) it drops every
    # tied weight, more than k.
    k = round(sparsity * weight.shape[1])
    if k == 0:
        return torch.ones_like(weight, dtype=torch.bool)
    return weight.abs() > weight.abs().kthvalue(k, dim=1, keepdim=True).values


def magnitude_mask_negative_slice(weight, sparsity):
    # Wrong: drops the last num_pruned of a descending order with order[:, -num_pruned:], and -0 is 0: at sparsity 0
    # that slice is the whole row, so everything is dropped.
    num_pruned = round(sparsity * weight.shape[1])
    order = weight.abs().argsort(dim=1, descending=True)
    return torch.ones_like(weight, dtype=torch.bool).scatter_(1, order[:, -num_pruned:], False)


def magnitude_mask_in_place(weight, sparsity):
    # Wrong: weight.abs_() ranks the right way but overwrites the caller's weight with |W|: the layer it is asked
    # about loses the signs of its weights.
    return magnitude_mask_topk_count(weight.abs_(), round(sparsity * weight.shape[1]))


def magnitude_mask_squared(weight, sparsity):
    # Wrong: ranks by W**2, which is the same order as |W| until it overflows (|W| > 1.8e19 -> inf) or underflows
    # (|W| < 1e-23 -> 0) in float32, and the ties it creates are broken at random.
    return magnitude_mask_topk_count(weight.pow(2), round(sparsity * weight.shape[1]))


# ---------------------------------------------------------------------------------------------------------------------
# 7.2 Wanda mask
# ---------------------------------------------------------------------------------------------------------------------


def wanda_mask_right(weight, x, sparsity):
    norm = x.reshape(-1, x.shape[-1]).norm(dim=0)  # (in,): over every token
    return row_mask(weight.abs() * norm[None, :], sparsity)


def wanda_mask_float64_topk(weight, x, sparsity):  # norms in float64, topk row selection
    norm = x.reshape(-1, x.shape[-1]).double().pow(2).sum(dim=0).sqrt()
    score = weight.double().abs() * norm
    return magnitude_mask_topk(score, sparsity)


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


def wanda_mask_std(weight, x, sparsity):
    # Wrong: the spread of each channel (std subtracts the mean) instead of its L2 norm: a channel that is large and
    # nearly constant over tokens looks silent.
    return row_mask(weight.abs() * x.reshape(-1, x.shape[-1]).std(dim=0)[None, :], sparsity)


def wanda_mask_truncates(weight, x, sparsity):
    # Wrong: int() truncates the count of pruned weights per row.
    norm = x.reshape(-1, x.shape[-1]).norm(dim=0)
    return magnitude_mask_truncates(weight.abs() * norm[None, :], sparsity)


def wanda_mask_row_threshold(weight, x, sparsity):
    # Wrong: keeps scores above the row's k-th smallest: a zero row or silent channels (score 0 ties) lose too much.
    norm = x.reshape(-1, x.shape[-1]).norm(dim=0)
    return magnitude_mask_row_threshold(weight.abs() * norm[None, :], sparsity)


def wanda_mask_overflows(weight, x, sparsity):
    # Wrong: sums the squares in x's own dtype; float16 squares above 65504 become inf and every loud channel ties.
    norm = x.reshape(-1, x.shape[-1]).pow(2).sum(dim=0).sqrt()
    return magnitude_mask_topk(weight.abs() * norm[None, :], sparsity)


# ---------------------------------------------------------------------------------------------------------------------
# 7.3 N:M mask
# ---------------------------------------------------------------------------------------------------------------------


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


def nm_mask_group_threshold(score, n, m):
    # Wrong: keeps every score >= the group's N-th largest: tied groups (zeros, equal scores) keep more than N.
    groups = score.reshape(score.shape[0], -1, m)
    nth = groups.topk(n, dim=-1).values[..., -1:]
    return (groups >= nth).reshape(score.shape)


def nm_mask_flat_groups(score, n, m):
    # Wrong: reshape(-1, M) is right when in % M == 0, but when it is not it silently builds groups that straddle
    # two rows instead of refusing.
    groups = score.reshape(-1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.topk(n, dim=-1).indices, True)
    return keep.reshape(score.shape)


def nm_mask_prunes_n(score, n, m):
    # Wrong: reads N:M as "prune N of every M" (the same for 2:4, not for 1:4 or 3:8).
    return nm_mask_right(score, m - n, m)


def nm_mask_unstructured(score, n, m):
    # Wrong: the same sparsity 1 - N/M, but per row (unstructured): a group may keep 0 or M.
    return row_mask(score, 1 - n / m)


def nm_mask_only_2_4(score, n, m):
    # Wrong: hard-codes 2:4, whatever N and M are asked.
    return nm_mask_right(score, 2, 4)


# ---------------------------------------------------------------------------------------------------------------------
# 7.4 structured pruning of MLP channels
# ---------------------------------------------------------------------------------------------------------------------


def prune_mlp_channels_right(gate, up, down, fraction):  # the solution notebook's answer
    num_kept = gate.shape[0] - round(fraction * gate.shape[0])
    score = (gate.pow(2).sum(dim=1) + up.pow(2).sum(dim=1) + down.pow(2).sum(dim=0)).sqrt()  # (I,)
    kept = score.topk(num_kept).indices.sort().values
    return gate[kept], up[kept], down[:, kept]


def prune_mlp_channels_cat_norm(gate, up, down, fraction):  # one norm over the concatenated channel weights
    channels = torch.cat([gate, up, down.T], dim=1)  # (I, 3C)
    num_removed = round(fraction * gate.shape[0])
    kept = channels.norm(dim=1).argsort(descending=True)[: gate.shape[0] - num_removed].sort().values
    return gate[kept], up[kept], down[:, kept]


def prune_mlp_channels_independent(gate, up, down, fraction):
    # Wrong: chooses the best rows of gate, of up and columns of down separately; the kept pieces belong to
    # different channels, so the pruned MLP computes something else.
    num_kept = gate.shape[0] - round(fraction * gate.shape[0])

    def best(norms):
        return norms.topk(num_kept).indices.sort().values

    return gate[best(gate.norm(dim=1))], up[best(up.norm(dim=1))], down[:, best(down.norm(dim=0))]


def prune_mlp_channels_down_rows(gate, up, down, fraction):
    # Wrong: slices rows of down_proj like the other two; down's channels are its columns (it maps I -> C).
    num_kept = gate.shape[0] - round(fraction * gate.shape[0])
    score = (gate.pow(2).sum(dim=1) + up.pow(2).sum(dim=1) + down.pow(2).sum(dim=0)).sqrt()
    kept = score.topk(num_kept).indices.sort().values
    return gate[kept], up[kept], down[kept]


def prune_mlp_channels_sum_of_norms(gate, up, down, fraction):
    # Wrong: adds the three norms, ||gate[c]|| + ||up[c]|| + ||down[:, c]||, instead of the norm of all the
    # channel's weights together.
    score = gate.norm(dim=1) + up.norm(dim=1) + down.norm(dim=0)
    return _keep_best(gate, up, down, score, gate.shape[0] - round(fraction * gate.shape[0]))


def prune_mlp_channels_no_down(gate, up, down, fraction):
    # Wrong: scores a channel by its gate and up rows only; its down column matters as much.
    score = (gate.pow(2).sum(dim=1) + up.pow(2).sum(dim=1)).sqrt()
    return _keep_best(gate, up, down, score, gate.shape[0] - round(fraction * gate.shape[0]))


def prune_mlp_channels_truncates(gate, up, down, fraction):
    # Wrong: int() truncates the number of removed channels: 0.7 * 37 = 25.9 removes 25, not 26.
    score = (gate.pow(2).sum(dim=1) + up.pow(2).sum(dim=1) + down.pow(2).sum(dim=0)).sqrt()
    return _keep_best(gate, up, down, score, gate.shape[0] - int(fraction * gate.shape[0]))


def prune_mlp_channels_score_order(gate, up, down, fraction):
    # Wrong: keeps the channels in score order (topk without the sort); the package keeps their original order.
    num_kept = gate.shape[0] - round(fraction * gate.shape[0])
    score = (gate.pow(2).sum(dim=1) + up.pow(2).sum(dim=1) + down.pow(2).sum(dim=0)).sqrt()
    kept = score.topk(num_kept).indices
    return gate[kept], up[kept], down[:, kept]


def prune_mlp_channels_threshold(gate, up, down, fraction):
    # Wrong: keeps every channel whose score reaches the num_kept-th largest: tied channels (all-zero ones) all stay.
    num_kept = gate.shape[0] - round(fraction * gate.shape[0])
    score = (gate.pow(2).sum(dim=1) + up.pow(2).sum(dim=1) + down.pow(2).sum(dim=0)).sqrt()
    if num_kept == gate.shape[0]:
        return gate, up, down
    kept = (score >= score.topk(num_kept).values[-1]).nonzero().flatten()
    return gate[kept], up[kept], down[:, kept]


def _keep_best(gate, up, down, score, num_kept):
    kept = score.topk(num_kept).indices.sort().values
    return gate[kept], up[kept], down[:, kept]


RIGHT_ANSWERS += [
    pytest.param(grading.check_magnitude_mask, magnitude_mask, id="7.1-reference"),
    pytest.param(grading.check_magnitude_mask, magnitude_mask_topk, id="7.1-topk"),
    pytest.param(grading.check_magnitude_mask, magnitude_mask_argsort, id="7.1-argsort-descending"),
    pytest.param(grading.check_wanda_mask, wanda_mask_right, id="7.2-norm-over-tokens"),
    pytest.param(grading.check_wanda_mask, wanda_mask_float64_topk, id="7.2-float64-topk"),
    pytest.param(grading.check_nm_mask, nm_mask, id="7.3-reference"),
    pytest.param(grading.check_nm_mask, nm_mask_right, id="7.3-topk"),
    pytest.param(grading.check_prune_mlp_channels, prune_mlp_channels_ref, id="7.4-reference"),
    pytest.param(grading.check_prune_mlp_channels, prune_mlp_channels_right, id="7.4-topk-sorted"),
    pytest.param(grading.check_prune_mlp_channels, prune_mlp_channels_cat_norm, id="7.4-concatenated-norm"),
]
WRONG_ANSWERS += [
    pytest.param(grading.check_magnitude_mask, magnitude_mask_global_threshold, id="7.1-global-threshold"),
    pytest.param(grading.check_magnitude_mask, magnitude_mask_signed, id="7.1-signed-weights"),
    pytest.param(grading.check_magnitude_mask, magnitude_mask_truncates, id="7.1-int-truncates-count"),
    pytest.param(grading.check_magnitude_mask, magnitude_mask_ceil, id="7.1-ceil-count"),
    pytest.param(grading.check_magnitude_mask, magnitude_mask_half_up, id="7.1-half-rounds-up"),
    pytest.param(grading.check_magnitude_mask, magnitude_mask_rounds_kept_count, id="7.1-rounds-kept-count"),
    pytest.param(grading.check_magnitude_mask, magnitude_mask_row_threshold, id="7.1-row-threshold-ties"),
    pytest.param(grading.check_magnitude_mask, magnitude_mask_negative_slice, id="7.1-minus-zero-slice"),
    pytest.param(grading.check_magnitude_mask, magnitude_mask_squared, id="7.1-squared-overflows"),
    pytest.param(grading.check_magnitude_mask, magnitude_mask_in_place, id="7.1-abs-in-place"),
    pytest.param(grading.check_wanda_mask, wanda_mask_norms_per_output, id="7.2-norms-on-wrong-axis"),
    pytest.param(grading.check_wanda_mask, wanda_mask_squared_norm, id="7.2-squared-norm"),
    pytest.param(grading.check_wanda_mask, wanda_mask_magnitude_only, id="7.2-magnitude-only"),
    pytest.param(grading.check_wanda_mask, wanda_mask_std, id="7.2-std-not-norm"),
    pytest.param(grading.check_wanda_mask, wanda_mask_truncates, id="7.2-int-truncates-count"),
    pytest.param(grading.check_wanda_mask, wanda_mask_row_threshold, id="7.2-row-threshold-ties"),
    pytest.param(grading.check_wanda_mask, wanda_mask_overflows, id="7.2-float16-squares-overflow"),
    pytest.param(grading.check_nm_mask, nm_mask_along_outputs, id="7.3-groups-along-outputs"),
    pytest.param(grading.check_nm_mask, nm_mask_strided_groups, id="7.3-strided-groups"),
    pytest.param(grading.check_nm_mask, nm_mask_drops_largest, id="7.3-keeps-smallest"),
    pytest.param(grading.check_nm_mask, nm_mask_group_threshold, id="7.3-group-threshold-ties"),
    pytest.param(grading.check_nm_mask, nm_mask_flat_groups, id="7.3-groups-straddle-rows"),
    pytest.param(grading.check_nm_mask, nm_mask_prunes_n, id="7.3-prunes-n"),
    pytest.param(grading.check_nm_mask, nm_mask_unstructured, id="7.3-unstructured-same-sparsity"),
    pytest.param(grading.check_nm_mask, nm_mask_only_2_4, id="7.3-hard-coded-2-4"),
    pytest.param(grading.check_prune_mlp_channels, prune_mlp_channels_independent, id="7.4-independent-choices"),
    pytest.param(grading.check_prune_mlp_channels, prune_mlp_channels_down_rows, id="7.4-down-rows"),
    pytest.param(grading.check_prune_mlp_channels, prune_mlp_channels_sum_of_norms, id="7.4-sum-of-norms"),
    pytest.param(grading.check_prune_mlp_channels, prune_mlp_channels_no_down, id="7.4-ignores-down"),
    pytest.param(grading.check_prune_mlp_channels, prune_mlp_channels_truncates, id="7.4-int-truncates-count"),
    pytest.param(grading.check_prune_mlp_channels, prune_mlp_channels_score_order, id="7.4-score-order"),
    pytest.param(grading.check_prune_mlp_channels, prune_mlp_channels_threshold, id="7.4-threshold-ties"),
]


# ---------------------------------------------------------------------------------------------------------------------
# The worked examples above each exercise, recomputed with minillm's reference.
# ---------------------------------------------------------------------------------------------------------------------

SOLUTION = Path(__file__).resolve().parents[2] / "solutions" / "07_pruning.ipynb"
# The learner's function names, bound to the package's reference for the worked examples.
REFERENCE = {
    "torch": torch,
    "magnitude_mask": magnitude_mask,
    "wanda_mask": _wanda_mask_ref,
    "nm_mask": nm_mask,
    "prune_mlp_channels": prune_mlp_channels_ref,
}
def test_worked_examples_are_the_references_output():
    check_worked_examples(SOLUTION, 7, ["7.1", "7.2", "7.3", "7.4"], REFERENCE)