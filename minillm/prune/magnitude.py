"""Magnitude pruning: drop the weights with the smallest absolute value, row by row.

In doing so, you will learn about:
- the oldest pruning criterion, ``score = |W|`` (Han et al., "Learning both Weights and Connections for Efficient
  Neural Networks", arXiv 1506.02626), and why it works poorly on LLMs without retraining: a small weight that
  multiplies a huge activation matters more than a big weight on a quiet input channel (see ``wanda.py``);
- *where* to compare scores. Comparing within each output row (every neuron keeps the same fraction of its inputs)
  is what Wanda found best for LLMs (Sun et al., arXiv 2306.11695, section 3 "comparison group"); it also makes the
  achieved sparsity exact per row instead of only on average.

A mask is a bool tensor shaped like the weight: True = keep. Every criterion in ``minillm.prune`` produces a score
with the weight's shape, and one of two mask functions turns it into a mask: ``row_mask`` here (unstructured) or
``nm_mask`` in ``semistructured.py`` (N:M). Notebook 07 (``07_pruning``) builds both.
"""

from __future__ import annotations

import torch


def check_sparsity(sparsity: float) -> None:
    """Raise ValueError unless 0 <= sparsity < 1 (pruning everything would leave a layer that outputs zeros)."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")


def magnitude_score(weight: torch.Tensor) -> torch.Tensor:
    """Importance of each weight for magnitude pruning: ``|W|``, same shape as ``weight`` (out, in)."""
    return weight.detach().abs()


def num_pruned_per_row(in_features: int, sparsity: float) -> int:
    """How many of a row's `in_features` weights are removed: the nearest integer to ``sparsity * in_features``.

    Rounding is the only way the achieved sparsity can differ from the request: by at most ``0.5 / in_features``
    (0.09% for SmolLM2's 576-wide rows). Python's ``round`` breaks exact ties (.5) to the even integer.
    """
    check_sparsity(sparsity)
    return round(sparsity * in_features)


def row_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask that removes the lowest-scoring ``sparsity`` fraction of every row of `score` (out, in).

    Every row loses exactly ``num_pruned_per_row(in, sparsity)`` entries, so every output neuron keeps the same number
    of inputs. Ties are broken by position (a stable sort), so the mask is deterministic.
    """
    if score.dim() != 2:
        raise ValueError(f"score must be 2-D (out_features, in_features), got shape {tuple(score.shape)}")
    num_pruned = num_pruned_per_row(score.shape[1], sparsity)
    mask = torch.ones_like(score, dtype=torch.bool)
    if num_pruned == 0:
        return mask
    # Indices of the `num_pruned` smallest scores in each row.
    order = torch.sort(score, dim=1, stable=True).indices  # (out, in), ascending
    mask.scatter_(1, order[:, :num_pruned], False)
    return mask


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Per-row magnitude pruning of one weight (out, in): the keep-mask of ``row_mask(|W|, sparsity)``."""
    return row_mask(magnitude_score(weight), sparsity)
