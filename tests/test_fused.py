"""The fused elementwise kernels (minillm/fast/fused.py) against their references, on odd shapes, strided views and
every kernel dtype; the references against the model's own RMSNorm and apply_rope; one launch per call; bad inputs
refused with errors that name the argument.

Tolerances: fp32 to 1e-5; fp16 to 2e-3 (RoPE rounds once where eager rounds three times: a unit or two in the last
place); bf16 to 1.6e-2 relative (8 bits of mantissa, and on CPU the kernel runs on fp32 copies: see
``minillm.attention.flash.interpreter_dtype``). add_rmsnorm and silu_mul in fp16 round where the reference rounds, so
they are usually bit-identical; the tolerance covers rsqrt and exp implementations.
"""

import pytest
import torch

import minillm
from minillm._triton import triton_available
from minillm.fast.fused import (
    add_rmsnorm,
    add_rmsnorm_ref,
    rope_qk,
    rope_qk_ref,
    silu_mul,
    silu_mul_ref,
)
from minillm.model import RMSNorm, apply_rope, rope_cos_sin

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=2e-2, rtol=1.6e-2)}

needs_kernels = pytest.mark.skipif(not triton_available(DEVICE), reason="needs a GPU or Triton's interpreter")


def randn(*shape: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(dtype=dtype, device=DEVICE)


def strided(t: torch.Tensor, seed: int) -> torch.Tensor:
    """The same values as t (N, X) in a non-contiguous layout: the left columns of a wider (N, X + 3) tensor."""
    wide = randn(t.shape[0], t.shape[1] + 3, dtype=t.dtype, seed=seed)
    wide[:, : t.shape[1]] = t
    return wide[:, : t.shape[1]]


# ------------------------------------------------------------------------------------------------------------------
# The references are the model's math.


def test_add_rmsnorm_ref_is_the_models_rmsnorm_of_the_sum():
    x, residual = randn(5, 48, dtype=torch.float32, seed=0), randn(5, 48, dtype=torch.float32, seed=1)
    norm = RMSNorm(48, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(randn(48, dtype=torch.float32, seed=2))
        y, h = add_rmsnorm_ref(x, residual, norm.weight, 1e-5)
        assert torch.equal(h, x + residual) and torch.equal(y, norm(x + residual))
        y, h = add_rmsnorm_ref(x, None, norm.weight, 1e-5)
        assert h is x and torch.equal(y, norm(x))


def test_rope_qk_ref_is_the_models_apply_rope():
    N, H, Hkv, D = 7, 4, 2, 16
    q, k = randn(N, H, D, dtype=torch.float32, seed=0), randn(N, Hkv, D, dtype=torch.float32, seed=1)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    cos, sin = rope_cos_sin(torch.arange(N)[None] + 5, inv_freq, torch.float32)  # (1, N, D)
    q_rot, k_rot = rope_qk_ref(q, k, cos[0], sin[0])
    # apply_rope takes (B, H, T, D): the N tokens are one sequence's T positions.
    assert torch.equal(q_rot, apply_rope(q.transpose(0, 1)[None], cos, sin)[0].transpose(0, 1))
    assert torch.equal(k_rot, apply_rope(k.transpose(0, 1)[None], cos, sin)[0].transpose(0, 1))


# ------------------------------------------------------------------------------------------------------------------
# Each kernel against its reference.


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N, C", [(0, 64), (2, 1), (1, 5), (3, 100), (17, 576)])
@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "no_residual"])
def test_add_rmsnorm_matches_ref(dtype, N, C, with_residual):
    x = strided(randn(N, C, dtype=dtype, seed=N + C), seed=1)  # a strided view, as a slice of a wider buffer
    residual = randn(C, N, dtype=dtype, seed=2).t() if with_residual else None  # column-major (N, C)
    weight = randn(C, dtype=dtype, seed=3)
    with minillm.count_kernel_launches() as launched:
        y, h = add_rmsnorm(x, residual, weight, 1e-6)
    assert launched["add_rmsnorm"] == (1 if N else 0) and sum(launched.values()) == launched["add_rmsnorm"]
    y_ref, h_ref = add_rmsnorm_ref(x, residual, weight, 1e-6)
    assert y.shape == h.shape == (N, C) and y.dtype == h.dtype == dtype
    if residual is None:
        assert h is x  # nothing to add: the residual stream is x itself, as in the reference
    torch.testing.assert_close(h, h_ref, atol=0, rtol=0)  # the add rounds once, exactly as torch's does
    torch.testing.assert_close(y, y_ref, **TOL[dtype])


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N, H, Hkv, D", [(0, 2, 1, 6), (1, 9, 3, 64), (3, 4, 2, 6), (17, 2, 1, 128), (5, 3, 3, 2)])
def test_rope_qk_matches_ref(dtype, N, H, Hkv, D):
    # q a view of a fused qkv projection (N, (H + 2 Hkv) D), as a model hands it over; k with a strided head dim.
    qkv = randn(N, (H + 2 * Hkv) * D, dtype=dtype, seed=N + D)
    q, k = qkv[:, : H * D].view(N, H, D), randn(N, D, Hkv, dtype=dtype, seed=4).transpose(1, 2)
    cos = randn(D, N, dtype=dtype, seed=1).t()  # column-major (N, D); halves differ: each must be used where it is
    sin = strided(randn(N, D, dtype=dtype, seed=2), seed=3)
    with minillm.count_kernel_launches() as launched:
        q_rot, k_rot = rope_qk(q, k, cos, sin)
    assert launched["rope_qk"] == (1 if N else 0) and sum(launched.values()) == launched["rope_qk"]  # q and k at once
    q_ref, k_ref = rope_qk_ref(q, k, cos, sin)
    assert q_rot.shape == (N, H, D) and k_rot.shape == (N, Hkv, D) and q_rot.dtype == k_rot.dtype == dtype
    torch.testing.assert_close(q_rot, q_ref, **TOL[dtype])
    torch.testing.assert_close(k_rot, k_ref, **TOL[dtype])


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N, I", [(0, 37), (3, 1), (1, 37), (3, 100), (17, 64), (2, 2500)])  # 2500: three column tiles
def test_silu_mul_matches_ref(dtype, N, I):
    gate = randn(N, 2 * I, dtype=dtype, seed=N + I)[:, :I]  # the gate half of a fused gate_up projection
    up = randn(I, N, dtype=dtype, seed=1).t()  # column-major
    with minillm.count_kernel_launches() as launched:
        out = silu_mul(gate, up)
    assert launched["silu_mul"] == (1 if N else 0) and sum(launched.values()) == launched["silu_mul"]
    assert out.shape == (N, I) and out.dtype == dtype
    torch.testing.assert_close(out, silu_mul_ref(gate, up), **TOL[dtype])


@needs_kernels
def test_rope_qk_with_the_models_tables_matches_apply_rope():
    """End to end with rope_cos_sin's real tables (positions of a decode batch), fp16: the path the engine takes."""
    N, H, Hkv, D = 4, 9, 3, 64
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    cos, sin = rope_cos_sin(torch.tensor([[3, 70, 1000, 4095]]), inv_freq, torch.float16)  # (1, N, D)
    q, k = randn(N, H, D, dtype=torch.float16, seed=0), randn(N, Hkv, D, dtype=torch.float16, seed=1)
    q_rot, k_rot = rope_qk(q, k, cos[0].to(DEVICE), sin[0].to(DEVICE))
    cos, sin = cos.to(DEVICE), sin.to(DEVICE)
    torch.testing.assert_close(q_rot, apply_rope(q.transpose(0, 1)[None], cos, sin)[0].transpose(0, 1), **TOL[q.dtype])
    torch.testing.assert_close(k_rot, apply_rope(k.transpose(0, 1)[None], cos, sin)[0].transpose(0, 1), **TOL[q.dtype])


# ------------------------------------------------------------------------------------------------------------------
# Bad inputs: refused before anything launches, naming the argument.

F16, F32 = torch.float16, torch.float32


def t(*shape: int, dtype: torch.dtype = F16, device: str = DEVICE) -> torch.Tensor:
    return torch.zeros(*shape, dtype=dtype, device=device)


BAD_INPUTS = {
    "x 3-D": (add_rmsnorm, lambda: (t(2, 3, 8), None, t(8), 1e-6), "x must be \\(N, C\\)"),
    "x int": (add_rmsnorm, lambda: (t(2, 8, dtype=torch.int32), None, t(8), 1e-6), "x dtype torch.int32"),
    "x float64": (add_rmsnorm, lambda: (t(2, 8, dtype=torch.float64), None, t(8), 1e-6), "x dtype torch.float64"),
    "x too wide": (add_rmsnorm, lambda: (t(1, 65537), None, t(65537), 1e-6), "x's C = 65537"),
    "residual shape": (add_rmsnorm, lambda: (t(2, 8), t(3, 8), t(8), 1e-6), "residual must be \\(N, C\\)"),
    "residual dtype": (add_rmsnorm, lambda: (t(2, 8), t(2, 8, dtype=F32), t(8), 1e-6), "residual must have x's dtype"),
    "residual device": (add_rmsnorm, lambda: (t(2, 8), t(2, 8, device="meta"), t(8), 1e-6), "residual must be on"),
    "weight shape": (add_rmsnorm, lambda: (t(2, 8), None, t(9), 1e-6), "weight must be \\(C,\\) = \\(8,\\)"),
    "weight fp32": (add_rmsnorm, lambda: (t(2, 8), None, t(8, dtype=F32), 1e-6), "weight must have x's dtype"),
    "eps": (add_rmsnorm, lambda: (t(2, 8), None, t(8), -1.0), "eps must be"),
    "q 2-D": (rope_qk, lambda: (t(2, 8), t(2, 1, 8), t(2, 8), t(2, 8)), "q must be \\(N, H, D\\)"),
    "q float64": (rope_qk, lambda: (t(2, 1, 8, dtype=torch.float64),) * 2 + (t(2, 8),) * 2, "q dtype"),
    "D odd": (rope_qk, lambda: (t(2, 1, 7), t(2, 1, 7), t(2, 7), t(2, 7)), "D = 7 must be even"),
    "k tokens": (rope_qk, lambda: (t(2, 4, 8), t(3, 1, 8), t(2, 8), t(2, 8)), "k must be \\(N, Hkv, D\\)"),
    "k head dim": (rope_qk, lambda: (t(2, 4, 8), t(2, 1, 6), t(2, 8), t(2, 8)), "k must be \\(N, Hkv, D\\)"),
    "no heads": (rope_qk, lambda: (t(2, 0, 8), t(2, 1, 8), t(2, 8), t(2, 8)), "at least one head"),
    "k dtype": (rope_qk, lambda: (t(2, 4, 8), t(2, 1, 8, dtype=F32), t(2, 8), t(2, 8)), "k must have q's dtype"),
    "cos shape": (rope_qk, lambda: (t(2, 4, 8), t(2, 1, 8), t(2, 4), t(2, 8)), "cos must be \\(N, D\\)"),
    "sin dtype": (rope_qk, lambda: (t(2, 4, 8), t(2, 1, 8), t(2, 8), t(2, 8, dtype=F32)), "sin must have q's dtype"),
    "gate 1-D": (silu_mul, lambda: (t(8), t(8)), "gate must be \\(N, I\\)"),
    "gate int": (silu_mul, lambda: (t(2, 8, dtype=torch.int64), t(2, 8, dtype=torch.int64)), "gate dtype"),
    "up shape": (silu_mul, lambda: (t(2, 8), t(2, 9)), "up must be \\(N, I\\)"),
    "up dtype": (silu_mul, lambda: (t(2, 8), t(2, 8, dtype=torch.bfloat16)), "up must have gate's dtype"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_inputs_are_refused(case):
    fn, args, match = BAD_INPUTS[case]
    with minillm.count_kernel_launches() as launched, pytest.raises(ValueError, match=match):
        fn(*args())
    assert not launched
