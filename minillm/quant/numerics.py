"""Integer quantization numerics: absmax and zero-point, per tensor / per channel / per group.

In doing so, you will learn about:
  * symmetric (absmax) quantization: q = round(w / s) with s = max|w| / qmax, so 0.0 maps to the integer 0;
  * asymmetric (zero-point) quantization: q = round(w / s) + z with s = (max - min) / (2^bits - 1), which spends
    all 2^bits levels on the range the values actually cover, as in Jacob et al., arXiv 1712.05877 §2;
  * granularity: one scale for the whole tensor, one per output channel (row of a linear weight), or one per
    group of `group_size` consecutive input weights of a row. Smaller groups follow local ranges, so an outlier
    only spoils its own group, at the price of more scales to store (Dettmers et al., arXiv 2212.09720 §3);
  * how to measure the damage: MSE, max absolute error, and the signal-to-quantization-noise ratio in dB;
  * packing two 4-bit values into one byte.

The llama.cpp GGUF block formats read by ``minillm/gguf.py`` are instances of these schemes, on groups ("blocks")
of 32 weights along the input dimension with fp16 scales:
  * Q8_0: symmetric int8, w = q * d with d = max|w| / 127; 34 bytes per 32 weights (8.5 bits/weight);
  * Q4_0: symmetric 4-bit stored unsigned with a fixed offset: w = (q - 8) * d, q in [0, 15], d chosen so the
    largest-magnitude weight lands on -8; 18 bytes per 32 weights (4.5 bits/weight);
  * Q4_1: asymmetric 4-bit with a float minimum instead of an integer zero-point: w = q * d + m, m = min(w),
    d = (max - min) / 15; 20 bytes per 32 weights (5 bits/weight).
This module keeps an *integer* zero-point z (AWQ and GPTQ do the same), so w = 0.0 is represented exactly:
w ~ (q - z) * s. Q4_1's float minimum m corresponds to -z * s.
Notebook 06 (``06_quantization``) draws the grids and plots error against granularity.

Shapes: a weight is (N, K) = (out_features, in_features); groups run along K.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GRANULARITIES = ("tensor", "channel", "group")


@dataclass
class QuantizedTensor:
    """Integers plus what it takes to map them back: w ~ (q - zero) * scale, broadcast per group.

    q: integer codes, same shape as the original (N, K) (int8 for symmetric, uint8 for asymmetric);
    scale: (1, 1) per tensor, (N, 1) per channel, (N, K // group_size) per group;
    zero: like scale (integer-valued) for asymmetric, None for symmetric.
    """

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    bits: int
    granularity: str
    group_size: int | None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self, dtype)


def _check(w: torch.Tensor, bits: int, granularity: str, group_size: int | None) -> None:
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight (N, K), got shape {tuple(w.shape)}")
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}; choose one of {GRANULARITIES}")
    if granularity == "group":
        if group_size is None or group_size <= 0 or w.shape[1] % group_size != 0:
            raise ValueError(
                f"group_size={group_size} must be a positive divisor of in_features K={w.shape[1]}"
            )


def _grouped(w: torch.Tensor, granularity: str, group_size: int | None) -> torch.Tensor:
    """View w (N, K) as rows sharing one scale: (1, N*K), (N, K) or (N, K/G, G)."""
    if granularity == "tensor":
        return w.reshape(1, 1, -1)
    if granularity == "channel":
        return w.reshape(w.shape[0], 1, -1)
    return w.reshape(w.shape[0], -1, group_size)


def quantize_symmetric(
    w: torch.Tensor, bits: int = 8, granularity: str = "channel", group_size: int | None = None
) -> QuantizedTensor:
    """Absmax quantization: q = clamp(round(w / s), -qmax, qmax), s = max|w| / qmax, qmax = 2^(bits-1) - 1.

    w (N, K) float -> QuantizedTensor with q int8 (N, K). The range is symmetric (int8 uses [-127, 127], not -128)
    so that negating w negates q exactly.
    """
    _check(w, bits, granularity, group_size)
    qmax = 2 ** (bits - 1) - 1
    g = _grouped(w.float(), granularity, group_size)  # (R, NG, G)
    scale = g.abs().amax(dim=-1, keepdim=True) / qmax  # (R, NG, 1)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # an all-zero group: any scale works
    q = torch.clamp(torch.round(g / scale), -qmax, qmax).to(torch.int8)
    return QuantizedTensor(q.reshape(w.shape), scale.squeeze(-1), None, bits, granularity, group_size)


def quantize_asymmetric(
    w: torch.Tensor, bits: int = 4, granularity: str = "group", group_size: int | None = 128
) -> QuantizedTensor:
    """Zero-point quantization: q = clamp(round(w / s) + z, 0, 2^bits - 1), s = (max - min) / (2^bits - 1).

    The integer zero-point z = round(-min / s) is the code of 0.0. w (N, K) float -> QuantizedTensor with q uint8.
    """
    _check(w, bits, granularity, group_size)
    qmax = 2**bits - 1
    g = _grouped(w.float(), granularity, group_size)  # (R, NG, G)
    # Include 0 in the range so the zero-point is a valid code and exact zeros stay exact.
    w_min = g.amin(dim=-1, keepdim=True).clamp(max=0)
    w_max = g.amax(dim=-1, keepdim=True).clamp(min=0)
    scale = (w_max - w_min) / qmax
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    zero = torch.clamp(torch.round(-w_min / scale), 0, qmax)
    q = torch.clamp(torch.round(g / scale) + zero, 0, qmax).to(torch.uint8)
    return QuantizedTensor(q.reshape(w.shape), scale.squeeze(-1), zero.squeeze(-1), bits, granularity, group_size)


def expand_groups(t: torch.Tensor, shape: torch.Size, granularity: str, group_size: int | None) -> torch.Tensor:
    """Broadcast per-group values (scales or zero-points) back to the weight's (N, K) shape."""
    if granularity == "tensor":
        return t.reshape(1, 1).expand(shape)
    if granularity == "channel":
        return t.reshape(-1, 1).expand(shape)
    return t.repeat_interleave(group_size, dim=1)


def dequantize(qt: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(q - zero) * scale, computed in fp32 and returned as `dtype`, shape (N, K)."""
    q = qt.q.float()
    if qt.zero is not None:
        q = q - expand_groups(qt.zero.float(), q.shape, qt.granularity, qt.group_size)
    return (q * expand_groups(qt.scale.float(), q.shape, qt.granularity, qt.group_size)).to(dtype)


def fake_quantize(
    w: torch.Tensor, bits: int, granularity: str = "channel", group_size: int | None = None, symmetric: bool = True
) -> torch.Tensor:
    """Quantize then dequantize: the weight the quantized model really uses, in w's dtype."""
    quantize = quantize_symmetric if symmetric else quantize_asymmetric
    return quantize(w, bits, granularity, group_size).dequantize(w.dtype)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte along the last dim: byte j holds q[2j] in its low nibble, q[2j+1] in its high one.

    q (..., K) integers in [0, 15], K even -> (..., K / 2) uint8.
    """
    if q.shape[-1] % 2 != 0:
        raise ValueError(f"pack_int4 needs an even last dimension, got {q.shape[-1]}")
    if q.numel() and (int(q.min()) < 0 or int(q.max()) > 15):
        raise ValueError(f"pack_int4 needs codes in [0, 15], got range [{int(q.min())}, {int(q.max())}]")
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4`: (..., K / 2) uint8 -> (..., K) uint8 in [0, 15]."""
    low, high = packed & 0xF, packed >> 4
    return torch.stack([low, high], dim=-1).reshape(*packed.shape[:-1], -1)


def mse(ref: torch.Tensor, approx: torch.Tensor) -> float:
    return (ref.float() - approx.float()).pow(2).mean().item()


def max_abs_error(ref: torch.Tensor, approx: torch.Tensor) -> float:
    return (ref.float() - approx.float()).abs().max().item()


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio, 10 log10(sum ref^2 / sum (ref - approx)^2): ~6 dB per extra bit."""
    noise = (ref.float() - approx.float()).pow(2).sum()
    signal = ref.float().pow(2).sum()
    if noise == 0:
        return float("inf")
    return (10 * torch.log10(signal / noise)).item()
