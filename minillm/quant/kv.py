"""int8 KV cache entries: one absmax scale per token per KV head.

In doing so, you will learn about:
  * why the KV cache is the other big memory consumer: per token it holds 2 * num_layers * Hkv * D numbers, so at
    long contexts and large batches it outgrows the weights (Kwon et al., arXiv 2309.06180 §2);
  * quantizing it per token and per head: every cached key or value vector k[b, h, t, :] gets its own scale
    max|k| / 127. Keys have a few large channels shared by all tokens (Hooper et al., KVQuant, arXiv 2401.18079
    §3.1), so a per-vector scale is coarse for keys but needs no calibration and can be computed when the token is
    written, which is what a cache needs (vLLM and TensorRT-LLM's int8/fp8 KV caches scale similarly);
  * the bookkeeping: D int8 values + one fp16 scale per vector, (D + 2) bytes instead of 2 * D in fp16.
The cache that stores these codes and dequantizes them when attending is ``minillm/kvcache/paged_int8.py``
(``LLM(kv_cache_dtype="int8")``).
Notebook 06 (``06_quantization``) measures its accuracy on the real model's keys and values.

Shapes: B batch, Hkv KV heads, T tokens, D head dim.
"""

from __future__ import annotations

import torch

KV_SCALE_DTYPE = torch.float16


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., D) float, e.g. keys (B, Hkv, T, D) -> codes int8 (..., D) and scales (..., 1) fp16.

    x[..., d] ~ codes[..., d] * scales[..., 0]; every vector along D has its own absmax scale.
    """
    if not x.is_floating_point():
        raise TypeError(f"quantize_kv expects a float tensor, got {x.dtype}")
    absmax = x.float().abs().amax(dim=-1, keepdim=True)  # (..., 1)
    scale = (absmax / 127).to(KV_SCALE_DTYPE)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # all-zero vectors (padding) stay exact
    # Codes from the fp16-rounded scale, so stored codes and stored scale agree.
    codes = torch.clamp(torch.round(x.float() / scale.float()), -127, 127).to(torch.int8)
    return codes, scale


def dequantize_kv(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """codes int8 (..., D), scales (..., 1) -> (..., D) in `dtype`."""
    return (codes.float() * scale.float()).to(dtype)
