"""The model's forward cut at attention: the same math as ``minillm.model``, in pieces that can be fused or compiled.

In doing so, you will learn about:
  * where a decode step's time goes besides the matmuls: a layer of ``minillm.model`` launches ~25 small kernels
    (views, casts, the norm's six elementwise ops, RoPE's slices and concatenation, SiLU, the residual adds), each
    reading and writing its whole input. At batch 1 every one of them is tiny, so on a GPU the step is launch-bound
    and on a CPU it is Python-bound;
  * the *carried residual* (vLLM's ``fused_add_rms_norm``): each layer hands the next one the un-normalized sum
    ``h`` and the add moves into the next norm, so "add, then normalize" is one pass over memory;
  * *piecewise* compilation (vLLM's ``torch.compile`` integration): attention reads a paged KV cache through
    metadata that changes every step (block tables, context lengths), so the graph is cut there. What lies between
    two attentions -- norm, projections, RoPE, the MLP -- is the same function for every layer, with the weights as
    arguments, so ``torch.compile`` traces it once and reuses it 30 times.

Three ways to run the pieces (``ops``):
    "eager"    plain torch, the reference: equal to ``minillm.model``'s forward (fp32: the same ops, reassociated
               only where the residual add moved)
    "fused"    the Triton kernels of ``fast/fused.py`` (add + RMSNorm, RoPE on q and k, SiLU * up)
    "compile"  torch.compile of the torch pieces (inductor: C++ on a CPU, Triton on a GPU), dynamic in the number
               of tokens so a new batch size does not recompile

Only dense ``nn.Linear`` layers qualify: a quantized or pruned model (chapters 06-07) keeps ``minillm.model``'s
forward, and ``LLM.stats()`` says why. Notebook 10 (``10_fast_decoding``) measures each against the eager model.

Shapes: N packed tokens, C model dim, H, Hkv heads, D head dim, I MLP width, V vocab.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from minillm.fast import fused as kernels
from minillm.model import EXACT_ATTENTION, Transformer, rope_cos_sin

OPS = ("eager", "fused", "compile")


def why_not_piecewise(model: nn.Module) -> str | None:
    """Why `model` cannot run piecewise (None: it can): the pieces call F.linear on dense weights."""
    if not isinstance(model, Transformer):
        return f"the model is a {type(model).__name__}, not minillm.model.Transformer"
    for name, module in model.named_modules():
        if name.endswith("_proj") and type(module) is not nn.Linear:
            return f"{name} is a {type(module).__name__} (a quantized or pruned layer), not a dense nn.Linear"
        if name.endswith("_proj") and module.bias is not None:
            return f"{name} has a bias; the pieces assume Llama's bias-free projections"
    return None


def _attention_in(h, residual, norm_w, wq, wk, wv, cos, sin, eps: float, H: int, Hkv: int, D: int, fused: bool):
    """(residual +) h -> RMSNorm -> q, k, v projections -> RoPE. h, residual (N, C) -> q (N, H, D), k, v (N, Hkv, D)."""
    x, residual = (kernels.add_rmsnorm if fused else kernels.add_rmsnorm_ref)(h, residual, norm_w, eps)  # (N, C) each
    N = x.shape[0]
    q = F.linear(x, wq).view(N, H, D)  # (N, H, D)
    k = F.linear(x, wk).view(N, Hkv, D)  # (N, Hkv, D)
    v = F.linear(x, wv).view(N, Hkv, D)  # (N, Hkv, D)
    q, k = (kernels.rope_qk if fused else kernels.rope_qk_ref)(q, k, cos, sin)
    return q, k, v, residual


def _attention_out(o, residual, wo, norm_w, w_gate, w_up, w_down, eps: float, fused: bool):
    """o_proj -> (+ residual) RMSNorm -> SwiGLU MLP. o (N, H * D), residual (N, C) -> mlp out, new residual (N, C)."""
    h = F.linear(o, wo)  # (N, C)
    x, residual = (kernels.add_rmsnorm if fused else kernels.add_rmsnorm_ref)(h, residual, norm_w, eps)
    gated = (kernels.silu_mul if fused else kernels.silu_mul_ref)(F.linear(x, w_gate), F.linear(x, w_up))  # (N, I)
    return F.linear(gated, w_down), residual  # (N, C)


class PiecewiseForward(nn.Module):
    """``model``'s forward with the same signature, run as attention-free pieces with ``ops`` "eager", "fused" or
    "compile". It shares the model's weights (nothing is copied) and calls its attention backend unchanged."""

    def __init__(self, model: Transformer, ops: str = "eager"):
        super().__init__()
        if ops not in OPS:
            raise ValueError(f"unknown ops {ops!r}; choose one of {OPS}")
        reason = why_not_piecewise(model)
        if reason:
            raise ValueError(f"cannot run this model piecewise: {reason}")
        self.model, self.ops, self.config = model, ops, model.config
        self.attention_in, self.attention_out = _attention_in, _attention_out
        if ops == "compile":
            # dynamic=True: the number of tokens N is a symbol, so batch 1, 7 and 64 share one compiled graph.
            self.attention_in = torch.compile(_attention_in, dynamic=True)
            self.attention_out = torch.compile(_attention_out, dynamic=True)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        attention: Any = None,
        metadata: Any = None,
        logits_at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Same contract as ``Transformer.forward``: input_ids (B, T) -> logits (B, T or K, V)."""
        m, cfg = self.model, self.config
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        H, Hkv, D, eps = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps
        fused = self.ops == "fused"
        if positions is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        if m.inv_freq.device != input_ids.device:
            m.inv_freq = m.inv_freq.to(input_ids.device)
        h = m.embed_tokens(input_ids).view(B * T, -1)  # (N, C): the pieces see one packed row of tokens
        cos, sin = rope_cos_sin(positions, m.inv_freq, h.dtype)  # (B, T, D) each
        cos, sin = cos.reshape(B * T, D), sin.reshape(B * T, D)  # (N, D)
        attention = attention if attention is not None else EXACT_ATTENTION  # no backend: exact, no cache
        residual = None
        for layer in m.layers:
            a, mlp = layer.self_attn, layer.mlp
            q, k, v, residual = self.attention_in(
                h, residual, layer.input_layernorm.weight, a.q_proj.weight, a.k_proj.weight, a.v_proj.weight,
                cos, sin, eps, H, Hkv, D, fused)
            q = q.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D): the backends' layout
            k, v = k.view(B, T, Hkv, D).transpose(1, 2), v.view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
            o = attention.forward(a.layer_idx, q, k, v, metadata)  # (B, H, T, D)
            o = o.transpose(1, 2).reshape(B * T, H * D)  # (N, H * D)
            h, residual = self.attention_out(
                o, residual, a.o_proj.weight, layer.post_attention_layernorm.weight, mlp.gate_proj.weight,
                mlp.up_proj.weight, mlp.down_proj.weight, eps, fused)
        h, residual = h.view(B, T, -1), residual.view(B, T, -1)  # (B, T, C)
        if logits_at is not None:
            h, residual = h[:, logits_at], residual[:, logits_at]  # (B, K, C)
        K = h.shape[1]
        x, _ = (kernels.add_rmsnorm if fused else kernels.add_rmsnorm_ref)(
            h.reshape(B * K, -1), residual.reshape(B * K, -1), m.norm.weight, eps)  # (B * K, C)
        return m.lm_head(x).view(B, K, -1)  # (B, K, V)

