"""Triton kernels that dequantize int8/int4 weights inside the matmul.

In doing so, you will learn about:
  * why weight-only quantization speeds up decoding: a decode step multiplies a few token vectors by every
    weight matrix, so its time is the time to *read* the weights (memory-bound). Reading 4-bit codes instead of
    16-bit floats moves 4x fewer bytes; the dequantization is a few register instructions per weight, hidden under
    the memory traffic. This is the idea behind the AWQ/TinyChat kernels (Lin et al., arXiv 2306.00978 §4) and
    Marlin (Frantar et al., arXiv 2408.11743);
  * two kernels for two regimes: a GEMV-style kernel for few rows (decode, M <= 16), one program per (row, block of
    outputs), multiply-and-sum in registers; and a tiled GEMM for many rows (prefill), where each dequantized
    weight tile is reused by BLOCK_M rows on the tensor cores (Triton tutorial 03, matrix multiplication);
  * unpacking 4-bit codes in registers: each byte of the packed weight is loaded for both of its columns and the
    right nibble is selected with a shift, `(byte >> 4 * (k % 2)) & 0xF`.

Weight formats (the buffers of ``minillm/quant/linear.py``), with N = out_features, K = in_features:
  * int8: qweight (N, K) int8, scales (N, 1): w[n, k] = qweight[n, k] * scales[n, 0]; group_size = K;
  * int4: qweight (N, K / 2) uint8 (two codes per byte, low nibble first), scales and zeros (N, ceil(K / G)):
    w[n, k] = (code[n, k] - zeros[n, g]) * scales[n, g], g = k // G with G = group_size. When G does not divide K
    the last group of a row is shorter (SmolLM2's C = 576 = 4 * 128 + 64).
Notebook 06 (``06_quantization``) walks through the int4 kernel.
"""

from __future__ import annotations

import torch

from minillm._triton import HAS_TRITON, device_arch, is_interpreter, record_launch, require_triton, tl, triton
from minillm.quant.numerics import unpack_int4

GEMV_MAX_ROWS = 16  # up to this many rows (tokens), the GEMV path; above it, the tiled GEMM

if HAS_TRITON:

    @triton.jit
    def _dequantize_tile(
        qw_ptr, scales_ptr, zeros_ptr, offs_n, offs_k, k0, N, K, group_size,
        stride_qn, stride_qk, stride_sn, stride_sg,
        BITS: tl.constexpr,
    ):
        """Load the weight tile rows offs_n x columns offs_k and dequantize it to fp32: [BLOCK_N, BLOCK_K]."""
        mask_n = offs_n < N
        mask = mask_n[:, None] & (offs_k[None, :] < K)
        # The launcher makes every K tile sit inside one group, so each row needs one scale per tile.
        g = k0 // group_size
        s = tl.load(scales_ptr + offs_n * stride_sn + g * stride_sg, mask=mask_n, other=0.0).to(tl.float32)  # [BLOCK_N]
        if BITS == 8:
            q = tl.load(qw_ptr + offs_n[:, None] * stride_qn + offs_k[None, :] * stride_qk, mask=mask, other=0)
            w = q.to(tl.float32) * s[:, None]
        else:
            # Column k lives in byte k // 2; even k in the low nibble, odd k in the high one. Both columns of a byte
            # load the same address, which the cache serves once.
            packed = tl.load(qw_ptr + offs_n[:, None] * stride_qn + (offs_k[None, :] // 2) * stride_qk, mask=mask, other=0)
            q = (packed.to(tl.int32) >> ((offs_k[None, :] % 2) * 4)) & 0xF  # [BLOCK_N, BLOCK_K] in [0, 15]
            z = tl.load(zeros_ptr + offs_n * stride_sn + g * stride_sg, mask=mask_n, other=0).to(tl.float32)
            w = (q.to(tl.float32) - z[:, None]) * s[:, None]
        return w

    @triton.jit
    def _dequant_gemv_kernel(
        # Pointers
        x_ptr, qw_ptr, scales_ptr, zeros_ptr, out_ptr,
        # Sizes
        N, K, group_size,
        # Strides
        stride_xm, stride_xk, stride_qn, stride_qk, stride_sn, stride_sg, stride_om, stride_on,
        # Meta-parameters
        BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """One program: one row m of x times BLOCK_N rows of W. out[m, n] = sum_k x[m, k] * w[n, k]."""
        pid_n = tl.program_id(0)
        m = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)  # [BLOCK_K]
            x = tl.load(x_ptr + m * stride_xm + offs_k * stride_xk, mask=offs_k < K, other=0.0).to(tl.float32)
            w = _dequantize_tile(
                qw_ptr, scales_ptr, zeros_ptr, offs_n, offs_k, k0, N, K, group_size,
                stride_qn, stride_qk, stride_sn, stride_sg, BITS,
            )  # [BLOCK_N, BLOCK_K]
            # Too few rows for tensor cores: multiply and reduce along K in registers.
            acc += tl.sum(w * x[None, :], axis=1)
        tl.store(out_ptr + m * stride_om + offs_n * stride_on, acc.to(out_ptr.dtype.element_ty), mask=offs_n < N)

    @triton.jit
    def _dequant_gemm_kernel(
        # Pointers
        x_ptr, qw_ptr, scales_ptr, zeros_ptr, out_ptr,
        # Sizes
        M, N, K, group_size,
        # Strides
        stride_xm, stride_xk, stride_qn, stride_qk, stride_sn, stride_sg, stride_om, stride_on,
        # Meta-parameters
        BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
    ):
        """One program: a [BLOCK_M, BLOCK_N] tile of out = x @ W^T, accumulated over K in fp32."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)  # [BLOCK_K]
            x_mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=x_mask, other=0.0)
            w = _dequantize_tile(
                qw_ptr, scales_ptr, zeros_ptr, offs_n, offs_k, k0, N, K, group_size,
                stride_qn, stride_qk, stride_sn, stride_sg, BITS,
            )  # [BLOCK_N, BLOCK_K]
            # The dequantized tile feeds the tensor cores in x's dtype; it is reused by all BLOCK_M rows.
            acc += tl.dot(x, tl.trans(w.to(x.dtype)), input_precision=INPUT_PRECISION)  # [BLOCK_M, BLOCK_N]
        out_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


def _check_weights(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int, group_size: int
) -> tuple[int, int, int]:
    """Validate the (x, weight) pair; return M, N, K."""
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (M, K), got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"x must be fp16, bf16 or fp32, got {x.dtype}")
    M, K = x.shape
    N = qweight.shape[0]
    if bits == 8:
        if qweight.dtype != torch.int8 or qweight.shape != (N, K):
            raise ValueError(f"int8 qweight must be int8 of shape (N, K={K}), got {qweight.dtype} {tuple(qweight.shape)}")
        if group_size != K:
            raise ValueError(f"int8 weights have one scale per row: group_size must be K={K}, got {group_size}")
    elif bits == 4:
        if qweight.dtype != torch.uint8 or qweight.shape != (N, K // 2) or K % 2:
            raise ValueError(
                f"int4 qweight must be uint8 of shape (N, K/2) with K={K} even, got {qweight.dtype} {tuple(qweight.shape)}"
            )
        if zeros is None or zeros.shape != scales.shape or zeros.stride() != scales.stride():
            raise ValueError("int4 weights need zeros with the same shape and strides as scales")
    else:
        raise ValueError(f"bits must be 8 or 4, got {bits}")
    num_groups = -(-K // group_size)
    if scales.shape != (N, num_groups):
        raise ValueError(f"scales must have shape (N, ceil(K / group_size)) = {(N, num_groups)}, got {tuple(scales.shape)}")
    return M, N, K


def _block_k(K: int, group_size: int) -> int:
    """A power-of-two K tile that never straddles two groups (or any tile when the row is one group)."""
    if group_size >= K:
        return 64
    block_k = 16
    while block_k * 2 <= min(group_size, 128) and group_size % (block_k * 2) == 0:
        block_k *= 2
    if group_size % block_k != 0:
        raise ValueError(f"group_size={group_size} must be a multiple of 16 for the Triton kernels")
    return block_k


# On a GPU, an int4 weight tile holds at most 2048 codes per 4 warps (16 a thread): each code's 64-bit address, byte,
# nibble and fp32 value sit in registers at once, and a 64 x 128 tile spilled 1.9 KiB a thread on sm80 (ptxas's count,
# which tests/test_gpu_compile.py checks). int8 codes need no unpacking: twice as many fit.
MAX_TILE_CODES = {8: 4096, 4: 2048}


def gemv_plan(K: int, group_size: int, bits: int, arch: int | None) -> dict:
    """The GEMV's launch choices (BLOCK_N, BLOCK_K, num_warps, num_stages) on compute capability `arch` (None: the CPU
    interpreter). tests/test_gpu_compile.py compiles them for sm75, sm80, sm86 and sm90."""
    block_k = _block_k(K, group_size)
    # The interpreter runs each tile op in numpy: fewer, bigger tiles are faster.
    block_n = 64 if arch is None else max(16, MAX_TILE_CODES[bits] // block_k)
    return dict(BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4, num_stages=3)


def gemm_plan(K: int, group_size: int, bits: int, dtype: torch.dtype, arch: int | None) -> dict:
    """The GEMM's launch choices (BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION, num_warps, num_stages) for activations of
    `dtype` on compute capability `arch` (None: the CPU interpreter)."""
    block_m, block_n, block_k = 32, 64, _block_k(K, group_size)
    if arch is not None:
        block_k = min(block_k, MAX_TILE_CODES[bits] // block_n)  # a smaller power of two still never straddles groups
    # fp32 activations: exact products ("ieee"); tl.dot would round them to tf32 on an A100 or H100.
    precision = "ieee" if dtype == torch.float32 else "tf32"
    return dict(
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, INPUT_PRECISION=precision, num_warps=4, num_stages=3
    )


def dequant_gemv(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int, group_size: int
) -> torch.Tensor:
    """Decode path: x (M, K) with few rows @ dequantized W^T -> (M, N) in x's dtype."""
    M, N, K = _check_weights(x, qweight, scales, zeros, bits, group_size)
    require_triton(x.device, "dequant_gemv")
    if x.dtype == torch.bfloat16 and is_interpreter():  # the CPU interpreter's numpy has no bf16: run in fp32
        return dequant_gemv(x.float(), qweight, scales, zeros, bits, group_size).to(x.dtype)
    out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    cfg = gemv_plan(K, group_size, bits, device_arch(x.device))
    grid = (triton.cdiv(N, cfg["BLOCK_N"]), M)
    record_launch("dequant_gemv")
    _dequant_gemv_kernel[grid](
        x, qweight, scales, scales if zeros is None else zeros, out,
        N, K, group_size,
        x.stride(0), x.stride(1), qweight.stride(0), qweight.stride(1), scales.stride(0), scales.stride(1),
        out.stride(0), out.stride(1),
        BITS=bits, **cfg,
    )
    return out


def dequant_gemm(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int, group_size: int
) -> torch.Tensor:
    """Prefill path: x (M, K) @ dequantized W^T -> (M, N) in x's dtype, tiled [BLOCK_M, BLOCK_N]."""
    M, N, K = _check_weights(x, qweight, scales, zeros, bits, group_size)
    require_triton(x.device, "dequant_gemm")
    if x.dtype == torch.bfloat16 and is_interpreter():  # the CPU interpreter's numpy has no bf16: run in fp32
        return dequant_gemm(x.float(), qweight, scales, zeros, bits, group_size).to(x.dtype)
    out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    cfg = gemm_plan(K, group_size, bits, x.dtype, device_arch(x.device))
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]))
    record_launch("dequant_gemm")
    _dequant_gemm_kernel[grid](
        x, qweight, scales, scales if zeros is None else zeros, out,
        M, N, K, group_size,
        x.stride(0), x.stride(1), qweight.stride(0), qweight.stride(1), scales.stride(0), scales.stride(1),
        out.stride(0), out.stride(1),
        BITS=bits, **cfg,
    )
    return out


def dequant_matmul(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int, group_size: int
) -> torch.Tensor:
    """x (M, K) @ W^T -> (M, N): the GEMV kernel for M <= GEMV_MAX_ROWS (decode), else the tiled GEMM (prefill)."""
    path = dequant_gemv if x.shape[0] <= GEMV_MAX_ROWS else dequant_gemm
    return path(x, qweight, scales, zeros, bits, group_size)


def dequantize_weight_ref(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int, group_size: int
) -> torch.Tensor:
    """The full fp32 weight (N, K) from its int8/int4 storage."""
    if bits == 8:
        return qweight.float() * scales.float()  # (N, K) * (N, 1)
    codes = unpack_int4(qweight)  # (N, K)
    K = codes.shape[1]
    zeros_k = zeros.float().repeat_interleave(group_size, dim=1)[:, :K]  # (N, K); the last group may be shorter
    return (codes.float() - zeros_k) * scales.float().repeat_interleave(group_size, dim=1)[:, :K]


def dequant_matmul_ref(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int, group_size: int
) -> torch.Tensor:
    """Reference for both kernels: dequantize the whole weight, then one ordinary matmul in x's dtype."""
    _check_weights(x, qweight, scales, zeros, bits, group_size)
    return x @ dequantize_weight_ref(qweight, scales, zeros, bits, group_size).to(x.dtype).t()


def dequant_gemv_ref(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int, group_size: int
) -> torch.Tensor:
    """Reference written the way the GEMV kernel computes: multiply each row by every weight row and sum over K."""
    _check_weights(x, qweight, scales, zeros, bits, group_size)
    w = dequantize_weight_ref(qweight, scales, zeros, bits, group_size)  # (N, K)
    return (x.float()[:, None, :] * w[None, :, :]).sum(-1).to(x.dtype)  # (M, N)


dequant_gemm_ref = dequant_matmul_ref
