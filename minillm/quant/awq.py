"""AWQ: activation-aware weight quantization, by per-input-channel scaling searched on calibration data.

In doing so, you will learn about:
  * why a few weights matter more: an input channel with large activations multiplies its quantization error by a
    large number, so the ~1% "salient" channels are found from activation magnitudes, not weight magnitudes
    (Lin et al., arXiv 2306.00978 §3.1);
  * protecting them without mixed precision: scale input channel k of the weight up by s_k and its activation down
    by 1/s_k. The product is unchanged, but the scaled weights see relatively smaller rounding error (§3.2);
  * searching s = mean|x|^alpha over a grid of alpha in [0, 1], keeping the alpha that minimizes the output MSE of
    the quantized layers on calibration activations (§3.2, "searching to scale"); alpha = 0 is round-to-nearest,
    so the search can only help on the calibration data;
  * folding 1/s into the operation that *produces* the activation, so the scaled model costs nothing at run time:
    q/k/v share `input_layernorm` (divide its weight), gate/up share `post_attention_layernorm`, down's input is
    silu(gate) * up (divide up's rows), o's input is the attention output, a mix of v rows (divide v's rows;
    with grouped-query attention the query heads that read one KV head share its scales, so the fold stays exact),
    and an untied lm_head reads the final `norm`.
All folds are exact in floating point, so the activations of every layer can be collected in one forward pass of the
original model. Simplifications against the paper's code: the search loss is the MSE of the group's linear outputs
(not of the whole attention/MLP block), and the weight-clipping search is left out.
Notebook 06 (``06_quantization``) visualizes the search for one layer.

Shapes: C model dim, K a layer's input width, N its output width, n calibration tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from minillm.quant.numerics import fake_quantize


@dataclass
class ScaleGroup:
    """Linears that read the same activation, and the op whose output it is (where 1/s gets folded)."""

    name: str
    linears: list[nn.Linear]
    prev: nn.Module  # an RMSNorm (fold into .weight) or an nn.Linear (fold into its output rows)
    kv_group: int = 1  # query heads per KV head when prev is v_proj: heads sharing a v row must share its scale
    head_dim: int = 0


def scale_groups(model: nn.Module, include_lm_head: bool = True) -> list[ScaleGroup]:
    """The AWQ groups of a minillm Transformer, in forward order."""
    config = model.config
    kv_group = config.num_heads // config.num_kv_heads
    groups = []
    for i, layer in enumerate(model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        groups += [
            ScaleGroup(f"layers.{i}.qkv", [attn.q_proj, attn.k_proj, attn.v_proj], layer.input_layernorm),
            ScaleGroup(f"layers.{i}.o", [attn.o_proj], attn.v_proj, kv_group, config.head_dim),
            ScaleGroup(f"layers.{i}.gate_up", [mlp.gate_proj, mlp.up_proj], layer.post_attention_layernorm),
            ScaleGroup(f"layers.{i}.down", [mlp.down_proj], mlp.up_proj),
        ]
    if include_lm_head:
        groups.append(ScaleGroup("lm_head", [model.lm_head], model.norm))
    return groups


@torch.no_grad()
def collect_activations(
    model: nn.Module, groups: list[ScaleGroup], input_ids: torch.Tensor, num_loss_tokens: int = 512
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """One forward pass over input_ids (B, T). For each group: mean |x| per input channel (K,) over all tokens,
    and about `num_loss_tokens` evenly spaced token rows x (n, K) for the search loss.
    """
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, list[torch.Tensor]] = {}
    B, T = input_ids.shape
    keep = torch.linspace(0, T - 1, max(1, num_loss_tokens // B)).long().unique()  # same positions in each row

    def hook_for(name: str):
        def hook(module, args):
            x = args[0].detach().float()  # (B, T, K)
            sums[name] = sums.get(name, 0) + x.abs().sum(dim=(0, 1))
            rows.setdefault(name, []).append(x[:, keep.to(x.device)].reshape(-1, x.shape[-1]))

        return hook

    handles = [g.linears[0].register_forward_pre_hook(hook_for(g.name)) for g in groups]
    try:
        model(input_ids)
    finally:
        for handle in handles:
            handle.remove()
    return {name: (sums[name] / (B * T), torch.cat(rows[name])) for name in sums}


def share_across_heads(s: torch.Tensor, kv_group: int, head_dim: int) -> torch.Tensor:
    """Scales (H*D,) of o_proj's input averaged over the query heads of each KV head, broadcast back to (H*D,).

    Query head h reads KV head h // kv_group, so channel (h, d) of the attention output is a mix of v channel
    (h // kv_group, d): dividing that v row by one number scales all kv_group of them alike.
    """
    s_v = s.view(-1, kv_group, head_dim).mean(1)  # (Hkv, D)
    return s_v.repeat_interleave(kv_group, dim=0).reshape(-1)  # (H*D,)


def fake_quantize_int4(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """What `Int4Linear` stores, dequantized: asymmetric 4-bit per group, a shorter last group when G does not divide K."""
    K = w.shape[1]
    w_padded = F.pad(w, (0, -K % group_size))  # zeros never change a group's range, which includes 0
    return fake_quantize(w_padded, bits=4, granularity="group", group_size=group_size, symmetric=False)[:, :K]


@torch.no_grad()
def search_scale(
    x_mean: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    group_size: int,
    num_grid: int = 20,
    kv_group: int = 1,
    head_dim: int = 0,
    max_rows: int = 4096,
) -> tuple[torch.Tensor, float, list[float]]:
    """Grid search of AWQ's per-input-channel scale for one group.

    x_mean (K,): mean |x| per channel; x (n, K): calibration rows; weight (N, K): the group's weights stacked.
    Returns the best s (K,), its alpha, and the loss at every alpha of linspace(0, 1, num_grid + 1).
    Loss: mean squared error between x @ W^T and (x / s) @ Q(W * s)^T, Q = asymmetric int4 round-to-nearest per group.
    Quantization is per row, so the loss on `max_rows` evenly spaced rows of W estimates the loss on all of them
    (the 49152-row LM head would otherwise dominate the search time).
    """
    if weight.shape[0] > max_rows:
        weight = weight[torch.linspace(0, weight.shape[0] - 1, max_rows, device=weight.device).long()]
    w = weight.float()
    x = x.to(w.device, torch.float32)
    x_mean = x_mean.to(w.device, torch.float32)
    ref = x @ w.t()  # (n, N)
    best_loss, best_alpha, best_s = float("inf"), 0.0, torch.ones_like(x_mean)
    losses = []
    for alpha in torch.linspace(0, 1, num_grid + 1).tolist():
        s = x_mean.pow(alpha).clamp(min=1e-4)  # (K,)
        if kv_group > 1:
            s = share_across_heads(s, kv_group, head_dim)
        s = s / (s.max() * s.min()).sqrt()  # center the scales around 1, as the reference implementation does
        w_q = fake_quantize_int4(w * s, group_size)
        loss = ((x / s) @ w_q.t() - ref).pow(2).mean().item()
        losses.append(loss)
        if loss < best_loss:
            best_loss, best_alpha, best_s = loss, alpha, s
    return best_s, best_alpha, losses


@torch.no_grad()
def apply_scale(group: ScaleGroup, s: torch.Tensor) -> None:
    """Fold s: multiply the group's weight columns by s, divide the producing op's output by s (exact)."""
    for linear in group.linears:
        linear.weight.mul_(s.to(linear.weight))
    prev = group.prev
    if isinstance(prev, nn.Linear):
        s_rows = s if group.kv_group == 1 else s.view(-1, group.kv_group, group.head_dim)[:, 0].reshape(-1)
        prev.weight.div_(s_rows.to(prev.weight)[:, None])
        if prev.bias is not None:
            prev.bias.div_(s_rows.to(prev.bias))
    else:
        prev.weight.div_(s.to(prev.weight))


@torch.no_grad()
def awq_scale_(
    model: nn.Module,
    calibration_ids: torch.Tensor,
    group_size: int = 128,
    num_grid: int = 20,
    include_lm_head: bool = True,
    num_loss_tokens: int = 512,
) -> dict[str, dict]:
    """Search and fold AWQ scales into `model` in place (weights stay floating point; quantize afterwards).

    calibration_ids (B, T) token ids. Returns {group name: {"alpha": best alpha, "losses": loss per grid alpha,
    "scale": the folded s (K,)}}.
    A tied lm_head must be untied by the caller first: scaling it would otherwise scale the embedding too.
    """
    if include_lm_head and model.lm_head.weight is model.embed_tokens.weight:
        raise ValueError("untie lm_head from embed_tokens before scaling it (see quantize_model)")
    groups = scale_groups(model, include_lm_head)
    stats = collect_activations(model, groups, calibration_ids, num_loss_tokens)
    report = {}
    for group in groups:
        x_mean, x = stats[group.name]
        weight = torch.cat([linear.weight for linear in group.linears])  # (sum of N, K)
        s, alpha, losses = search_scale(x_mean, x, weight, group_size, num_grid, group.kv_group, group.head_dim)
        apply_scale(group, s)
        report[group.name] = {"alpha": alpha, "losses": losses, "scale": s.cpu()}
    return report
