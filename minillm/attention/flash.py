"""A FlashAttention-2 forward kernel in Triton: exact attention without the T x S score matrix.

This module teaches how the online softmax (`online.py`) becomes a GPU kernel (Dao, FlashAttention-2,
arXiv:2307.08691, §3.1 Algorithm 1, forward pass; the Triton fused-attention tutorial follows the same plan):

- one program owns a tile of BLOCK_M query rows of one head and keeps it in registers (the Q tile stays resident),
- it streams the K/V tiles of that head past it, BLOCK_N keys at a time, updating m_i, l_i and acc,
- it writes its O tile once, at the end. HBM traffic is Q, K, V, O: no T x S anything.

Details that make it fast or correct:
- exp2 instead of exp: the hardware has a fast exp2, and exp(x) = exp2(x * log2(e)), so log2(e) is folded into the
  softmax scale once (`qk_scale`);
- causal tiles entirely above the diagonal are never loaded, and tiles entirely below it skip the mask: the K loop
  runs in two phases (unmasked, then masked), see `causal_tile_range` in `online.py`;
- grouped-query attention without copying: query head h reads KV head h // (H // Hkv);
- the causal mask is bottom-right aligned (query i sees keys j <= i + S - T), which a prefill chunk needs;
- the same kernel serves a packed batch of variable-length sequences (`varlen.py`): each program reads its
  sequence's start and length from cumulative lengths instead of a batch stride.
- the tile sizes suit the GPU (`plan`): a T4 has 64 KiB of shared memory per program, an H100 227 KiB.

Notebook 02_attention explains the kernel block by block and benchmarks it against PyTorch's SDPA.
"""

import torch

from minillm._triton import (
    HAS_TRITON,
    device_arch,
    is_interpreter,
    max_shared_memory,
    record_launch,
    require_triton,
    tl,
    triton,
    triton_available,
)
from minillm.attention.reference import attention_ref, check_attention_inputs

LOG2E = 1.4426950408889634  # log2(e): exp(x) == exp2(x * LOG2E)
HEAD_DIMS = (16, 32, 64, 128)  # powers of two (tl.arange), at least 16 (tl.dot)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)

if HAS_TRITON:

    @triton.jit
    def _attn_fwd_inner(
        acc, l_i, m_i, q,  # running state [BLOCK_M, D], [BLOCK_M], [BLOCK_M]; Q tile [BLOCK_M, D]
        k_ptrs, v_ptrs,  # K^T tile pointers [D, BLOCK_N] and V tile pointers [BLOCK_N, D] at key 0
        lo, hi, offs_m, offs_n, S, causal_offset, qk_scale,
        stride_ks, stride_vs,
        BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    ):
        for start_n in range(lo, hi, BLOCK_N):
            start_n = tl.multiple_of(start_n, BLOCK_N)
            cols = start_n + offs_n  # [BLOCK_N]
            if MASKED:
                kt = tl.load(k_ptrs + start_n * stride_ks, mask=cols[None, :] < S, other=0.0)  # [D, BLOCK_N]
            else:
                kt = tl.load(k_ptrs + start_n * stride_ks)  # [D, BLOCK_N]
            qk = tl.dot(q, kt, input_precision=INPUT_PRECISION)  # [BLOCK_M, BLOCK_N] raw scores, fp32
            if MASKED:
                keep = cols[None, :] < S
                if CAUSAL:
                    keep = keep & (cols[None, :] <= offs_m[:, None] + causal_offset)
                qk = tl.where(keep, qk * qk_scale, float("-inf"))
                m_ij = tl.maximum(m_i, tl.max(qk, 1))  # [BLOCK_M]
                # A row that has seen no key yet keeps m = -inf; subtract 0 so exp2 gives 0, not NaN.
                m_sub = tl.where(m_ij == float("-inf"), 0.0, m_ij)
            else:
                qk = qk * qk_scale
                m_ij = tl.maximum(m_i, tl.max(qk, 1))  # [BLOCK_M]
                m_sub = m_ij
            p = tl.math.exp2(qk - m_sub[:, None])  # [BLOCK_M, BLOCK_N]
            alpha = tl.math.exp2(m_i - m_sub)  # [BLOCK_M] rescales the old sums to the new max
            l_i = l_i * alpha + tl.sum(p, 1)
            if MASKED:
                v = tl.load(v_ptrs + start_n * stride_vs, mask=cols[:, None] < S, other=0.0)  # [BLOCK_N, D]
            else:
                v = tl.load(v_ptrs + start_n * stride_vs)  # [BLOCK_N, D]
            # P goes to the tensor cores in the input dtype, accumulating into fp32 acc.
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=INPUT_PRECISION)
            m_i = m_ij
        return acc, l_i, m_i

    @triton.jit
    def _flash_attention_fwd_kernel(
        # Pointers
        q_ptr, k_ptr, v_ptr, o_ptr,
        cu_seqlens_q_ptr, cu_seqlens_k_ptr,  # (num_seqs + 1,) int32, read only when IS_VARLEN
        # Sizes
        T, S, H, qk_scale,
        # Strides
        stride_qb, stride_qh, stride_qt, stride_qd,
        stride_kb, stride_kh, stride_ks, stride_kd,
        stride_vb, stride_vh, stride_vs, stride_vd,
        stride_ob, stride_oh, stride_ot, stride_od,
        # Meta-parameters
        NUM_GROUPS: tl.constexpr,  # H // Hkv query heads share one KV head
        D: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr,
        IS_VARLEN: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
    ):
        start_m = tl.program_id(0)  # which Q tile
        off_bh = tl.program_id(1)  # which (sequence, query head)
        b = (off_bh // H).to(tl.int64)
        h = (off_bh % H).to(tl.int64)
        kv_h = h // NUM_GROUPS
        if IS_VARLEN:
            # Packed tokens: this sequence's rows start at cu_seqlens[b]; the batch stride is 0.
            q_start = tl.load(cu_seqlens_q_ptr + b).to(tl.int64)
            k_start = tl.load(cu_seqlens_k_ptr + b).to(tl.int64)
            T = tl.load(cu_seqlens_q_ptr + b + 1) - q_start.to(tl.int32)
            S = tl.load(cu_seqlens_k_ptr + b + 1) - k_start.to(tl.int32)
        else:
            q_start = 0
            k_start = 0
        if start_m * BLOCK_M < T:  # the grid covers the longest sequence; shorter ones have idle programs
            offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] query rows
            offs_n = tl.arange(0, BLOCK_N)  # [BLOCK_N]
            offs_d = tl.arange(0, D)  # [D]
            q_ptrs = (q_ptr + b * stride_qb + h * stride_qh
                      + (q_start + offs_m[:, None]) * stride_qt + offs_d[None, :] * stride_qd)  # [BLOCK_M, D]
            k_ptrs = (k_ptr + b * stride_kb + kv_h * stride_kh
                      + (k_start + offs_n[None, :]) * stride_ks + offs_d[:, None] * stride_kd)  # [D, BLOCK_N]
            v_ptrs = (v_ptr + b * stride_vb + kv_h * stride_vh
                      + (k_start + offs_n[:, None]) * stride_vs + offs_d[None, :] * stride_vd)  # [BLOCK_N, D]
            q = tl.load(q_ptrs, mask=offs_m[:, None] < T, other=0.0)  # [BLOCK_M, D], resident for the whole loop

            m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
            l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
            acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)

            # Which K tiles to visit (mirrors causal_tile_range in online.py).
            causal_offset = S - T  # bottom-right alignment: query i sits at key position i + S - T
            if CAUSAL:
                full_end = tl.maximum(tl.minimum(start_m * BLOCK_M + causal_offset + 1, S), 0)
                full_end = full_end // BLOCK_N * BLOCK_N  # keys every row of the tile sees, whole tiles
                hi = tl.maximum(tl.minimum(start_m * BLOCK_M + BLOCK_M + causal_offset, S), 0)  # no row sees past
            else:
                full_end = S // BLOCK_N * BLOCK_N
                hi = S
            # Phase 1: tiles below the diagonal, no mask. Phase 2: the diagonal and the tail past S, masked.
            acc, l_i, m_i = _attn_fwd_inner(
                acc, l_i, m_i, q, k_ptrs, v_ptrs, 0, full_end, offs_m, offs_n, S, causal_offset, qk_scale,
                stride_ks, stride_vs, BLOCK_N, False, CAUSAL, INPUT_PRECISION,
            )
            acc, l_i, m_i = _attn_fwd_inner(
                acc, l_i, m_i, q, k_ptrs, v_ptrs, full_end, hi, offs_m, offs_n, S, causal_offset, qk_scale,
                stride_ks, stride_vs, BLOCK_N, True, CAUSAL, INPUT_PRECISION,
            )

            # One write of O. Rows that saw no key (only possible when T > S) have l_i = 0 and get zeros.
            acc = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
            o_ptrs = (o_ptr + b * stride_ob + h * stride_oh
                      + (q_start + offs_m[:, None]) * stride_ot + offs_d[None, :] * stride_od)  # [BLOCK_M, D]
            tl.store(o_ptrs, acc.to(o_ptr.dtype.element_ty), mask=offs_m[:, None] < T)


def can_launch(device: torch.device) -> bool:
    """Can the kernel run on `device`? (On CPU only if TRITON_INTERPRET=1 was set before import: see _triton.py.)"""
    return triton_available(device)


def check_kernel_support(D: int, dtype: torch.dtype) -> None:
    """Raise unless the kernel handles this head dim and dtype."""
    if D not in HEAD_DIMS:
        raise ValueError(f"flash attention supports head dims {HEAD_DIMS}, got D={D}")
    if dtype not in DTYPES:
        raise TypeError(f"flash attention supports dtypes {DTYPES}, got {dtype}")


def interpreter_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernel runs in: bf16 becomes fp32 under the CPU interpreter.

    Triton's interpreter evaluates tl.dot with numpy, which has no bf16, and returns garbage for bf16 tiles; so the
    interpreted kernel sees fp32 copies (the algorithm is still tested on CPU; bf16 numerics are tested on a GPU).
    """
    return torch.float32 if dtype == torch.bfloat16 and is_interpreter() else dtype


def plan(
    max_T: int, D: int, dtype: torch.dtype, arch: int | None, *, block_m: int | None = None, block_n: int | None = None
) -> dict:
    """The launch choices for up to max_T query rows: BLOCK_M, BLOCK_N, INPUT_PRECISION, num_warps, num_stages.

    Hand-picked per compute capability `arch` (75, 80, 90, ...; None for the CPU interpreter), no autotuning yet; a
    short T (decode) gets a smaller Q tile. block_m, block_n override the tile sizes. tests/test_gpu_compile.py
    compiles the plans for sm75, sm80, sm86 and sm90 and checks that their shared memory fits.
    """
    for name, value in (("block_m", block_m), ("block_n", block_n)):
        if value is not None and (value < 16 or value & (value - 1)):
            raise ValueError(f"{name} must be a power of two >= 16 (tl.dot needs it), got {value}")
    if arch is None:
        # The interpreter runs each tile op in numpy: fewer, bigger tiles are faster.
        default_m, default_n, num_warps = 64, 64, 4
    elif arch < 80 or dtype == torch.float32:
        # tl.dot runs on FMAs, not tensor cores (Triton on Turing; the exact "ieee" fp32 dot on every GPU): small
        # tiles over 8 warps keep the registers from spilling.
        default_m, default_n, num_warps = (32 if D >= 128 else 64), 32, 8
    else:
        default_m, default_n, num_warps = 128, 64, (8 if D >= 128 else 4)
    block_m = block_m or min(default_m, max(16, triton.next_power_of_2(max_T)))
    block_n = block_n or default_n
    return dict(
        BLOCK_M=block_m, BLOCK_N=block_n, INPUT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_kv_stages(block_n, D, dtype, arch),
    )


def num_kv_stages(block_n: int, D: int, dtype: torch.dtype, arch: int | None) -> int:
    """How many K/V tiles of block_n keys to prefetch: 3 where they take at most 3/4 of the shared memory, else 2."""
    if arch is None or arch < 80:
        return 1  # the interpreter does not pipeline, and before sm80 there is no cp.async to prefetch with
    # Each stage holds a K and a V tile: 2 * BLOCK_N * D elements (32 KiB for fp16 at D = 128, BLOCK_N = 64), so
    # three stages fit an A100 or H100 but not the 99 KiB of sm86/sm89.
    stage_bytes = 2 * block_n * D * dtype.itemsize
    return 3 if 3 * stage_bytes <= max_shared_memory(arch) * 3 // 4 else 2


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    scale: float | None = None,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """FlashAttention-2 forward: q (B, H, T, D), k, v (B, Hkv, S, D) -> o (B, H, T, D) in q's dtype.

    H % Hkv == 0 (GQA without copying K/V); D in HEAD_DIMS; fp16, bf16 or fp32; any T and S. causal is bottom-right
    aligned (query i sees keys j <= i + S - T). scale defaults to 1 / sqrt(D). block_m, block_n override the tile
    sizes (powers of two >= 16). Raises where the kernel cannot run on q's device (`can_launch`).
    """
    check_attention_inputs(q, k, v)
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    check_kernel_support(D, q.dtype)
    require_triton(q.device, "flash_attention")
    if scale is None:
        scale = D**-0.5
    if B * H * T == 0:
        return torch.empty_like(q)
    run_dtype = interpreter_dtype(q.dtype)
    q_in, k, v = q.to(run_dtype), k.to(run_dtype), v.to(run_dtype)  # no-ops unless bf16 under the interpreter
    o = torch.empty_like(q_in)
    cfg = plan(T, D, run_dtype, device_arch(q.device), block_m=block_m, block_n=block_n)
    grid = (triton.cdiv(T, cfg["BLOCK_M"]), B * H)
    record_launch("flash_attention")
    _flash_attention_fwd_kernel[grid](
        q_in, k, v, o, None, None,
        T, S, H, scale * LOG2E,
        *q_in.stride(), *k.stride(), *v.stride(), *o.stride(),
        NUM_GROUPS=H // Hkv, D=D, CAUSAL=causal, IS_VARLEN=False, **cfg,
    )
    return o.to(q.dtype)


def flash_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    scale: float | None = None,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Torch reference with `flash_attention`'s signature (tile sizes do not change the exact result)."""
    return attention_ref(q, k, v, causal=causal, scale=scale)
