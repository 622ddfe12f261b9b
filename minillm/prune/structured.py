"""Structured pruning: remove whole attention heads and MLP channels, so the matrices really get smaller.

In doing so, you will learn about:
- why zeros are not speed: a dense GEMM multiplies zeros as fast as anything else, but dropping a head removes D rows
  of q_proj, D columns of o_proj and the head's whole attention computation, and dropping an MLP channel removes a
  row of gate_proj and up_proj and a column of down_proj (Michel et al., "Are Sixteen Heads Really Better than
  One?", arXiv 1905.10650; Ma et al., "LLM-Pruner", arXiv 2305.11627);
- grouped-query attention constrains what can go: query heads h = g*G .. g*G+G-1 (G = H / Hkv) share K/V head g.
  We either remove whole KV groups (the K/V head with its G query heads: the KV cache shrinks too) or the same
  number of query heads from every group (K/V heads stay), so every layer still has H' = Hkv' * G' heads with query
  head h' reading K/V head h' // G', exactly the layout the attention code expects;
- importance scores: "wanda" sums the Wanda score ``||W_col|| * ||X_j||`` (arXiv 2306.11695) over the input columns
  a head or channel owns in o_proj / down_proj, measured with hooks on calibration text through the dense model in
  one pass (scores only rank units, so the paper's layer-by-layer refresh matters less than for masks);
  "magnitude" uses the weight norms alone (no calibration).

Every layer loses the same number of units, so the model config (``num_heads``, ``num_kv_heads``,
``intermediate_size``) still describes every layer and KV caches sized from it stay correct; which units go is
decided per layer. Notebook 07 (``07_pruning``) measures the parameter count and decode speed before and after.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from minillm.eval import calibration_batch
from minillm.prune.wanda import (
    DEFAULT_CALIBRATION_SEQ_LEN,
    DEFAULT_CALIBRATION_TOKENS,
    InputNormCollector,
)

STRUCTURED_SCORES = ("wanda", "magnitude")
HEAD_UNITS = ("kv_group", "query_head")


@dataclass
class StructuredPruneResult:
    """What a structured pruning call removed: parameter counts and, per layer, the removed unit indices."""

    num_params_before: int
    num_params_after: int
    removed: dict[int, list[int]] = field(default_factory=dict)

    @property
    def fraction_removed(self) -> float:
        return 1 - self.num_params_after / self.num_params_before


def count_parameters(model: nn.Module) -> int:
    """Number of parameters, tied embeddings counted once (``parameters()`` yields a shared tensor once)."""
    return sum(p.numel() for p in model.parameters())


def slice_linear(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    """A new, smaller nn.Linear keeping output features `rows` and input features `cols` (None keeps all)."""
    weight = linear.weight.detach()
    bias = linear.bias.detach() if linear.bias is not None else None
    if rows is not None:
        weight = weight[rows]
        bias = bias[rows] if bias is not None else None
    if cols is not None:
        weight = weight[:, cols]
    out_features, in_features = weight.shape
    new = nn.Linear(in_features, out_features, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    return new


def check_structured_args(fraction: float, score: str) -> None:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be a number in [0, 1), got {fraction!r}")
    if score not in STRUCTURED_SCORES:
        raise ValueError(f"unknown importance score {score!r}; choose one of {STRUCTURED_SCORES}")


@torch.no_grad()
def output_input_norms(
    model: nn.Module,
    calibration: torch.Tensor | str | None,
    tokenizer: Any,
    num_tokens: int = DEFAULT_CALIBRATION_TOKENS,
    chunk_size: int = 8,
) -> dict[str, torch.Tensor]:
    """L2 norm of every input feature of each layer's o_proj and down_proj over the calibration tokens, in one pass
    of the dense model: ``{"3.self_attn.o_proj": (H*D,), "3.mlp.down_proj": (I,), ...}``."""
    if not isinstance(calibration, torch.Tensor):
        if tokenizer is None:
            raise ValueError("score='wanda' needs calibration token ids, or a tokenizer to tokenize calibration text")
        calibration = calibration_batch(tokenizer, calibration, num_tokens, DEFAULT_CALIBRATION_SEQ_LEN)
    linears = {}
    for i, layer in enumerate(model.layers):
        linears[f"{i}.self_attn.o_proj"] = layer.self_attn.o_proj
        linears[f"{i}.mlp.down_proj"] = layer.mlp.down_proj
    device = next(model.parameters()).device
    with InputNormCollector(linears) as collector:
        for ids in calibration.to(device).split(chunk_size):
            model(ids)
    return collector.norms()


def column_scores(linear: nn.Linear, input_norm: torch.Tensor | None) -> torch.Tensor:
    """Per input column j: ``||W[:, j]|| * ||X_j||`` (wanda) or ``||W[:, j]||`` (input_norm None). -> (in,)"""
    col_norm = linear.weight.detach().float().norm(dim=0)
    return col_norm if input_norm is None else col_norm * input_norm.to(col_norm.device)


@torch.no_grad()
def prune_heads(
    model: nn.Module,
    fraction: float,
    unit: str = "kv_group",
    score: str = "wanda",
    calibration: torch.Tensor | str | None = None,
    tokenizer: Any = None,
) -> StructuredPruneResult:
    """Remove attention heads from every layer in place, shrinking q/k/v/o_proj and updating head counts.

    unit="kv_group": remove ``round(fraction * Hkv)`` whole KV groups per layer (a K/V head and its G query heads).
    unit="query_head": remove ``round(fraction * G)`` query heads from every group; K/V heads stay.
    score: "wanda" (activation-weighted o_proj columns; calibration as in ``prune_model``) or "magnitude".
    Each head's score is the sum of its o_proj column scores; a group's score is the sum of its query heads'.
    Returns the parameter counts and, per layer, the removed query-head indices (original numbering).
    """
    check_structured_args(fraction, score)
    if unit not in HEAD_UNITS:
        raise ValueError(f"unknown head unit {unit!r}; choose one of {HEAD_UNITS}")
    config = model.config
    H, Hkv, D = config.num_heads, config.num_kv_heads, config.head_dim
    G = H // Hkv
    num_removed = round(fraction * (Hkv if unit == "kv_group" else G))
    if num_removed >= (Hkv if unit == "kv_group" else G):
        raise ValueError(f"fraction={fraction} would remove every {unit} (Hkv={Hkv}, G={G}); use a smaller fraction")
    norms = output_input_norms(model, calibration, tokenizer) if score == "wanda" else {}
    result = StructuredPruneResult(count_parameters(model), 0)
    for i, layer in enumerate(model.layers):
        attn = layer.self_attn
        head_score = column_scores(attn.o_proj, norms.get(f"{i}.self_attn.o_proj")).view(H, D).sum(dim=1)  # (H,)
        by_group = head_score.view(Hkv, G)  # query head h = g * G + r
        if unit == "kv_group":
            kept_groups = by_group.sum(dim=1).argsort(descending=True)[: Hkv - num_removed].sort().values
            kept_q = (kept_groups[:, None] * G + torch.arange(G, device=kept_groups.device)).flatten()
        else:
            kept_groups = torch.arange(Hkv, device=head_score.device)
            kept_r = by_group.argsort(dim=1, descending=True)[:, : G - num_removed].sort(dim=1).values  # (Hkv, G')
            kept_q = (kept_groups[:, None] * G + kept_r).flatten()
        # Kept heads stay sorted, so query head h' still reads K/V head h' // G' after the shrink.
        dims = torch.arange(D, device=kept_q.device)
        q_rows = (kept_q[:, None] * D + dims).flatten()
        kv_rows = (kept_groups[:, None] * D + dims).flatten()
        attn.q_proj = slice_linear(attn.q_proj, rows=q_rows)
        attn.k_proj = slice_linear(attn.k_proj, rows=kv_rows)
        attn.v_proj = slice_linear(attn.v_proj, rows=kv_rows)
        attn.o_proj = slice_linear(attn.o_proj, cols=q_rows)
        attn.num_heads, attn.num_kv_heads = len(kept_q), len(kept_groups)
        result.removed[i] = sorted(set(range(H)) - set(kept_q.tolist()))
    model.config = dataclasses.replace(
        config, num_heads=attn.num_heads, num_kv_heads=attn.num_kv_heads, head_dim=D
    )
    result.num_params_after = count_parameters(model)
    return result


@torch.no_grad()
def prune_mlp_channels(
    model: nn.Module,
    fraction: float,
    score: str = "wanda",
    calibration: torch.Tensor | str | None = None,
    tokenizer: Any = None,
) -> StructuredPruneResult:
    """Remove ``round(fraction * I)`` intermediate channels from every MLP in place (rows of gate/up_proj, columns
    of down_proj) and update ``config.intermediate_size``.

    score: "wanda" (``||W_down[:, c]|| * ||X_c||`` with X the down_proj input) or "magnitude" (the norm of the
    channel's weights in gate, up and down together). Returns parameter counts and removed channels per layer.
    """
    check_structured_args(fraction, score)
    config = model.config
    I = config.intermediate_size
    num_kept = I - round(fraction * I)
    norms = output_input_norms(model, calibration, tokenizer) if score == "wanda" else {}
    result = StructuredPruneResult(count_parameters(model), 0)
    for i, layer in enumerate(model.layers):
        mlp = layer.mlp
        if score == "wanda":
            channel_score = column_scores(mlp.down_proj, norms[f"{i}.mlp.down_proj"])  # (I,)
        else:
            channel_score = (
                mlp.gate_proj.weight.float().pow(2).sum(dim=1)
                + mlp.up_proj.weight.float().pow(2).sum(dim=1)
                + mlp.down_proj.weight.float().pow(2).sum(dim=0)
            ).sqrt()  # (I,)
        kept = channel_score.argsort(descending=True)[:num_kept].sort().values
        mlp.gate_proj = slice_linear(mlp.gate_proj, rows=kept)
        mlp.up_proj = slice_linear(mlp.up_proj, rows=kept)
        mlp.down_proj = slice_linear(mlp.down_proj, cols=kept)
        result.removed[i] = sorted(set(range(I)) - set(kept.tolist()))
    model.config = dataclasses.replace(config, intermediate_size=num_kept)
    result.num_params_after = count_parameters(model)
    return result
