"""Fused elementwise kernels: the small ops between a layer's matmuls, each done in one pass over memory.

Teaches: why the cheap ops cost time. A decoder layer is two matmul blocks joined by elementwise work: the residual add
and RMSNorm, RoPE on the new queries and keys, SwiGLU's silu(gate) * up. They do almost no arithmetic, so their time is
memory traffic plus kernel launches, and eager PyTorch pays both once per op: every op reads its inputs from GPU memory,
writes a full-size intermediate back, and is a launch of its own (a few microseconds each, which at decode, one token
per sequence, is longer than the work). Fusing keeps the intermediates in registers: one kernel reads each input once
and writes each output once. Three kernels here, one program per token row each:
  * ``add_rmsnorm``: h = x + residual and y = RMSNorm(h) * weight in one pass, writing h (the next residual) and y.
  * ``rope_qk``: the rotary embedding of queries and keys in one launch (eager: five ops per tensor).
  * ``silu_mul``: SwiGLU's middle, silu(gate) * up, without the silu(gate) intermediate.

Bytes moved by eager PyTorch (one kernel per op as ``minillm.model`` writes them; fp16/bf16 activations, 2 bytes an
element; RMSNorm's fp32 intermediates 4) and by the fused kernel:

    kernel        eager launches  eager bytes read + written      fused launches  fused bytes read + written
    add_rmsnorm   9               (24 + 18) N C + 2 C             1               (4 + 4) N C + 2 C
    rope_qk       10              (11 + 9) N (H + Hkv) D + 8 N D  1               (2 + 2) N (H + Hkv) D + 4 N D
    silu_mul      2               (6 + 4) N I                     1               (4 + 2) N I

(eager RMSNorm: add, .float(), pow, mean, + eps, rsqrt, mul, .to(dtype), * weight; eager RoPE, per tensor: x * cos,
the negated half, cat, * sin, add.) A decoder layer's elementwise work drops from 30 launches to 4 and
(SmolLM2) its traffic ~4x; each fused kernel is memory-bound: its time is its bytes over the GPU's bandwidth.

Public references, the same fusions in production code: vLLM's ``fused_add_rms_norm``
(https://github.com/vllm-project/vllm/blob/main/csrc/layernorm_kernels.cu), ``rotary_embedding`` (one program per
token, all heads of q and k: csrc/pos_encoding_kernels.cu) and ``silu_and_mul`` (csrc/activation_kernels.cu); and
Liger-Kernel's Triton versions (https://github.com/linkedin/Liger-Kernel, ops ``rms_norm``, ``fused_add_rms_norm``,
``rope``, ``swiglu``). Explained in notebooks/10_fast_decoding.ipynb.

Numerics follow the references below (which follow ``minillm.model``): RMSNorm and silu in fp32, rounded to the
activation dtype where the model rounds; a product of two fp16 (or bf16) values is exact in fp32, so ``weight * y``
computed in fp32 and rounded once equals torch's fp16 multiply bit for bit. RoPE rounds once where eager rounds three
times (x * cos, rot * sin, the sum): equal to within a unit or two in the last place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.profiler import record_function

from minillm._triton import HAS_TRITON, record_launch, require_triton, tl, triton
from minillm.attention.flash import interpreter_dtype

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # others (float64): use the references
MAX_C = 65536  # add_rmsnorm holds a whole row in one tile; Triton caps a tile at 2**20 elements, registers far earlier

if HAS_TRITON:

    @triton.jit
    def _add_rmsnorm_kernel(
        # Pointers
        x_ptr, residual_ptr, weight_ptr, y_ptr, h_ptr,
        # Sizes
        C,
        # Strides
        stride_xn, stride_xc, stride_rn, stride_rc, stride_wc, stride_yn, stride_hn,
        # Meta-parameters
        eps,
        BLOCK_C: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)  # int64: N * C can pass 2**31 elements
        offs_c = tl.arange(0, BLOCK_C)
        mask = offs_c < C
        x = tl.load(x_ptr + row * stride_xn + offs_c * stride_xc, mask=mask, other=0.0)  # [BLOCK_C]
        if residual_ptr is None:  # no residual (the first layer): h is x, nothing to write
            h = x
        else:
            r = tl.load(residual_ptr + row * stride_rn + offs_c * stride_rc, mask=mask, other=0.0)
            h = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)  # rounded like torch's x + residual
            tl.store(h_ptr + row * stride_hn + offs_c, h, mask=mask)
        h32 = h.to(tl.float32)  # masked lanes are 0: they add nothing to the sum of squares
        rstd = tl.rsqrt(tl.sum(h32 * h32, axis=0) / C + eps)
        w = tl.load(weight_ptr + offs_c * stride_wc, mask=mask, other=0.0).to(tl.float32)
        # The model rounds the normalized row to the activation dtype before the weight; the product is exact in fp32.
        y = (h32 * rstd).to(x.dtype).to(tl.float32) * w
        tl.store(y_ptr + row * stride_yn + offs_c, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rotate_heads(
        x_ptr, out_ptr, row, NUM_HEADS, HALF,
        stride_xn, stride_xh, stride_xd, stride_on, stride_oh,
        cos1, cos2, sin1, sin2,
        BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
    ):
        """Rotate one token's heads: pairs (x1, x2) = (x_i, x_{i+D/2}) of every head at once, a [BLOCK_H, BLOCK_HALF]
        tile per half."""
        offs_h = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, BLOCK_HALF)
        mask = (offs_h[:, None] < NUM_HEADS) & (offs_d[None, :] < HALF)
        x1_ptrs = x_ptr + row * stride_xn + offs_h[:, None] * stride_xh + offs_d[None, :] * stride_xd
        x1 = tl.load(x1_ptrs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_H, BLOCK_HALF]
        x2 = tl.load(x1_ptrs + HALF * stride_xd, mask=mask, other=0.0).to(tl.float32)
        # x * cos + rotate_half(x) * sin, with rotate_half(x) = (-x2, x1)
        out1 = x1 * cos1[None, :] - x2 * sin1[None, :]
        out2 = x2 * cos2[None, :] + x1 * sin2[None, :]
        out1_ptrs = out_ptr + row * stride_on + offs_h[:, None] * stride_oh + offs_d[None, :]
        tl.store(out1_ptrs, out1.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(out1_ptrs + HALF, out2.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_qk_kernel(
        # Pointers
        q_ptr, k_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr,
        # Sizes
        H, HKV, HALF,
        # Strides
        stride_qn, stride_qh, stride_qd,
        stride_kn, stride_kh, stride_kd,
        stride_cn, stride_cd, stride_sn, stride_sd,
        stride_qon, stride_qoh, stride_kon, stride_koh,
        # Meta-parameters
        BLOCK_H: tl.constexpr, BLOCK_HKV: tl.constexpr, BLOCK_HALF: tl.constexpr,
    ):
        # One program per token, as vLLM's rotary_embedding: its cos and sin are read once for all H + Hkv heads.
        row = tl.program_id(0).to(tl.int64)
        offs_d = tl.arange(0, BLOCK_HALF)
        mask_d = offs_d < HALF
        # Both halves of cos and sin: equal for rope_cos_sin's tables, but the reference uses each where it stands.
        cos1 = tl.load(cos_ptr + row * stride_cn + offs_d * stride_cd, mask=mask_d, other=0.0).to(tl.float32)
        cos2 = tl.load(cos_ptr + row * stride_cn + (offs_d + HALF) * stride_cd, mask=mask_d, other=0.0).to(tl.float32)
        sin1 = tl.load(sin_ptr + row * stride_sn + offs_d * stride_sd, mask=mask_d, other=0.0).to(tl.float32)
        sin2 = tl.load(sin_ptr + row * stride_sn + (offs_d + HALF) * stride_sd, mask=mask_d, other=0.0).to(tl.float32)
        _rotate_heads(q_ptr, q_out_ptr, row, H, HALF, stride_qn, stride_qh, stride_qd, stride_qon, stride_qoh,
                      cos1, cos2, sin1, sin2, BLOCK_H, BLOCK_HALF)
        _rotate_heads(k_ptr, k_out_ptr, row, HKV, HALF, stride_kn, stride_kh, stride_kd, stride_kon, stride_koh,
                      cos1, cos2, sin1, sin2, BLOCK_HKV, BLOCK_HALF)

    @triton.jit
    def _silu_mul_kernel(
        # Pointers
        gate_ptr, up_ptr, out_ptr,
        # Sizes
        I,
        # Strides
        stride_gn, stride_gi, stride_un, stride_ui, stride_on,
        # Meta-parameters
        BLOCK_I: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        offs_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
        mask = offs_i < I
        gate = tl.load(gate_ptr + row * stride_gn + offs_i * stride_gi, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(up_ptr + row * stride_un + offs_i * stride_ui, mask=mask, other=0.0).to(tl.float32)
        # silu in fp32, rounded to the activation dtype, then the (exact in fp32) product: F.silu(gate) * up exactly,
        # and what vLLM's silu_and_mul does.
        act = (gate * tl.sigmoid(gate)).to(out_ptr.dtype.element_ty).to(tl.float32)  # [BLOCK_I]
        tl.store(out_ptr + row * stride_on + offs_i, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


def _check_like(name: str, t: torch.Tensor, shape: tuple | None, what: str, like: torch.Tensor, like_name: str) -> None:
    """t must have `shape` (described as `what`; None: already checked), and like's dtype and device."""
    if shape is not None and tuple(t.shape) != shape:
        raise ValueError(f"{name} must be {what} = {shape}, got shape {tuple(t.shape)}")
    if t.dtype != like.dtype:
        raise ValueError(f"{name} must have {like_name}'s dtype {like.dtype}, got {t.dtype}")
    if t.device != like.device:
        raise ValueError(f"{name} must be on {like_name}'s device {like.device}, got {t.device}")


def _check_dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in KERNEL_DTYPES:
        raise ValueError(f"{name} dtype {t.dtype} is not one the kernel runs {KERNEL_DTYPES}; use the _ref function")


def add_rmsnorm_ref(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """h = x + residual (just x when residual is None); y = RMSNorm(h) * weight. x, residual (N, C), weight (C,).

    Returns (y, h), both (N, C) in x's dtype when weight has it: h is the next layer's residual. Normalizes in fp32,
    as ``minillm.model.RMSNorm`` does.
    """
    h = x if residual is None else x + residual  # (N, C)
    h32 = h.float()
    y = h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(h.dtype), h


def add_rmsnorm_plan(C: int) -> dict:
    """The launch choices: one row per program in a single [BLOCK_C] tile, more warps for wider rows (Liger-Kernel's
    ``calculate_settings``). Memory-bound with no loop to pipeline, so the same on every GPU."""
    block_c = triton.next_power_of_2(C)
    num_warps = 16 if block_c >= 8192 else 8 if block_c >= 2048 else 4
    return dict(BLOCK_C=block_c, num_warps=num_warps, num_stages=1)


def add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of ``add_rmsnorm_ref``, one launch: x, residual (N, C) or None, weight (C,) -> (y, h) (N, C).

    weight must have x's dtype (the model keeps RMSNorm.weight in the model's dtype; an fp32 weight would make the
    reference's y fp32 by type promotion). New y and h are returned; with residual None, h is x itself. Inputs may be
    strided views. Raises where Triton cannot run.
    """
    if x.dim() != 2:
        raise ValueError(f"x must be (N, C), got shape {tuple(x.shape)}; flatten leading dims with x.view(-1, C)")
    _check_dtype("x", x)
    N, C = x.shape
    if not 1 <= C <= MAX_C:
        raise ValueError(f"x's C = {C} must be in [1, {MAX_C}]: add_rmsnorm normalizes a whole row in one tile")
    if residual is not None:
        _check_like("residual", residual, (N, C), "(N, C) like x", x, "x")
    _check_like("weight", weight, (C,), "(C,)", x, "x")
    if not eps >= 0:
        raise ValueError(f"eps must be a number >= 0, got {eps}")
    require_triton(x.device, "add_rmsnorm")
    run_dtype = interpreter_dtype(x.dtype)  # the CPU interpreter rounds fp32 -> bf16 toward zero: run fp32 copies
    if run_dtype != x.dtype:
        r = None if residual is None else residual.to(run_dtype)
        y, h = add_rmsnorm(x.to(run_dtype), r, weight.to(run_dtype), eps)
        return y.to(x.dtype), (x if residual is None else h.to(x.dtype))
    y = torch.empty((N, C), dtype=x.dtype, device=x.device)
    h = x if residual is None else torch.empty_like(y)
    if N == 0:
        return y, h
    r_strides = (0, 0) if residual is None else residual.stride()
    record_launch("add_rmsnorm")
    with record_function("triton::add_rmsnorm"):  # one kernel in a profile, even in the interpreter
        _add_rmsnorm_kernel[(N,)](
            x, residual, weight, y, None if residual is None else h,
            C,
            *x.stride(), *r_strides, weight.stride(0), y.stride(0), h.stride(0),
            float(eps), **add_rmsnorm_plan(C),
        )
    return y, h


def rope_qk_ref(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate queries q (N, H, D) and keys k (N, Hkv, D) by cos, sin (N, D) (``minillm.model.rope_cos_sin``'s, each
    angle repeated for both halves): x * cos + rotate_half(x) * sin, pairs (x_i, x_{i+D/2})."""
    def rotate(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos[:, None] + torch.cat([-x2, x1], dim=-1) * sin[:, None]

    return rotate(q), rotate(k)


def rope_qk_plan(H: int, Hkv: int, D: int) -> dict:
    """The launch choices: one token per program, a [BLOCK_H, BLOCK_HALF] tile per half of q's heads and a
    [BLOCK_HKV, BLOCK_HALF] one of k's. The same on every GPU."""
    return dict(
        BLOCK_H=triton.next_power_of_2(H), BLOCK_HKV=triton.next_power_of_2(Hkv),
        BLOCK_HALF=triton.next_power_of_2(D // 2), num_warps=4, num_stages=1,
    )


def rope_qk(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of ``rope_qk_ref``: q (N, H, D), k (N, Hkv, D), cos, sin (N, D), all one dtype; D even.

    One launch rotates both q and k into new contiguous tensors. Inputs may be strided views (q from a (N, H * D)
    projection, or a slice of a fused qkv one). Raises where Triton cannot run.
    """
    if q.dim() != 3:
        raise ValueError(f"q must be (N, H, D), got shape {tuple(q.shape)}")
    _check_dtype("q", q)
    N, H, D = q.shape
    if D % 2 or D == 0:
        raise ValueError(f"q's head dim D = {D} must be even and > 0: RoPE rotates pairs (x_i, x_{{i+D/2}})")
    if k.dim() != 3 or k.shape[0] != N or k.shape[2] != D:
        raise ValueError(f"k must be (N, Hkv, D) = ({N}, Hkv, {D}) like q, got shape {tuple(k.shape)}")
    if H == 0 or k.shape[1] == 0:
        raise ValueError(f"q and k need at least one head each, got H = {H} and Hkv = {k.shape[1]}")
    _check_like("k", k, None, "(N, Hkv, D)", q, "q")
    _check_like("cos", cos, (N, D), "(N, D)", q, "q")
    _check_like("sin", sin, (N, D), "(N, D)", q, "q")
    require_triton(q.device, "rope_qk")
    run_dtype = interpreter_dtype(q.dtype)  # the CPU interpreter rounds fp32 -> bf16 toward zero: run fp32 copies
    if run_dtype != q.dtype:
        q_rot, k_rot = rope_qk(q.to(run_dtype), k.to(run_dtype), cos.to(run_dtype), sin.to(run_dtype))
        return q_rot.to(q.dtype), k_rot.to(q.dtype)
    Hkv = k.shape[1]
    q_out = torch.empty((N, H, D), dtype=q.dtype, device=q.device)
    k_out = torch.empty((N, Hkv, D), dtype=q.dtype, device=q.device)
    if N == 0:
        return q_out, k_out
    record_launch("rope_qk")
    with record_function("triton::rope_qk"):  # one kernel in a profile, even in the interpreter
        _rope_qk_kernel[(N,)](
            q, k, cos, sin, q_out, k_out,
            H, Hkv, D // 2,
            *q.stride(), *k.stride(), *cos.stride(), *sin.stride(), *q_out.stride()[:2], *k_out.stride()[:2],
            **rope_qk_plan(H, Hkv, D),
        )
    return q_out, k_out


def silu_mul_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's middle: silu(gate) * up, gate and up (N, I) -> (N, I)."""
    return F.silu(gate) * up


def silu_mul_plan(I: int) -> dict:
    """The launch choices: a grid of (row, BLOCK_I columns), at most 1024 columns a program so a wide MLP (Llama's
    I = 14336) still spreads over many programs at decode. The same on every GPU."""
    return dict(BLOCK_I=min(1024, triton.next_power_of_2(I)), num_warps=4, num_stages=1)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Triton version of ``silu_mul_ref``: gate, up (N, I) of one dtype -> a new (N, I); silu in fp32.

    gate and up may be strided views, such as the two halves of a fused gate_up projection (N, 2 I). Raises where
    Triton cannot run.
    """
    if gate.dim() != 2:
        raise ValueError(f"gate must be (N, I), got shape {tuple(gate.shape)}")
    _check_dtype("gate", gate)
    _check_like("up", up, tuple(gate.shape), "(N, I) like gate", gate, "gate")
    require_triton(gate.device, "silu_mul")
    run_dtype = interpreter_dtype(gate.dtype)  # the CPU interpreter rounds fp32 -> bf16 toward zero: run fp32 copies
    if run_dtype != gate.dtype:
        return silu_mul(gate.to(run_dtype), up.to(run_dtype)).to(gate.dtype)
    N, I = gate.shape
    out = torch.empty((N, I), dtype=gate.dtype, device=gate.device)
    if N == 0 or I == 0:
        return out
    cfg = silu_mul_plan(I)
    record_launch("silu_mul")
    with record_function("triton::silu_mul"):  # one kernel in a profile, even in the interpreter
        _silu_mul_kernel[(N, triton.cdiv(I, cfg["BLOCK_I"]))](
            gate, up, out,
            I,
            *gate.stride(), *up.stride(), out.stride(0),
            **cfg,
        )
    return out
