"""A Llama-family transformer from scratch, small enough to read in one sitting.

In doing so, you will learn about:
  * RMSNorm (Zhang & Sennrich, arXiv 1910.07467): scale by the root mean square, no mean subtraction, no bias;
  * rotary position embeddings, RoPE (Su et al., arXiv 2104.09864): rotate each (x_i, x_{i+D/2}) pair of a query
    or key by an angle proportional to its position, so q.k depends only on the distance between tokens;
  * grouped-query attention, GQA (Ainslie et al., arXiv 2305.13245): H query heads share Hkv < H key/value heads;
  * the SwiGLU MLP (Shazeer, arXiv 2002.05202): down(silu(gate(x)) * up(x));
  * tied embeddings: the LM head reuses the embedding matrix.

Parameter names follow the Hugging Face checkpoints (``layers.0.self_attn.q_proj.weight``...), so loading is a
key copy. Attention is the one seam: each layer hands its queries and new keys and values (already rotated) to an
attention backend, ``attention.forward(layer_idx, q, k, v, metadata)`` (``minillm.attention.backends``). Without
one it is plain causal attention over the given tokens; the cached backends store the new K/V in their pool and
attend over everything stored so far. Later chapters add caches (contiguous, paged) and kernels without touching
this file.
Notebook 01 (``01_llm_from_scratch``) builds this forward pass piece by piece on the real weights.

Shapes: B batch, T tokens, C model dim, H query heads, Hkv KV heads, D head dim, V vocab.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from minillm.attention.backends import AttentionBackend, NoCacheAttention
from minillm.config import ModelConfig

EXACT_ATTENTION = NoCacheAttention("reference")  # what model(input_ids) uses: no cache, materialized scores


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in fp32: the mean of squares of bf16 activations loses too many bits.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_frequencies(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/D) for i < D/2, with Llama 3's long-context rescaling when configured."""
    D = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float64, device="cpu") / D))  # (D/2,)
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type", scaling.get("type")) == "llama3":
        # Llama 3.1 (arXiv 2407.21783): slow down only the low frequencies (long wavelengths) by `factor`,
        # keep high frequencies, and interpolate smoothly in between.
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_context = scaling.get("original_max_position_embeddings", 8192)
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_context / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
        between = (wavelen <= old_context / low) & (wavelen >= old_context / high)
        inv_freq = torch.where(between, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    elif scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
        raise ValueError(f"unsupported rope_scaling {scaling!r}; minillm supports the default and 'llama3'")
    return inv_freq.float()


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (B, T) -> cos, sin (B, T, D), each angle repeated for both halves of the head."""
    angles = positions[..., None].float() * inv_freq  # (B, T, D/2)
    angles = torch.cat([angles, angles], dim=-1)  # (B, T, D)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i+D/2}) by the position's angle. x (B, H, T, D); cos, sin (B, T, D)."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        C, D = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(C, self.num_heads * D, bias=config.attention_bias)
        self.k_proj = nn.Linear(C, self.num_kv_heads * D, bias=config.attention_bias)
        self.v_proj = nn.Linear(C, self.num_kv_heads * D, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * D, C, bias=False)

    def forward(self, x, cos, sin, attention: AttentionBackend | None = None, metadata: Any = None) -> torch.Tensor:
        B, T, _ = x.shape
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        q = self.q_proj(x).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        attention = attention if attention is not None else EXACT_ATTENTION  # no backend: exact, no cache
        o = attention.forward(self.layer_idx, q, k, v, metadata)  # (B, H, T, D)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, H * D))  # (B, T, C)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        C, I = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(C, I, bias=False)
        self.up_proj = nn.Linear(C, I, bias=False)
        self.down_proj = nn.Linear(I, C, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, attention=None, metadata=None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attention, metadata)  # pre-norm residual
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # Not a buffer: model.to(torch.bfloat16) would round the frequencies; they stay fp32 and follow the input.
        self.inv_freq = rope_frequencies(config)  # (D/2,)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        attention: AttentionBackend | None = None,
        metadata: Any = None,
        logits_at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, V). positions (B, T) default to 0..T-1 in every row.

        ``attention`` is the backend every layer calls with ``metadata`` (default: exact causal attention over these
        tokens, no cache); the backend is the model's only contact with a KV cache.

        ``logits_at`` (K,) int64 picks the columns that need logits -> (B, K, V). An engine samples from one row
        per sequence, and the lm_head over every prompt token would be the biggest matmul of a prefill step
        (V = 49k for SmolLM2) spent on logits nobody reads.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if positions is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        if self.inv_freq.device != input_ids.device:
            self.inv_freq = self.inv_freq.to(input_ids.device)
        x = self.embed_tokens(input_ids)  # (B, T, C)
        cos, sin = rope_cos_sin(positions, self.inv_freq, x.dtype)  # (B, T, D) each
        for layer in self.layers:
            x = layer(x, cos, sin, attention, metadata)
        if logits_at is not None:
            x = x[:, logits_at]  # (B, K, C)
        return self.lm_head(self.norm(x))  # (B, T or K, V)
