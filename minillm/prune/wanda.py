"""Wanda: prune by weight magnitude times input activation norm, no retraining.

In doing so, you will learn about:
- why magnitude alone fails on LLMs: a few input features (hidden-state channels) carry activations 10-100x larger
  than the rest (Dettmers et al., "LLM.int8()", arXiv 2208.07339, section 3). A small weight on such a channel
  contributes more to the output than a large weight on a quiet one, and magnitude pruning removes it;
- the Wanda score (Sun et al., "A Simple and Effective Pruning Approach for Large Language Models",
  arXiv 2306.11695, equation 1): ``S_ij = |W_ij| * ||X_j||_2``, where ``||X_j||_2`` is the L2 norm of input feature j
  over a few thousand calibration tokens, compared within each output row (section 3);
- forward hooks: ``register_forward_hook`` on each ``nn.Linear`` sees its input without changing the model code.

We follow the paper's sequential procedure (its algorithm and released code, section 3 "procedure"): the decoder
layers are processed one at a time; layer i's input norms are measured on the outputs of the already pruned layers
0..i-1, then layer i is pruned and its pruned outputs feed layer i+1. So each layer is calibrated on the
activations it will really see, at the cost of keeping one layer's activations for the calibration batch (16 x 128
tokens x C floats: 5 MB for SmolLM2) and one extra pass per layer. All linears of one layer take their norms from
that layer's dense forward, as in the paper. Notebook 07 (``07_pruning``) plots the activation norms.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

# The paper uses 128 x 2048 tokens, but Wanda is robust to far fewer (its section 5 varies the number of calibration
# samples); 2048 tokens fit the ~2.4k-token calibration text shipped in minillm/data.
DEFAULT_CALIBRATION_TOKENS = 2048
DEFAULT_CALIBRATION_SEQ_LEN = 128


def wanda_score(weight: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """``|W| * ||X_j||``: weight (out, in), input_norm (in,) -> score (out, in)."""
    if input_norm.shape != weight.shape[1:]:
        raise ValueError(f"input_norm must have shape ({weight.shape[1]},), got {tuple(input_norm.shape)}")
    return weight.detach().abs() * input_norm.to(weight.device, weight.dtype)[None, :]


class InputNormCollector:
    """Context manager: hooks on the given linears accumulate the squared L2 norm of each input feature.

    >>> with InputNormCollector({"q": layer.self_attn.q_proj}) as collector:
    ...     layer(x, cos, sin)
    >>> collector.norms()["q"]  # (in_features,)
    """

    def __init__(self, linears: dict[str, nn.Linear]):
        self.linears = linears
        self.sum_sq = {name: torch.zeros(lin.in_features, dtype=torch.float64) for name, lin in linears.items()}
        self.num_tokens = 0
        self._handles = []

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            x = inputs[0].detach().reshape(-1, module.in_features)  # (N, in): every token is one sample
            # Accumulate in fp64 on CPU: thousands of squared fp16 activations overflow or lose the small channels.
            self.sum_sq[name] += x.double().pow(2).sum(dim=0).cpu()

        return hook

    def __enter__(self) -> InputNormCollector:
        self._handles = [lin.register_forward_hook(self._hook(name)) for name, lin in self.linears.items()]
        return self

    def __exit__(self, *exc_info) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def norms(self) -> dict[str, torch.Tensor]:
        """L2 norm of each input feature over every token seen: ``{name: (in_features,) float32}``."""
        return {name: s.sqrt().float() for name, s in self.sum_sq.items()}


def decoder_linears(layer: nn.Module) -> dict[str, nn.Linear]:
    """The prunable linears of one decoder layer, by name relative to it (``self_attn.q_proj``, ``mlp.up_proj``...)."""
    return {name: mod for name, mod in layer.named_modules() if isinstance(mod, nn.Linear)}


class _LayerInputsCaptured(Exception):
    """Raised by a pre-hook to stop the model's forward once the first decoder layer's inputs are known."""


def first_layer_inputs(model: nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, tuple, dict]:
    """Run the model up to its first decoder layer: (hidden states (B, T, C), the layer's other args, kwargs).

    A forward pre-hook records what ``model.layers[0]`` receives (embeddings, RoPE cos/sin...) and stops the
    forward, so this does not depend on how the model computes them.
    """
    captured = {}

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured["args"], captured["kwargs"] = args, kwargs
        raise _LayerInputsCaptured

    handle = model.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(input_ids)
    except _LayerInputsCaptured:
        pass
    finally:
        handle.remove()
    args = captured["args"]
    return args[0], args[1:], captured["kwargs"]


def apply_mask(linear: nn.Linear, mask: torch.Tensor) -> None:
    """Zero the weights of `linear` where `mask` (same shape, True = keep) is False, in place."""
    with torch.no_grad():
        linear.weight.masked_fill_(~mask.to(linear.weight.device), 0)


@torch.no_grad()
def prune_wanda(
    model: nn.Module,
    calibration_ids: torch.Tensor,
    make_mask: Callable[[torch.Tensor], torch.Tensor],
    layers: Iterable[int] | None = None,
    chunk_size: int = 8,
) -> None:
    """Sequential Wanda over ``model.layers`` (all of them, or the indices in `layers`), in place.

    calibration_ids (B, T) long. `make_mask(score) -> keep-mask` decides the pattern (``row_mask`` for unstructured,
    ``nm_mask`` for N:M). Sequences are fed in chunks of `chunk_size` to bound activation memory.
    """
    device = next(model.parameters()).device
    selected = set(range(len(model.layers)) if layers is None else layers)
    chunks = []  # per chunk: (hidden states (b, T, C), other layer args, kwargs)
    for ids in calibration_ids.to(device).split(chunk_size):
        chunks.append(first_layer_inputs(model, ids))
    for i, layer in enumerate(model.layers):
        if i > max(selected, default=-1):
            break  # later layers need no calibration
        if i in selected:
            linears = decoder_linears(layer)
            with InputNormCollector(linears) as collector:
                for x, args, kwargs in chunks:
                    layer(x, *args, **kwargs)
            for name, norm in collector.norms().items():
                apply_mask(linears[name], make_mask(wanda_score(linears[name].weight, norm)))
        # The (pruned) layer's outputs are the next layer's calibration inputs.
        chunks = [(layer(x, *args, **kwargs), args, kwargs) for x, args, kwargs in chunks]
