"""Weight-only quantized linear layers: int8 per output channel, int4 per group with zero-points.

In doing so, you will learn about:
  * weight-only quantization: weights are stored as small integers plus scales, activations stay in floating
    point, and every matmul dequantizes on the fly (LLM.int8 without outliers, Dettmers et al., arXiv 2208.07339;
    group-wise int4 as in GPTQ, arXiv 2210.17323, and AWQ, arXiv 2306.00978);
  * storage you can count: `nbytes()` is the honest size of every buffer, scales and zero-points included
    (int8: 8 bits + 16 bits per row; int4 g128: 4 bits + (16 + 8) bits per 128 weights = 4.19 bits per weight);
  * one forward, two engines: the Triton kernels of ``kernels.py`` on a GPU, or the PyTorch reference
    (dequantize the whole weight, then `F.linear`) anywhere else.
Both modules are drop-in replacements for `nn.Linear`: x (..., K) -> (..., N), optional bias.
Notebook 06 (``06_quantization``) swaps them into the real model.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from minillm._triton import HAS_TRITON, record_fallback, triton_available
from minillm.quant.kernels import dequant_matmul, dequantize_weight_ref
from minillm.quant.numerics import pack_int4, quantize_asymmetric, quantize_symmetric

BACKENDS = ("auto", "triton", "reference")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # activations dequant_matmul takes
INT4_GROUP_SIZES = (32, 64, 128, 256)
SCALE_DTYPE = torch.float16  # as in GGUF, AWQ and GPTQ: 16-bit scales are plenty for a per-group step size


def check_int4_shape(in_features: int, group_size: int) -> None:
    """Raise ValueError unless an int4 layer of this width can use this group size."""
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"group_size must be one of {INT4_GROUP_SIZES}, got {group_size}")
    if in_features % 2 != 0:
        raise ValueError(f"int4 packs two codes per byte: in_features must be even, got {in_features}")
    if group_size > in_features:
        raise ValueError(
            f"group_size={group_size} is wider than the layer (in_features={in_features}); "
            f"choose one of {[g for g in INT4_GROUP_SIZES if g <= in_features]}"
        )


class _QuantLinear(nn.Module):
    """Shared forward, bias and byte counting; subclasses define the storage and `bits`."""

    bits: int
    group_size: int

    def __init__(self, in_features: int, out_features: int, backend: str = "auto"):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.backend = backend
        self.register_buffer("bias", None)
        self.register_buffer("zeros", None)  # int4 only

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        if value not in BACKENDS:
            raise ValueError(f"unknown backend {value!r}; choose one of {BACKENDS}")
        self._backend = value

    def _uses_triton(self, x: torch.Tensor) -> bool:
        # "auto" means the kernel on a GPU only: under TRITON_INTERPRET=1 on CPU it is correct but far too slow.
        if self.backend == "reference":
            return False
        if self.backend == "auto":
            if not x.is_cuda:
                return False
            if not HAS_TRITON or x.dtype not in KERNEL_DTYPES:
                why = "Triton is not installed" if not HAS_TRITON else f"the kernels take {KERNEL_DTYPES}, not {x.dtype}"
                record_fallback(f"{type(self).__name__} on a GPU", why)  # counted: LLM.stats() shows it
                return False
            return True
        if not triton_available(x.device):
            raise RuntimeError(f"backend='triton' needs triton on CUDA or TRITON_INTERPRET=1; x is on {x.device}")
        return True

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight this layer really multiplies by, (N, K) in `dtype`."""
        return dequantize_weight_ref(self.qweight, self.scales, self.zeros, self.bits, self.group_size).to(dtype)

    def dequantize_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows (M,) long of the weight, dequantized to fp32 (M, K): an embedding lookup in a tied table."""
        zeros = None if self.zeros is None else self.zeros[rows]
        return dequantize_weight_ref(self.qweight[rows], self.scales[rows], zeros, self.bits, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) -> (..., N) in x's dtype."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected x (..., {self.in_features}), got shape {tuple(x.shape)}")
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        if self._uses_triton(x):
            out = dequant_matmul(x2, self.qweight, self.scales, self.zeros, self.bits, self.group_size)  # (M, N)
        else:
            out = x2 @ self.dequantize_weight(x.dtype).t()  # (M, N)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    def nbytes(self) -> int:
        """Bytes of every buffer this layer stores: codes, scales, zero-points, bias."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, bias={self.bias is not None}, backend={self.backend!r}"
        )

    def _copy_bias(self, linear: nn.Linear) -> None:
        if linear.bias is not None:
            self.bias = linear.bias.detach().clone()


class Int8Linear(_QuantLinear):
    """int8 weights with one fp16 scale per output channel: w[n, k] = qweight[n, k] * scales[n, 0].

    Buffers: qweight (N, K) int8, scales (N, 1) fp16, bias (N,) or None.
    """

    bits = 8

    def __init__(self, in_features: int, out_features: int, backend: str = "auto"):
        super().__init__(in_features, out_features, backend)
        self.group_size = in_features  # one group per row: the kernels treat per-channel as a single group
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(out_features, 1, dtype=SCALE_DTYPE))

    @classmethod
    def from_linear(cls, linear: nn.Linear, backend: str = "auto") -> Int8Linear:
        """Round-to-nearest absmax quantization of `linear.weight`, one scale per output channel."""
        w = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, backend).to(w.device)
        qt = quantize_symmetric(w, bits=8, granularity="channel")
        # Re-derive the codes with the fp16-rounded scales, so stored codes and stored scales agree.
        scales = qt.scale.to(SCALE_DTYPE)
        layer.qweight = torch.clamp(torch.round(w.float() / scales.float()), -127, 127).to(torch.int8)
        layer.scales = scales
        layer._copy_bias(linear)
        return layer


class Int4Linear(_QuantLinear):
    """4-bit weights in groups of `group_size` along K with fp16 scales and integer zero-points.

    w[n, k] = (code[n, k] - zeros[n, k // G]) * scales[n, k // G], codes in [0, 15]. G need not divide K: the last
    group of each row is then shorter (GGUF's blocks must divide K; here the model's C = 576 meets G = 128).
    Buffers: qweight (N, K / 2) uint8 (byte j holds codes 2j (low nibble) and 2j + 1 (high nibble)),
    scales (N, ceil(K / G)) fp16, zeros (N, ceil(K / G)) uint8, bias (N,) or None.
    """

    bits = 4

    def __init__(self, in_features: int, out_features: int, group_size: int = 128, backend: str = "auto"):
        check_int4_shape(in_features, group_size)
        super().__init__(in_features, out_features, backend)
        self.group_size = group_size
        num_groups = -(-in_features // group_size)  # ceil: a shorter last group when G does not divide K
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(out_features, num_groups, dtype=SCALE_DTYPE))
        self.register_buffer("zeros", torch.zeros(out_features, num_groups, dtype=torch.uint8))

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 128, backend: str = "auto") -> Int4Linear:
        """Round-to-nearest asymmetric 4-bit quantization of `linear.weight` per group of `group_size` inputs."""
        w = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, group_size, backend).to(w.device)
        K = linear.in_features
        # Pad a short last group with zeros: they do not change its range, which always includes 0.
        w_padded = torch.nn.functional.pad(w.float(), (0, -K % group_size))  # (N, num_groups * G)
        qt = quantize_asymmetric(w_padded, bits=4, granularity="group", group_size=group_size)
        scales = qt.scale.to(SCALE_DTYPE)
        # Codes from the fp16-rounded scales, so what is stored is what the forward multiplies by.
        s = scales.float().repeat_interleave(group_size, dim=1)[:, :K]  # (N, K)
        z = qt.zero.repeat_interleave(group_size, dim=1)[:, :K]  # (N, K)
        codes = torch.clamp(torch.round(w.float() / s) + z, 0, 15)
        layer.qweight = pack_int4(codes)
        layer.scales = scales
        layer.zeros = qt.zero.to(torch.uint8)
        layer._copy_bias(linear)
        return layer


class QuantizedEmbedding(nn.Module):
    """Token embedding read from the quantized LM head it is tied to, so the shared table is stored once.

    A tied model uses one (V, C) matrix twice: `lm_head` multiplies by all of it every token (so quantizing it saves
    bandwidth), `embed_tokens` reads one row per token. This lookup dequantizes just the rows it needs.
    `col_scale` (C,) undoes AWQ scaling of the head's input channels (the head stores W * s; rows are divided by s).
    """

    def __init__(self, table: _QuantLinear, dtype: torch.dtype, col_scale: torch.Tensor | None = None):
        super().__init__()
        self.table = table
        self.dtype = dtype
        self.register_buffer("col_scale", None if col_scale is None else col_scale.detach().float().clone())

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (B, T) -> (B, T, C) in the model's dtype."""
        rows = self.table.dequantize_rows(input_ids.reshape(-1))  # (B*T, C)
        if self.col_scale is not None:
            rows = rows / self.col_scale
        return rows.to(self.dtype).reshape(*input_ids.shape, -1)
