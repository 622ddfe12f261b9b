"""One entry point for weight pruning: a criterion (magnitude or Wanda) times a pattern (unstructured or N:M).

In doing so, you will learn about:
- the two independent choices every pruning method makes: *which* weights matter (the score: ``|W|`` in
  ``magnitude.py``, ``|W| * ||X||`` in ``wanda.py``) and *which groups* compete (a whole output row for unstructured
  sparsity, each run of M inputs for N:M in ``semistructured.py``);
- what is left alone: the embedding and the LM head (tied to it in SmolLM2) are not pruned, as in the Wanda paper
  (arXiv 2306.11695, section 4): they are a small share of a large model's weights and very sensitive;
- how to check the result: ``sparsity_report`` counts the zeros of every pruned layer.

Pruning here only zeroes weights (shapes stay, so the model runs unchanged); ``semistructured.to_semi_structured``
turns 2:4 zeros into speed on a GPU and ``structured.py`` removes whole heads and channels.
Notebook 07 (``07_pruning``) plots perplexity against sparsity for every combination.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import torch
from torch import nn
from torch.sparse import SparseSemiStructuredTensor

from minillm.eval import calibration_batch
from minillm.prune.magnitude import check_sparsity, magnitude_score, row_mask
from minillm.prune.semistructured import nm_mask, parse_pattern
from minillm.prune.wanda import (
    DEFAULT_CALIBRATION_SEQ_LEN,
    DEFAULT_CALIBRATION_TOKENS,
    apply_mask,
    prune_wanda,
)

PRUNE_METHODS = ("magnitude", "wanda")


def prunable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` inside the decoder layers (q/k/v/o, gate/up/down), by full name; never the LM head."""
    return {f"layers.{name}": mod for name, mod in model.layers.named_modules() if isinstance(mod, nn.Linear)}


def mask_function(sparsity: float, pattern: str | None):
    """score (out, in) -> keep-mask: per-row unstructured at `sparsity`, or N:M when a pattern is given."""
    if pattern is None:
        return lambda score: row_mask(score, sparsity)
    n, m = parse_pattern(pattern)
    return lambda score: nm_mask(score, n, m)


def check_prune_args(model: nn.Module, method: str, sparsity: float, pattern: str | None) -> None:
    """Validate everything before touching a weight, so a bad argument never leaves a half-pruned model."""
    if method not in PRUNE_METHODS:
        raise ValueError(f"unknown pruning method {method!r}; choose one of {PRUNE_METHODS}")
    check_sparsity(sparsity)
    if pattern is None:
        return
    n, m = parse_pattern(pattern)
    if abs(sparsity - (1 - n / m)) > 1e-9:
        raise ValueError(
            f"pattern {pattern!r} fixes the sparsity at {1 - n / m:g}, but sparsity={sparsity!r} was asked; "
            f"pass sparsity={1 - n / m:g} or pattern=None"
        )
    for name, linear in prunable_linears(model).items():
        if linear.in_features % m != 0:
            raise ValueError(
                f"pattern {pattern!r} needs every layer's input width divisible by {m}, "
                f"but {name} has in_features={linear.in_features}"
            )


@torch.no_grad()
def prune_model(
    model: nn.Module,
    method: str = "magnitude",
    sparsity: float = 0.5,
    pattern: str | None = None,
    calibration: torch.Tensor | str | None = None,
    tokenizer: Any = None,
    num_calibration_tokens: int = DEFAULT_CALIBRATION_TOKENS,
    calibration_seq_len: int = DEFAULT_CALIBRATION_SEQ_LEN,
) -> nn.Module:
    """Zero weights of every decoder linear layer in place and return the model.

    method: "magnitude" (score ``|W|``) or "wanda" (``|W| * ||X_j||``, calibrated layer by layer).
    sparsity: fraction of each output row's weights removed, in [0, 1); exact per row up to rounding to a whole
        weight (``magnitude.num_pruned_per_row``). With a pattern it must equal ``1 - N/M`` (the default 0.5 fits
        "2:4" and "4:8").
    pattern: None (unstructured) or "N:M" (keep the N largest scores of every M consecutive inputs).
    calibration (Wanda only): token ids (B, T) long, a text, or None for the packaged offline text; texts are
        tokenized with `tokenizer` into ``num_calibration_tokens // calibration_seq_len`` sequences.
    """
    check_prune_args(model, method, sparsity, pattern)
    make_mask = mask_function(sparsity, pattern)
    if method == "magnitude":
        for linear in prunable_linears(model).values():
            apply_mask(linear, make_mask(magnitude_score(linear.weight)))
        return model
    if not isinstance(calibration, torch.Tensor):
        if tokenizer is None:
            raise ValueError("method='wanda' needs calibration token ids, or a tokenizer to tokenize calibration text")
        calibration = calibration_batch(tokenizer, calibration, num_calibration_tokens, calibration_seq_len)
    if calibration.dim() != 2 or calibration.dtype != torch.long:
        raise ValueError(
            f"calibration ids must be a (B, T) long tensor, got shape {tuple(calibration.shape)}, {calibration.dtype}"
        )
    prune_wanda(model, calibration, make_mask)
    return model


def dense_weight(linear: nn.Linear) -> torch.Tensor:
    """The weight as a plain dense tensor, also after ``to_semi_structured`` compressed it."""
    weight = linear.weight.detach()
    if isinstance(weight, SparseSemiStructuredTensor):
        return weight.to_dense()
    return weight


def sparsity_report(model: nn.Module) -> pd.DataFrame:
    """One row per decoder linear: layer index, module name, shape, number of zeros, numel, sparsity.

    Every zero counts, also weights that were zero before pruning (a quantized checkpoint such as the Q8_0
    SmolLM2 holds a few), so a pruned layer's sparsity can exceed the request by those.
    """
    rows = []
    for name, linear in prunable_linears(model).items():
        weight = dense_weight(linear)
        zeros = int((weight == 0).sum())
        _, layer, module = name.split(".", 2)
        rows.append(
            dict(layer=int(layer), module=module, shape=tuple(weight.shape), zeros=zeros, numel=weight.numel(),
                 sparsity=zeros / weight.numel())
        )
    return pd.DataFrame(rows)


def model_sparsity(model: nn.Module) -> float:
    """Fraction of zeros over all prunable weights together (embedding and LM head excluded)."""
    report = sparsity_report(model)
    return float(report.zeros.sum() / report.numel.sum())
