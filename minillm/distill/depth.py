"""Depth pruning: measure how much each decoder layer changes its input, then drop the layers that change it least.

In doing so, you will learn about:
  * block influence (ShortGPT, Men et al., "ShortGPT: Layers in Large Language Models are More Redundant Than You
    Expect", arXiv 2403.03853): ``BI_i = 1 - mean_t cos(x_t^(i), x_t^(i+1))``, one minus the cosine
    similarity between a layer's input and output residual stream, averaged over calibration tokens. A layer whose
    output points where its input pointed mostly adds a small correction, and the model survives without it;
  * why depth is the cheapest cut in wall-clock time: a dropped layer removes its whole chain of kernels (and its
    KV cache), while a narrower layer runs the same number of smaller ones (Minitron, arXiv 2407.14679, compares
    the two: width pruning keeps more accuracy, depth pruning saves more time);

``drop_layers`` edits the model in place: the kept layers are renumbered 0..L'-1 (attention backends address the KV
cache by ``layer_idx``) and ``config.num_layers`` is updated, so caches, engines and checkpoints sized from the
config stay right. Notebook 08 (``08_distillation``) plots the influence of every SmolLM2 layer.

Shapes: B batch, T tokens, C model dim, L layers.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def block_influence(model: nn.Module, calibration: torch.Tensor, chunk_size: int = 8) -> torch.Tensor:
    """ShortGPT's block influence of every decoder layer over calibration token ids (B, T) -> (L,) float32.

    One forward pass with a hook on each layer; each layer's score averages ``1 - cos(input, output)`` over every
    token. A cosine ignores length, so the few tokens with huge residual streams (the attention sinks of Xiao et
    al., arXiv 2309.17453) count once each, like any other.
    """
    if calibration.dim() != 2 or calibration.numel() == 0:
        raise ValueError(f"calibration must be token ids (B, T), got shape {tuple(calibration.shape)}")
    L = len(model.layers)
    total, num_tokens = torch.zeros(L, dtype=torch.float64), 0

    def hook(i: int):
        def record(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            x_in, x_out = inputs[0].float(), output.float()  # (B, T, C) each
            total[i] += (1 - F.cosine_similarity(x_in, x_out, dim=-1)).double().sum().cpu()

        return record

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(model.layers)]
    try:
        device = next(model.parameters()).device
        for ids in calibration.to(device).split(chunk_size):
            model(ids)
            num_tokens += ids.numel()
    finally:
        for handle in handles:
            handle.remove()
    return (total / num_tokens).float()


def layers_to_drop(influence: torch.Tensor, num_drop: int) -> list[int]:
    """The `num_drop` layers of least influence, in increasing layer order."""
    if not 0 <= num_drop < influence.numel():
        raise ValueError(f"num_drop must be in [0, {influence.numel()}) (keep at least one layer), got {num_drop}")
    return sorted(influence.argsort()[:num_drop].tolist())


def drop_layers(model: nn.Module, layers: list[int]) -> list[int]:
    """Remove the decoder layers `layers` (original indices) in place; return the kept original indices.

    The kept layers keep their order and weights, get ``layer_idx`` 0..L'-1, and ``model.config.num_layers``
    becomes L'. The returned list maps student layer i to teacher layer ``kept[i]`` (for hidden-state matching).
    """
    L = len(model.layers)
    bad = [i for i in layers if not (isinstance(i, int) and 0 <= i < L)]
    if bad or len(set(layers)) != len(layers):
        raise ValueError(f"layers must be distinct ints in [0, {L}), got {layers!r}")
    if len(layers) == L:
        raise ValueError(f"cannot drop all {L} layers; keep at least one")
    kept = [i for i in range(L) if i not in set(layers)]
    model.layers = nn.ModuleList(model.layers[i] for i in kept)
    for new_idx, layer in enumerate(model.layers):
        layer.self_attn.layer_idx = new_idx
    model.config = dataclasses.replace(model.config, num_layers=len(kept))
    return kept
