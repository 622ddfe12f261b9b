"""Attention: exact torch references beside Triton kernels (notebook 02_attention), and the backends that put them
between the model and a KV cache (``backends.py``: no cache, contiguous, paged).

`causal_attention` runs causal attention over given tensors with the kernel you name.
"""

from minillm.attention.backends import (
    KERNELS,
    ContiguousAttention,
    NoCacheAttention,
    PagedAttention,
    PagedMetadata,
    causal_attention,
    resolve_kernel,
)
from minillm.attention.flash import flash_attention, flash_attention_ref
from minillm.attention.online import online_attention, online_softmax_step
from minillm.attention.paged import paged_decode_attention, paged_decode_attention_ref
from minillm.attention.reference import attention_probs, attention_ref, causal_mask, repeat_kv
from minillm.attention.varlen import flash_attention_varlen, flash_attention_varlen_ref

__all__ = [
    "KERNELS",
    "ContiguousAttention",
    "NoCacheAttention",
    "PagedAttention",
    "PagedMetadata",
    "resolve_kernel",
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
