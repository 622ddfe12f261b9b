"""Dequant-matmul Triton kernels (GEMV decode path, tiled GEMM prefill path) against their torch references.

On CPU these run under TRITON_INTERPRET=1 (set by conftest.py), so shapes stay small and odd.
"""

import pytest
import torch

from minillm._triton import triton_available
from minillm.quant import kernels
from minillm.quant.numerics import pack_int4, quantize_asymmetric, quantize_symmetric

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not triton_available(DEVICE), reason="needs triton (GPU or TRITON_INTERPRET=1)")


def int8_weights(N, K, seed=0):
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(seed))
    qt = quantize_symmetric(w, 8, "channel")
    return (qt.q.to(DEVICE), qt.scale.half().to(DEVICE), None, 8, K)


def int4_weights(N, K, group_size, seed=0):
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(seed))
    K_pad = -(-K // group_size) * group_size
    qt = quantize_asymmetric(torch.nn.functional.pad(w, (0, K_pad - K)), 4, "group", group_size)
    return (pack_int4(qt.q[:, :K]).to(DEVICE), qt.scale.half().to(DEVICE), qt.zero.to(torch.uint8).to(DEVICE), 4, group_size)


def x_rows(M, K, dtype=torch.float32, seed=1):
    return torch.randn(M, K, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


CASES = [  # (M, N, K, bits, group_size); K=80 with G=32 has a short last group
    (1, 37, 96, 8, None), (5, 70, 33, 8, None), (3, 37, 96, 4, 32), (7, 45, 128, 4, 64), (2, 33, 80, 4, 32),
]


def weights_for(N, K, bits, group_size):
    return int8_weights(N, K) if bits == 8 else int4_weights(N, K, group_size)


@pytest.mark.parametrize("M,N,K,bits,group_size", CASES)
def test_gemv_matches_reference(M, N, K, bits, group_size):
    w = weights_for(N, K, bits, group_size)
    x = x_rows(M, K)
    out = kernels.dequant_gemv(x, *w)
    torch.testing.assert_close(out, kernels.dequant_gemv_ref(x, *w), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out, kernels.dequant_matmul_ref(x, *w), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("M,N,K,bits,group_size", [(19, 37, 96, 8, None), (33, 70, 128, 4, 32), (21, 33, 80, 4, 32)])
def test_gemm_matches_reference(M, N, K, bits, group_size):
    w = weights_for(N, K, bits, group_size)
    x = x_rows(M, K)
    torch.testing.assert_close(kernels.dequant_gemm(x, *w), kernels.dequant_gemm_ref(x, *w), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    w = int4_weights(40, 64, 32)
    # Under the interpreter (numpy has no bfloat16) the launchers run bf16 in fp32; on a GPU, in bf16.
    for M in (3, 20):  # both paths through the dispatcher
        x = x_rows(M, 64, dtype)
        out = kernels.dequant_matmul(x, *w)
        assert out.dtype == dtype and out.shape == (M, 40)
        ref = kernels.dequant_matmul_ref(x.float(), *w)
        torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.05)


def test_strided_input_rows():
    w = int8_weights(24, 48)
    x = x_rows(6, 96)[:, ::2]  # non-contiguous (M, K) view
    torch.testing.assert_close(kernels.dequant_gemv(x, *w), kernels.dequant_matmul_ref(x, *w), atol=1e-4, rtol=1e-4)


def test_launcher_rejects_bad_inputs():
    w8 = int8_weights(8, 32)
    with pytest.raises(ValueError, match="2-D"):
        kernels.dequant_gemv(x_rows(2, 32)[None], *w8)
    with pytest.raises(TypeError, match="fp16, bf16 or fp32"):
        kernels.dequant_gemv(x_rows(2, 32).to(torch.float64), *w8)
    with pytest.raises(ValueError, match="int8 qweight"):
        kernels.dequant_gemv(x_rows(2, 30), *w8)
    with pytest.raises(ValueError, match="bits must be 8 or 4"):
        kernels.dequant_gemv(x_rows(2, 32), w8[0], w8[1], None, 3, 32)
    w4 = int4_weights(8, 64, 32)
    with pytest.raises(ValueError, match="zeros"):
        kernels.dequant_gemm(x_rows(2, 64), w4[0], w4[1], None, 4, 32)


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("M", [1, 16, 512])
def test_real_sizes_on_gpu(bits, M):
    w = int8_weights(4096, 4096) if bits == 8 else int4_weights(4096, 4096, 128)
    x = x_rows(M, 4096, torch.float16)
    out = kernels.dequant_matmul(x, *w)
    ref = kernels.dequant_matmul_ref(x.float(), *w)
    torch.testing.assert_close(out.float(), ref, atol=0.5, rtol=0.02)
