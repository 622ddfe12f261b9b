"""Counting the global-memory bytes of a layer's elementwise tail: eager PyTorch vs one fused add + RMSNorm kernel.

Teaches: why fusing cheap ops pays. Between a layer's matmuls sit the residual add and the next RMSNorm; each does a
handful of flops per element, so its time is the bytes it moves (a roofline's memory-bound side). Eager PyTorch runs
``h = x + attn`` and then ``minillm.model.RMSNorm(h)`` as one kernel per op, and every kernel reads its inputs from
global memory and writes its output back. These are the top-level aten ops ``torch.profiler`` lists for them (CPU
run; on a GPU each is one kernel), N tokens, C hidden, activations and weight of e bytes, fp32 intermediates of 4:

    kernel                 reads               writes     note
    aten::add   x + attn   2 N C e             N C e      h, the next layer's residual
    aten::to    .float()   N C e               4 N C      only when e != 4: to a dtype it has, .to() returns the
                                                          tensor itself and launches nothing
    aten::pow   h32 ** 2   4 N C               4 N C
    aten::mean  over C     4 N C               4 N        one reduction kernel per row
    aten::add   + eps      4 N                 4 N        a Python scalar costs nothing
    aten::rsqrt            4 N                 4 N
    aten::mul   h32 * r    4 N C + 4 N         4 N C
    aten::to    .to(e)     4 N C               N C e      only when e != 4
    aten::mul   weight *   C e + N C e         N C e      y

so the eager tail moves 7 N C e + 28 N C + 24 N + C e bytes when e != 4, and 40 N C + 24 N + 4 C in fp32. The fused
kernel (``minillm.fast.fused.add_rmsnorm``) reads x, the residual and the weight once and writes h and y once:
4 N C e + C e, its fp32 math in registers. Decoding one token of SmolLM2 (N = 1, C = 576) in bf16: 25,368 bytes
eager, 5,760 fused. Notebook 10 (``10_fast_decoding``) measures the kernels; exercise 10.3 rewrites the count.
"""

from __future__ import annotations

FP32_BYTES = 4  # RMSNorm normalizes in fp32 whatever the activations' dtype


def unfused_kernels(num_tokens: int, hidden_size: int, element_size: int) -> list[tuple[str, int, int]]:
    """(kernel, bytes read, bytes written) for each kernel eager PyTorch runs for ``x + attn`` then RMSNorm."""
    _check(num_tokens, hidden_size, element_size)
    N, C, e, f = num_tokens, hidden_size, element_size, FP32_BYTES
    casts = e != f  # .float() and .to(dtype) launch a copy only when the dtype changes
    kernels = [("aten::add (x + attn)", 2 * N * C * e, N * C * e)]
    if casts:
        kernels.append(("aten::to (.float())", N * C * e, N * C * f))
    kernels += [
        ("aten::pow (h ** 2)", N * C * f, N * C * f),
        ("aten::mean (over C)", N * C * f, N * f),
        ("aten::add (+ eps)", N * f, N * f),
        ("aten::rsqrt", N * f, N * f),
        ("aten::mul (h * rsqrt)", N * C * f + N * f, N * C * f),
    ]
    if casts:
        kernels.append(("aten::to (.to(dtype))", N * C * f, N * C * e))
    kernels.append(("aten::mul (weight * y)", C * e + N * C * e, N * C * e))
    return kernels


def unfused_bytes(num_tokens: int, hidden_size: int, element_size: int) -> int:
    """Bytes read + written by eager PyTorch's residual add and RMSNorm (the table in the module docstring)."""
    return sum(r + w for _, r, w in unfused_kernels(num_tokens, hidden_size, element_size))


def fused_bytes(num_tokens: int, hidden_size: int, element_size: int) -> int:
    """Bytes read + written by the fused kernel: read x, residual (N, C) and weight (C,); write h and y (N, C)."""
    _check(num_tokens, hidden_size, element_size)
    N, C, e = num_tokens, hidden_size, element_size
    return (2 * N * C + C) * e + 2 * N * C * e


def add_rmsnorm_traffic(num_tokens: int, hidden_size: int, element_size: int) -> tuple[int, int, int]:
    """(unfused bytes, fused bytes, bytes saved) of the residual add + RMSNorm for N tokens of C hidden."""
    unfused = unfused_bytes(num_tokens, hidden_size, element_size)
    fused = fused_bytes(num_tokens, hidden_size, element_size)
    return unfused, fused, unfused - fused


def _check(num_tokens: int, hidden_size: int, element_size: int) -> None:
    if num_tokens < 1 or hidden_size < 1:
        raise ValueError(f"need num_tokens >= 1 and hidden_size >= 1, got {num_tokens} and {hidden_size}")
    if element_size not in (2, 4):
        raise ValueError(f"element_size must be 2 (fp16, bf16) or 4 (fp32), got {element_size}")
