"""Variable-length (packed) attention: many sequences of different lengths in one launch, no padding.

This module teaches the packed layout an inference engine uses for prefill (FlashAttention's `varlen` interface,
arXiv:2307.08691; vLLM's PagedAttention paper, arXiv:2309.06180, §4, batches prompts the same way): the tokens of all
sequences are concatenated along one axis, and cumulative lengths say where each sequence starts:

    cu_seqlens = [0, len_0, len_0 + len_1, ...]   (num_seqs + 1,) int32
    sequence b owns rows cu_seqlens[b] : cu_seqlens[b + 1]

Queries and keys have their own cumulative lengths, because a prefill chunk (T_b new tokens) attends to the cached
context plus itself (S_b >= T_b keys); the causal mask is bottom-right aligned per sequence. The kernel is the one
in `flash.py` with IS_VARLEN=True. Notebook 02_attention introduces it; the engine chapter feeds it.
"""

import torch

from minillm._triton import device_arch, record_launch, require_triton, triton
from minillm.attention import flash
from minillm.attention.flash import LOG2E, check_kernel_support, interpreter_dtype
from minillm.attention.reference import attention_ref, check_qkv


def check_varlen_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
) -> None:
    """Raise a clear error unless q (Nq, H, D), k, v (Nk, Hkv, D) and the cumulative lengths fit together."""
    check_qkv(q, k, v, ("packed tokens", "heads", "D"))
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(cu, torch.Tensor) or cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 2:
            raise TypeError(f"{name} must be a 1-D int32 tensor of num_seqs + 1 >= 2 offsets, got {cu!r:.80}")
        if cu.device != q.device:
            raise ValueError(f"{name} is on {cu.device} but q is on {q.device}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, "
            f"got {cu_seqlens_q.numel() - 1} and {cu_seqlens_k.numel() - 1}"
        )
    for name, value in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")


def flash_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool = True,
    scale: float | None = None,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Attention over a packed batch: q (Nq, H, D), k, v (Nk, Hkv, D) -> o (Nq, H, D) in q's dtype.

    cu_seqlens_q, cu_seqlens_k: (num_seqs + 1,) int32 cumulative lengths (first 0, last Nq resp. Nk).
    max_seqlen_q: the longest query run (sizes the launch grid); max_seqlen_k: the longest key run (kept for
    the same signature as FlashAttention's varlen function; the kernel reads the real lengths).
    causal: bottom-right aligned per sequence. Raises where Triton cannot run (use `flash_attention_varlen_ref`).
    The lengths are trusted, not checked against the tensors: reading them would cost a device-host sync.
    """
    check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    H, D = q.shape[1], q.shape[2]
    check_kernel_support(D, q.dtype)
    require_triton(q.device, "flash_attention_varlen")
    if scale is None:
        scale = D**-0.5
    num_seqs = cu_seqlens_q.numel() - 1
    if q.shape[0] * H == 0 or max_seqlen_q == 0:
        return torch.zeros_like(q)
    run_dtype = interpreter_dtype(q.dtype)
    q_in, k, v = q.to(run_dtype), k.to(run_dtype), v.to(run_dtype)  # no-ops unless bf16 under the interpreter
    # Zeros, not empty: tokens outside every sequence (if the lengths do not cover Nq) are never written.
    o = torch.zeros_like(q_in)
    cfg = flash.plan(max_seqlen_q, D, run_dtype, device_arch(q.device), block_m=block_m, block_n=block_n)
    grid = (triton.cdiv(max_seqlen_q, cfg["BLOCK_M"]), num_seqs * H)
    # Packed layout (N, heads, D): no batch stride; the token stride moves along the packed axis.
    record_launch("flash_attention_varlen")
    flash._flash_attention_fwd_kernel[grid](  # defined only where triton is installed
        q_in, k, v, o, cu_seqlens_q, cu_seqlens_k,
        0, 0, H, scale * LOG2E,
        0, q_in.stride(1), q_in.stride(0), q_in.stride(2),
        0, k.stride(1), k.stride(0), k.stride(2),
        0, v.stride(1), v.stride(0), v.stride(2),
        0, o.stride(1), o.stride(0), o.stride(2),
        NUM_GROUPS=H // k.shape[1], D=D, CAUSAL=causal, IS_VARLEN=True, **cfg,
    )
    return o.to(q.dtype)


def flash_attention_varlen_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool = True,
    scale: float | None = None,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Torch reference for `flash_attention_varlen`: `attention_ref` on each sequence in turn."""
    check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    o = torch.zeros_like(q)
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(bounds_q) - 1):
        q0, q1, k0, k1 = bounds_q[b], bounds_q[b + 1], bounds_k[b], bounds_k[b + 1]
        qb = q[q0:q1].transpose(0, 1)[None]  # (1, H, T_b, D)
        kb = k[k0:k1].transpose(0, 1)[None]  # (1, Hkv, S_b, D)
        vb = v[k0:k1].transpose(0, 1)[None]  # (1, Hkv, S_b, D)
        o[q0:q1] = attention_ref(qb, kb, vb, causal=causal, scale=scale)[0].transpose(0, 1)
    return o
