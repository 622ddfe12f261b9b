"""Paged decode attention: one new query token per sequence against a KV cache scattered over blocks.

Teaches: the read half of PagedAttention (Kwon et al., SOSP 2023, arXiv:2309.06180, section 4.1). A sequence's keys
and values sit in fixed-size blocks anywhere in a pool ``(NB, BS, Hkv, D)``; its block table says which. The kernel
follows the table instead of reading a contiguous tensor, and otherwise is FlashAttention's online softmax
(Dao et al., arXiv:2205.14135, algorithm 1; Milakov & Gimelshein, arXiv:1805.02867) over the context.

Three ideas to look for:
  * GQA without copying (Ainslie et al., arXiv:2305.13245): one program serves one (sequence, KV head) and all
    H / Hkv query heads that share it, so each K/V byte is read once and the query heads form the rows of a dot.
  * Token tiles independent of the block size: a tile of BLOCK_N tokens looks up each token's block in the table,
    so BS can be 1, 16 or 256 with the same kernel.
  * Split-K ("flash-decoding", Dao et al. 2023, https://pytorch.org/blog/flash-decoding/): with few sequences and a
    long context there are too few (sequence, KV head) programs to fill a GPU, so the context is cut into
    NUM_SPLITS ranges handled in parallel; each writes its partial (m_i, l_i, acc) and a second small kernel
    combines them exactly with the same rescaling the online softmax uses.
``paged_decode_attention_ref`` gathers the blocks into a contiguous tensor and runs exact attention, for clarity.
Explained in notebooks/04_paged_attention.ipynb.
"""

import math

import torch
import torch.nn.functional as F

from minillm._triton import HAS_TRITON, device_arch, record_launch, require_triton, tl, triton
from minillm.attention.flash import interpreter_dtype, num_kv_stages

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # others (float64): use the reference

if HAS_TRITON:

    @triton.jit
    def _paged_decode_kernel(
        # Pointers
        q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr,
        out_ptr, mid_m_ptr, mid_l_ptr,
        # Sizes
        GROUP, D, TOKENS_PER_SPLIT,
        # Strides
        stride_qb, stride_qh, stride_qd,
        stride_kb, stride_kt, stride_kh, stride_kd,
        stride_vb, stride_vt, stride_vh, stride_vd,
        stride_btb, stride_btn,
        stride_ob, stride_oh, stride_os, stride_od,
        stride_mb, stride_mh, stride_ms,
        # Meta-parameters
        qk_scale,
        BS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        FP32_DOT: tl.constexpr,
    ):
        b, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        context_len = tl.load(context_lens_ptr + b)
        start = split * TOKENS_PER_SPLIT
        end = tl.minimum(start + TOKENS_PER_SPLIT, context_len)

        offs_g = tl.arange(0, BLOCK_G)  # the query heads of this KV head's group, padded to >= 16 rows for tl.dot
        offs_d = tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        heads = kv_head * GROUP + offs_g
        mask_g = offs_g < GROUP
        mask_d = offs_d < D
        q = tl.load(
            q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
            mask=mask_g[:, None] & mask_d[None, :], other=0.0,
        )  # [BLOCK_G, BLOCK_D]

        m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
        table_row = block_tables_ptr + b * stride_btb
        for n0 in range(start, end, BLOCK_N):
            pos = n0 + offs_n  # [BLOCK_N] token positions in the sequence
            mask_n = pos < end
            # The paging: each token's block from the table, then its offset inside the block.
            block = tl.load(table_row + (pos // BS) * stride_btn, mask=mask_n, other=0).to(tl.int64)
            offset = pos % BS
            kv_mask = mask_n[:, None] & mask_d[None, :]
            k = tl.load(
                k_cache_ptr + block[:, None] * stride_kb + offset[:, None] * stride_kt + kv_head * stride_kh
                + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0,
            )  # [BLOCK_N, BLOCK_D]
            v = tl.load(
                v_cache_ptr + block[:, None] * stride_vb + offset[:, None] * stride_vt + kv_head * stride_vh
                + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0,
            )  # [BLOCK_N, BLOCK_D]
            if FP32_DOT:  # fp32 inputs: exact products (tl.dot would round them to tf32 on a GPU)
                qk = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                qk = tl.dot(q, tl.trans(k))
            # exp2 is cheaper than exp: qk_scale already holds log2(e) / sqrt(D).
            qk = tl.where(mask_n[None, :], qk * qk_scale, float("-inf"))  # [BLOCK_G, BLOCK_N]
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            alpha = tl.exp2(m_i - m_new)  # rescales what was summed under the old maximum
            p = tl.exp2(qk - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if FP32_DOT:
                acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new

        out_mask = mask_g[:, None] & mask_d[None, :]
        o_ptrs = out_ptr + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + offs_d[None, :] * stride_od
        if mid_m_ptr is None:  # a single split: normalize and write the answer
            tl.store(o_ptrs, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=out_mask)
        else:  # split-K: keep the unnormalized partial result for the combine kernel (empty splits: m_i=-inf, l_i=0)
            tl.store(o_ptrs, acc, mask=out_mask)
            m_ptrs = b * stride_mb + heads * stride_mh + split * stride_ms
            tl.store(mid_m_ptr + m_ptrs, m_i, mask=mask_g)
            tl.store(mid_l_ptr + m_ptrs, l_i, mask=mask_g)

    @triton.jit
    def _paged_decode_combine_kernel(
        # Pointers
        mid_o_ptr, mid_m_ptr, mid_l_ptr, out_ptr,
        # Sizes
        NUM_SPLITS, D,
        # Strides
        stride_mob, stride_moh, stride_mos, stride_mod,
        stride_mb, stride_mh, stride_ms,
        stride_ob, stride_oh, stride_od,
        # Meta-parameters
        BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        b, h = tl.program_id(0), tl.program_id(1)
        offs_s = tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, BLOCK_D)
        mask_s = offs_s < NUM_SPLITS
        m_s = tl.load(mid_m_ptr + b * stride_mb + h * stride_mh + offs_s * stride_ms, mask=mask_s, other=float("-inf"))
        l_s = tl.load(mid_l_ptr + b * stride_mb + h * stride_mh + offs_s * stride_ms, mask=mask_s, other=0.0)
        acc_s = tl.load(
            mid_o_ptr + b * stride_mob + h * stride_moh + offs_s[:, None] * stride_mos + offs_d[None, :] * stride_mod,
            mask=mask_s[:, None] & (offs_d[None, :] < D), other=0.0,
        )  # [BLOCK_S, BLOCK_D]
        # Split 0 always holds a token (context_len >= 1), so m is finite and exp2(-inf - m) = 0 drops empty splits.
        m = tl.max(m_s, 0)
        alpha = tl.exp2(m_s - m)  # [BLOCK_S]
        l_i = tl.sum(l_s * alpha, 0)
        acc = tl.sum(acc_s * alpha[:, None], 0)  # [BLOCK_D]
        tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d * stride_od, (acc / l_i).to(out_ptr.dtype.element_ty),
                 mask=offs_d < D)


def _check(q, k_cache, v_cache, block_tables, context_lens):
    if q.dim() != 3:
        raise ValueError(f"q must be (B, H, D), got shape {tuple(q.shape)}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"k_cache and v_cache must both be (NB, BS, Hkv, D), got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    b, h, d = q.shape
    bs, hkv = k_cache.shape[1], k_cache.shape[2]
    if k_cache.shape[3] != d:
        raise ValueError(f"head dim of q ({d}) and of the cache ({k_cache.shape[3]}) differ")
    if h % hkv:
        raise ValueError(f"query heads H={h} must be a multiple of KV heads Hkv={hkv} (GQA)")
    if bs < 1 or bs & (bs - 1):
        raise ValueError(f"block size BS={bs} (k_cache.shape[1]) must be a power of two")
    if block_tables.dim() != 2 or block_tables.shape[0] != b or block_tables.dtype != torch.int32:
        raise ValueError(f"block_tables must be ({b}, max_blocks) int32, got {tuple(block_tables.shape)} {block_tables.dtype}")
    if context_lens.shape != (b,) or context_lens.dtype != torch.int32:
        raise ValueError(f"context_lens must be ({b},) int32, got {tuple(context_lens.shape)} {context_lens.dtype}")
    if not (q.dtype == k_cache.dtype == v_cache.dtype) or not q.is_floating_point():
        raise TypeError(f"q, k_cache, v_cache must share one floating dtype, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    devices = {t.device for t in (q, k_cache, v_cache, block_tables, context_lens)}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {devices}")


def paged_decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Decode attention by gathering: copy each sequence's blocks into a contiguous tensor, then exact attention.

    q (B, H, D); k_cache, v_cache (NB, BS, Hkv, D); block_tables (B, max_blocks) int32, padded with any valid block id
    (0 is conventional); context_lens (B,) int32, each in [1, max_blocks * BS]. Returns (B, H, D) in q's dtype.
    """
    _check(q, k_cache, v_cache, block_tables, context_lens)
    b, h, d = q.shape
    hkv = k_cache.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    acc_dtype = torch.promote_types(q.dtype, torch.float32)  # softmax in at least fp32
    blocks = block_tables.flatten()  # (B * max_blocks,): index_select copies whole blocks, faster than k_cache[tables]
    k = k_cache.index_select(0, blocks).view(b, -1, hkv, d).transpose(1, 2)  # (B, Hkv, S = max_blocks * BS, D)
    v = v_cache.index_select(0, blocks).view(b, -1, hkv, d).transpose(1, 2)  # the gather
    visible = torch.arange(k.shape[2], device=q.device) < context_lens[:, None]  # (B, S): slots holding tokens
    # GQA without copying K/V: the G = H / Hkv query heads that share KV head kv (heads kv * G ... kv * G + G - 1)
    # are simply G query rows against that head's keys, so one decode token is a (G, S) attention per KV head.
    q_grouped = q.view(b, hkv, h // hkv, d)  # (B, Hkv, G, D)
    o = F.scaled_dot_product_attention(
        q_grouped.to(acc_dtype), k.to(acc_dtype), v.to(acc_dtype), attn_mask=visible[:, None, None, :], scale=scale
    )  # (B, Hkv, G, D)
    return o.reshape(b, h, d).to(q.dtype)


def plan(
    batch_heads: int,
    group: int,
    D: int,
    dtype: torch.dtype,
    max_context_len: int,
    arch: int | None,
    num_sms: int | None = None,
    num_splits: int | None = None,
) -> dict:
    """The launch choices for one decode step: split-K count, the decode kernel's meta-parameters, the combine's.

    batch_heads = B * Hkv (programs before splitting), group = H // Hkv, arch the compute capability (None for the CPU
    interpreter), num_sms the GPU's SM count (None on CPU); num_splits forces the split count. Returns
    dict(num_splits, tokens_per_split, decode=..., combine=... or None when there is a single split).
    """
    # Tokens per tile: 64 for fp16/bf16; 32 where tl.dot runs on FMAs (fp32, or Turing), which spill registers at 64.
    block_n = 64 if dtype.itemsize <= 2 and (arch is None or arch >= 80) else 32
    if num_splits is None:
        num_splits = _num_splits(batch_heads, max_context_len, block_n, num_sms)
    tokens_per_split = triton.cdiv(triton.cdiv(max_context_len, num_splits), block_n) * block_n
    num_splits = triton.cdiv(max_context_len, tokens_per_split)  # whole tiles per split can leave fewer splits
    block_d = max(16, triton.next_power_of_2(D))
    decode = dict(
        BLOCK_G=max(16, triton.next_power_of_2(group)),  # the group's query heads, padded to >= 16 rows for tl.dot
        BLOCK_N=block_n, BLOCK_D=block_d, FP32_DOT=dtype == torch.float32,
        num_warps=4, num_stages=num_kv_stages(block_n, block_d, dtype, arch),
    )
    combine = None
    if num_splits > 1:
        combine = dict(BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=block_d, num_warps=4, num_stages=1)
    return dict(num_splits=num_splits, tokens_per_split=tokens_per_split, decode=decode, combine=combine)


def _num_splits(batch_heads: int, max_context_len: int, block_n: int, num_sms: int | None) -> int:
    """Enough splits to give every SM ~2 programs, never a split shorter than 4 token tiles."""
    if num_sms is None:
        return 1 if max_context_len <= 4 * block_n else 2  # the interpreter: exercise split-K on long-ish contexts
    return max(1, min(2 * num_sms // batch_heads, triton.cdiv(max_context_len, 4 * block_n), 64))


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float | None = None,
    max_context_len: int | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Triton paged decode attention; same contract as ``paged_decode_attention_ref``.

    Raises where Triton cannot run (CPU without ``TRITON_INTERPRET=1``, no triton) and for dtypes outside
    ``KERNEL_DTYPES``: the caller chose the kernel, so it should know when it does not run.

    ``max_context_len`` (an upper bound on context_lens) sizes the split-K grid; None reads it from the tensor (a
    device sync). ``num_splits`` forces the split count (1 = no split-K); None picks one from the GPU's SM count.
    """
    _check(q, k_cache, v_cache, block_tables, context_lens)
    require_triton(q.device, "paged_decode_attention")
    if q.dtype not in KERNEL_DTYPES:
        raise TypeError(f"paged_decode_attention runs {KERNEL_DTYPES}, got {q.dtype}; use paged_decode_attention_ref")
    b, h, d = q.shape
    bs, hkv = k_cache.shape[1], k_cache.shape[2]
    group = h // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if b == 0:
        return torch.empty_like(q)
    run_dtype = interpreter_dtype(q.dtype)  # the CPU interpreter's tl.dot has no bf16: run fp32 copies there
    if run_dtype != q.dtype:
        out = paged_decode_attention(
            q.to(run_dtype), k_cache.to(run_dtype), v_cache.to(run_dtype), block_tables, context_lens, scale,
            max_context_len, num_splits,
        )
        return out.to(q.dtype)
    out = torch.empty_like(q)
    if max_context_len is None:
        max_context_len = int(context_lens.max())
    arch = device_arch(q.device)
    num_sms = None if arch is None else torch.cuda.get_device_properties(q.device).multi_processor_count
    cfg = plan(b * hkv, group, d, q.dtype, max_context_len, arch, num_sms, num_splits)
    num_splits = cfg["num_splits"]
    if num_splits == 1:
        mid_o, mid_m, mid_l = out.unsqueeze(2), None, None  # (B, H, 1, D): the kernel writes the answer directly
        m_strides = (0, 0, 0)
    else:
        mid_o = torch.empty(b, h, num_splits, d, device=q.device, dtype=torch.float32)
        mid_m = torch.empty(b, h, num_splits, device=q.device, dtype=torch.float32)
        mid_l = torch.empty_like(mid_m)
        m_strides = mid_m.stride()
    record_launch("paged_decode")
    _paged_decode_kernel[(b, hkv, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens,
        mid_o, mid_m, mid_l,
        group, d, cfg["tokens_per_split"],
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *block_tables.stride(), *mid_o.stride(), *m_strides,
        scale * 1.4426950408889634,  # log2(e): the kernel uses exp2
        BS=bs, **cfg["decode"],
    )
    if num_splits > 1:
        record_launch("paged_decode_combine")
        _paged_decode_combine_kernel[(b, h)](
            mid_o, mid_m, mid_l, out,
            num_splits, d,
            *mid_o.stride(), *mid_m.stride(), *out.stride(),
            **cfg["combine"],
        )
    return out
