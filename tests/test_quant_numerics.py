"""Quantization numerics: round trips, granularity, packing, metrics, GGUF block formats as instances."""

import numpy as np
import pytest
import torch

from minillm.quant import kv
from minillm.quant.numerics import (
    dequantize, fake_quantize, max_abs_error, mse, pack_int4, quantize_asymmetric, quantize_symmetric, sqnr_db,
    unpack_int4,
)


def weight(seed=0, shape=(24, 96)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g)


@pytest.mark.parametrize("granularity,group_size", [("tensor", None), ("channel", None), ("group", 32)])
@pytest.mark.parametrize("bits", [8, 4])
def test_symmetric_round_trip_error_is_at_most_half_a_step(bits, granularity, group_size):
    w = weight()
    qt = quantize_symmetric(w, bits, granularity, group_size)
    qmax = 2 ** (bits - 1) - 1
    assert qt.q.dtype == torch.int8 and int(qt.q.abs().max()) <= qmax and qt.zero is None
    err = (dequantize(qt) - w).abs()
    step = dequantize(type(qt)(torch.ones_like(qt.q), qt.scale, None, bits, granularity, group_size))
    assert torch.all(err <= step / 2 + 1e-6)


@pytest.mark.parametrize("granularity,group_size", [("tensor", None), ("channel", None), ("group", 32)])
def test_asymmetric_round_trip_and_zero_is_exact(granularity, group_size):
    w = weight(1) + 0.7  # off-centre values: where a zero-point pays off
    w[0, 0] = 0.0
    qt = quantize_asymmetric(w, 4, granularity, group_size)
    assert qt.q.dtype == torch.uint8 and int(qt.q.max()) <= 15
    w_hat = dequantize(qt)
    assert w_hat[0, 0].item() == 0.0
    assert max_abs_error(w, w_hat) <= qt.scale.max().item() / 2 + 1e-6


def test_asymmetric_beats_symmetric_on_skewed_values():
    w = weight(2).abs()  # all positive: symmetric wastes the negative half of its grid
    sym = fake_quantize(w, 4, "group", 32, symmetric=True)
    asym = fake_quantize(w, 4, "group", 32, symmetric=False)
    assert mse(w, asym) < 0.5 * mse(w, sym)


def test_finer_granularity_contains_an_outlier():
    w = weight(3)
    w[5, 7] = 40.0  # one outlier spoils the scale of whatever shares it
    errors = [mse(w, fake_quantize(w, 4, g, 32)) for g in ("tensor", "channel", "group")]
    assert errors[0] > errors[1] > errors[2]


def test_sqnr_gains_about_six_db_per_bit():
    w = weight(4, (64, 256))
    s4, s8 = (sqnr_db(w, fake_quantize(w, b, "channel")) for b in (4, 8))
    assert 20 < (s8 - s4) < 28  # 4 extra bits ~ 24 dB
    assert sqnr_db(w, w) == float("inf")


def test_pack_unpack_int4_round_trip_and_layout():
    q = torch.randint(0, 16, (5, 10), dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.shape == (5, 5) and packed.dtype == torch.uint8
    assert torch.equal(packed[:, 0], q[:, 0] | (q[:, 1] << 4))  # low nibble first
    assert torch.equal(unpack_int4(packed), q)


def test_bad_inputs_raise_clear_errors():
    w = weight()
    with pytest.raises(ValueError, match="group_size=40"):
        quantize_symmetric(w, 8, "group", 40)
    with pytest.raises(ValueError, match="granularity"):
        quantize_symmetric(w, 8, "row")
    with pytest.raises(ValueError, match="bits"):
        quantize_asymmetric(w, 9)
    with pytest.raises(ValueError, match="2-D"):
        quantize_symmetric(w[0])
    with pytest.raises(ValueError, match="even"):
        pack_int4(torch.zeros(3, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_int4(torch.full((2, 2), 16))


def test_gguf_q8_0_is_symmetric_int8_in_groups_of_32():
    gguf_quants = pytest.importorskip("gguf.quants")
    from gguf import GGMLQuantizationType

    w = weight(5, (8, 64))
    blocks = gguf_quants.quantize(w.numpy(), GGMLQuantizationType.Q8_0)
    ref = torch.from_numpy(np.asarray(gguf_quants.dequantize(blocks, GGMLQuantizationType.Q8_0), dtype=np.float32))
    ours = fake_quantize(w, 8, "group", 32)
    # Q8_0 stores d in fp16; ours keeps fp32 scales, so the two differ by the rounding of d only.
    assert torch.allclose(ours, ref.reshape(w.shape), atol=2e-3, rtol=1e-3)


def test_gguf_q4_1_matches_min_plus_scale_form():
    gguf_quants = pytest.importorskip("gguf.quants")
    from gguf import GGMLQuantizationType

    w = weight(6, (4, 64))
    blocks = gguf_quants.quantize(w.numpy(), GGMLQuantizationType.Q4_1)
    ref = torch.from_numpy(np.asarray(gguf_quants.dequantize(blocks, GGMLQuantizationType.Q4_1), dtype=np.float32))
    ours = fake_quantize(w, 4, "group", 32, symmetric=False)
    # Same family (4 bits, 32-wide blocks, offset): comparable error, not bit-identical (float min vs integer zero).
    assert 0.5 < mse(w, ours) / mse(w, ref.reshape(w.shape)) < 2.0


def test_int8_kv_per_token_per_head():
    g = torch.Generator().manual_seed(7)
    k = torch.randn(2, 3, 5, 16, generator=g) * torch.linspace(0.1, 10, 5)[:, None]  # (B, Hkv, T, D), varied norms
    k[0, 0, 0] = 0.0
    codes, scale = kv.quantize_kv(k)
    assert codes.dtype == torch.int8 and scale.shape == (2, 3, 5, 1) and scale.dtype == torch.float16
    k_hat = kv.dequantize_kv(codes, scale)
    assert torch.equal(k_hat[0, 0, 0], torch.zeros(16))
    # Error relative to each vector's own size is tiny whatever the size: that is what a per-vector scale buys.
    rel = (k_hat - k).norm(dim=-1) / k.norm(dim=-1).clamp(min=1e-6)
    assert rel.max() < 0.01
    assert kv.dequantize_kv(codes, scale, torch.bfloat16).dtype == torch.bfloat16
    from minillm.config import ModelConfig
    from minillm.kvcache.memory import kv_bytes_per_token

    smollm_like = ModelConfig.tiny(num_layers=30, num_heads=9, num_kv_heads=3, hidden_size=576)  # D = 64
    assert kv_bytes_per_token(smollm_like, int8=True) == 2 * 30 * 3 * 66  # 64 codes + one fp16 scale per vector
    assert kv_bytes_per_token(smollm_like, torch.float16) == 2 * 30 * 3 * 128
    with pytest.raises(TypeError, match="float"):
        kv.quantize_kv(codes)
