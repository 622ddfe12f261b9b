"""Parallel layers: one weight matrix split over ranks, with plain-torch semantics (Megatron-LM, arXiv 1909.08053).

A linear layer y = x Wᵀ with W (out, in) splits two ways:

  * **column-parallel** (``q/k/v_proj``, ``gate/up_proj``): rank r holds rows [a, b) of W, i.e. a slice of the
    *output* features, and computes y[..., a:b] from the whole x. No communication: the next layer wants exactly
    this slice (its heads, its part of the MLP's hidden width).
  * **row-parallel** (``o_proj``, ``down_proj``): rank r holds columns [a, b) of W, a slice of the *input*
    features, and multiplies its slice of x: x[..., a:b] W[:, a:b]ᵀ is a partial sum of y, so the ranks
    **all-reduce** (sum) it. The bias is added once, after the sum.

Column then row is the trick: the activation between them never needs to be gathered, so a transformer layer
costs two all-reduces, one after attention and one after the MLP. The vocabulary splits too: the embedding holds
a slice of the rows (an id outside the slice looks up zeros, and an all-reduce fills in the rest) and the LM head,
which shares that matrix, computes a slice of the logits, which are **all-gathered**.

With ``group=None`` the collectives do nothing, so a shard built that way computes its partial result alone: tests
and exercise 11.1 add or concatenate those partials by hand and compare with the dense layer.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from minillm.parallel.comm import all_gather_last_dim, all_reduce
from minillm.parallel.heads import split_evenly


class ColumnParallelLinear(nn.Linear):
    """Rows [start, end) of a dense (out, in) weight: this rank's slice of the output features. No communication."""

    def __init__(self, in_features: int, out_features: int, bias: bool, start: int):
        super().__init__(in_features, out_features, bias=bias)
        self.start = start  # first output feature of the dense layer this shard computes


class RowParallelLinear(nn.Linear):
    """Columns [start, end) of a dense (out, in) weight: multiplies this rank's slice of the input, then all-reduces
    the partial sums over `group`; the bias (held whole by every rank) is added once, after the sum."""

    def __init__(self, in_features: int, out_features: int, bias: bool, start: int, group=None):
        super().__init__(in_features, out_features, bias=bias)
        self.start, self.group = start, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (..., in_local) -> (..., out)
        y = all_reduce(F.linear(x, self.weight), self.group)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Rows [start, start + n) of the (V, C) embedding; the last rank's slice may be zero-padded to the common n."""

    def __init__(self, num_local: int, dim: int, start: int, vocab_size: int, group=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_local, dim))  # (n, C)
        self.start, self.vocab_size, self.group = start, vocab_size, group

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # ids (B, T) -> (B, T, C)
        local = ids - self.start
        mine = (local >= 0) & (local < self.weight.shape[0])  # (B, T): ids in this rank's slice
        x = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight)  # (B, T, C)
        x = x * mine[..., None].to(x.dtype)  # other ranks' ids contribute zeros here
        return all_reduce(x, self.group)


class ParallelLMHead(nn.Module):
    """The LM head over this rank's vocabulary slice; logits are all-gathered and the padding cut off."""

    def __init__(self, weight: nn.Parameter, vocab_size: int, group=None):
        super().__init__()
        self.weight, self.vocab_size, self.group = weight, vocab_size, group  # (n, C), shared when tied

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (..., C) -> (..., V)
        logits = F.linear(x, self.weight)  # (..., n)
        return all_gather_last_dim(logits, self.group)[..., : self.vocab_size]


def split_linear(weight: torch.Tensor, world_size: int, how: str) -> list[torch.Tensor]:
    """A dense (out, in) weight cut into `world_size` contiguous shards, sized as ``split_evenly`` (larger first).

    how="column": rows of W, (out_r, in) each: rank r's slice of the output features (``ColumnParallelLinear``);
    how="row": columns of W, (out, in_r) each: rank r's slice of the input features (``RowParallelLinear``).
    The shards are views of `weight`. Exercise 11.1 rewrites this.
    """
    if how not in ("column", "row"):
        raise ValueError(f"how must be 'column' or 'row', got {how!r}")
    dim = 0 if how == "column" else 1  # column-parallel slices the output features, rows of W
    return list(torch.split(weight, split_evenly(weight.shape[dim], world_size), dim=dim))
