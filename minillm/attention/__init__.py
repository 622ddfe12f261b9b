"""Attention backends: an exact torch reference and a Triton FlashAttention kernel (notebook 02_attention).

`causal_attention` is the one entry point the model calls; `backend` picks the implementation.
"""

import torch

from minillm.attention.flash import flash_attention, flash_attention_ref
from minillm.attention.paged import paged_decode_attention, paged_decode_attention_ref
from minillm.attention.online import online_attention, online_softmax_step
from minillm.attention.reference import attention_probs, attention_ref, causal_mask, repeat_kv
from minillm.attention.varlen import flash_attention_varlen, flash_attention_varlen_ref

BACKENDS = ("reference", "triton")

__all__ = [
    "BACKENDS",
    "attention_probs",
    "attention_ref",
    "causal_attention",
    "causal_mask",
    "flash_attention",
    "flash_attention_ref",
    "flash_attention_varlen",
    "flash_attention_varlen_ref",
    "online_attention",
    "paged_decode_attention",
    "paged_decode_attention_ref",
    "online_softmax_step",
    "repeat_kv",
]


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "reference", scale: float | None = None
) -> torch.Tensor:
    """Causal attention, q: (B, H, T, D), k, v: (B, Hkv, S, D) -> o: (B, H, T, D).

    The mask is bottom-right aligned: query i sees keys j <= i + (S - T).
    backend: "reference" (materialized scores, `reference.py`) or "triton" (`flash.py`; falls back to the reference
    where Triton cannot run on the tensors' device).
    """
    if backend == "reference":
        return attention_ref(q, k, v, causal=True, scale=scale)
    if backend == "triton":
        return flash_attention(q, k, v, causal=True, scale=scale)
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
