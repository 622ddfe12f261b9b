"""Weight-only quantization of a whole model: int8, int4 round-to-nearest, and int4 with AWQ scaling.

`quantize_model` swaps every linear layer of a ``minillm.model.Transformer`` for an `Int8Linear` or `Int4Linear`
(in place) and returns the model. Schemes:
  * "int8": absmax per output channel (8 bits + one fp16 scale per row);
  * "int4": asymmetric round-to-nearest per group of `group_size` inputs (4 bits + fp16 scale + uint8 zero-point);
  * "int4-awq": the same storage, after AWQ's activation-aware scaling (see ``awq.py``) searched on calibration
    text; `calibration=None` uses the English text shipped in ``minillm/data`` (no network).
The LM head is quantized too unless `quantize_lm_head=False`. With tied embeddings (SmolLM2), the head is untied
from the embedding for quantization and the embedding lookup then reads rows of the quantized head
(`QuantizedEmbedding`), so the table is still stored once and `model_nbytes` counts it once.
Notebook 06 (``06_quantization``) compares the schemes' perplexity and bytes.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from minillm.quant.awq import awq_scale_
from minillm.quant.linear import Int4Linear, Int8Linear, QuantizedEmbedding, check_int4_shape
from minillm.quant.numerics import dequantize, quantize_asymmetric, quantize_symmetric

SCHEMES = ("int8", "int4", "int4-awq")
LAYER_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
CALIBRATION_SEQ_LEN = 512

__all__ = [
    "SCHEMES", "Int4Linear", "Int8Linear", "QuantizedEmbedding", "calibration_ids", "dequantize", "model_nbytes",
    "quantize_asymmetric", "quantize_model", "quantize_symmetric",
]


def model_nbytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers, each shared tensor counted once (tied weights, shared tables)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.data_ptr(), t.numel(), t.dtype)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def calibration_ids(tokenizer, text: str | None = None, num_tokens: int = 2048) -> torch.Tensor:
    """Token ids (B, CALIBRATION_SEQ_LEN) of the calibration text (default: the one shipped in minillm/data, whose
    ~2.3k tokens give four rows of 512). A text too short for `num_tokens` is an error, not a silent truncation."""
    from minillm.eval import calibration_batch

    return calibration_batch(tokenizer, text, num_tokens, CALIBRATION_SEQ_LEN)


def _quantized(linear: nn.Linear, scheme: str, group_size: int, backend: str) -> nn.Module:
    if scheme == "int8":
        return Int8Linear.from_linear(linear, backend=backend)
    return Int4Linear.from_linear(linear, group_size=group_size, backend=backend)


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    scheme: str,
    group_size: int = 128,
    calibration: str | torch.Tensor | None = None,
    quantize_lm_head: bool = True,
    tokenizer=None,
    backend: str = "auto",
    num_grid: int = 20,
) -> nn.Module:
    """Quantize the linear layers of a minillm Transformer in place; returns the model.

    scheme: one of SCHEMES. group_size: int4 group along the input dim (one of INT4_GROUP_SIZES, at most every
    layer's in_features; a row's last group is shorter when it does not divide in_features). calibration (int4-awq only): token ids (B, T) or (T,), a text (needs `tokenizer`), or None
    for the shipped calibration text (needs `tokenizer`). backend: "auto" (Triton kernels on CUDA, else PyTorch),
    "triton" or "reference", for every quantized layer. num_grid: AWQ's alpha grid has num_grid + 1 points.
    After "int4-awq", `model.awq_report` holds each group's chosen alpha, loss curve and scale.
    Quantize after moving the model to its device and dtype: a later `.to(dtype)` would convert the fp16 scales too.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; choose one of {SCHEMES}")
    linears = [(layer, name) for layer in model.layers for name in LAYER_LINEARS]
    if scheme != "int8":
        # Check every width before AWQ touches the weights, so a bad group size leaves the model as it was.
        widths = {layer.get_submodule(name).in_features for layer, name in linears}
        for in_features in sorted(widths | ({model.lm_head.in_features} if quantize_lm_head else set())):
            check_int4_shape(in_features, group_size)

    tied = model.lm_head.weight is model.embed_tokens.weight
    embed_dtype = model.embed_tokens.weight.dtype
    if quantize_lm_head and tied:
        # Untie: AWQ rescales the head's columns, and the head gets its own quantized storage below.
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone(), requires_grad=False)

    head_scale = None
    if scheme == "int4-awq":
        if isinstance(calibration, torch.Tensor):
            ids = calibration if calibration.dim() == 2 else calibration.view(1, -1)
        elif tokenizer is None:
            raise ValueError("int4-awq with a text or calibration=None needs tokenizer=... to tokenize it")
        else:
            ids = calibration_ids(tokenizer, calibration)
        device = model.embed_tokens.weight.device
        report = awq_scale_(model, ids.to(device), group_size, num_grid, include_lm_head=quantize_lm_head)
        model.awq_report = report
        if quantize_lm_head:
            head_scale = report["lm_head"]["scale"]

    for layer, name in linears:
        parent_name, child = name.split(".")
        parent = layer.get_submodule(parent_name)
        setattr(parent, child, _quantized(getattr(parent, child), scheme, group_size, backend))
    if quantize_lm_head:
        model.lm_head = _quantized(model.lm_head, scheme, group_size, backend)
        if tied:
            model.embed_tokens = QuantizedEmbedding(model.lm_head, embed_dtype, col_scale=head_scale)
    return model
