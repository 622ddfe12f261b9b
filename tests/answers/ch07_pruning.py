"""Chapter 07's graded checks against right answers and plausible wrong ones (collected by tests/test_grading.py).

A wrong answer is a mistake a learner would plausibly make, written as a small function with a comment saying what
is wrong; every check must reject each of its wrong answers and pass each right answer on every random seed.
"""

import pytest
import torch

from minillm import grading
from minillm.prune import magnitude_mask, nm_mask, row_mask

RIGHT_ANSWERS = []
WRONG_ANSWERS = []


def magnitude_mask_global_threshold(weight, sparsity):
    # Wrong: one threshold for the whole matrix, so rows of small weights lose far more than `sparsity`.
    k = round(sparsity * weight.numel())
    if k == 0:
        return torch.ones_like(weight, dtype=torch.bool)
    return weight.abs() > weight.abs().flatten().kthvalue(k).values


def magnitude_mask_signed(weight, sparsity):
    # Wrong: ranks by W instead of |W|, so large negative weights are dropped first.
    return row_mask(weight, sparsity)


def wanda_mask_right(weight, x, sparsity):
    norm = x.reshape(-1, x.shape[-1]).norm(dim=0)  # (in,): over every token
    return row_mask(weight.abs() * norm[None, :], sparsity)


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


RIGHT_ANSWERS += [
    pytest.param(grading.check_magnitude_mask, magnitude_mask, id="7.1-reference"),
    pytest.param(grading.check_wanda_mask, wanda_mask_right, id="7.2-norm-over-tokens"),
    pytest.param(grading.check_nm_mask, nm_mask, id="7.3-reference"),
    pytest.param(grading.check_nm_mask, nm_mask_right, id="7.3-topk"),
]
WRONG_ANSWERS += [
    pytest.param(grading.check_magnitude_mask, magnitude_mask_global_threshold, id="7.1-global-threshold"),
    pytest.param(grading.check_magnitude_mask, magnitude_mask_signed, id="7.1-signed-weights"),
    pytest.param(grading.check_wanda_mask, wanda_mask_norms_per_output, id="7.2-norms-on-wrong-axis"),
    pytest.param(grading.check_wanda_mask, wanda_mask_squared_norm, id="7.2-squared-norm"),
    pytest.param(grading.check_wanda_mask, wanda_mask_magnitude_only, id="7.2-magnitude-only"),
    pytest.param(grading.check_nm_mask, nm_mask_along_outputs, id="7.3-groups-along-outputs"),
    pytest.param(grading.check_nm_mask, nm_mask_strided_groups, id="7.3-strided-groups"),
    pytest.param(grading.check_nm_mask, nm_mask_drops_largest, id="7.3-keeps-smallest"),
]
