"""The KV memory calculator: bytes per token by formula and by allocation, reservations, and waste."""

import pytest
import torch

from minillm.config import ModelConfig
from minillm.kvcache.contiguous import ContiguousKVCache
from minillm.kvcache.memory import (
    KV_PRESETS,
    contiguous_reservation,
    contiguous_reservation_bytes,
    dtype_bytes,
    format_bytes,
    kv_bytes_per_token,
    paged_reservation,
    waste_fraction,
    weight_bytes,
)


def test_bytes_per_token_by_formula():
    smollm = KV_PRESETS["SmolLM2-135M"]
    assert kv_bytes_per_token(smollm, torch.float16) == 2 * 30 * 3 * 64 * 2 == 23040
    assert kv_bytes_per_token(smollm, "float32") == 46080
    assert kv_bytes_per_token(KV_PRESETS["Llama-3.1-8B"], torch.bfloat16) == 128 * 1024  # 128 KiB, as often quoted
    assert kv_bytes_per_token(KV_PRESETS["Llama-2-7B"], torch.float16) == 512 * 1024  # no GQA: 4x Llama 3's
    assert dtype_bytes("int8") == 1


def test_bytes_per_token_equal_the_cache_allocation():
    cfg = ModelConfig.tiny()
    cache = ContiguousKVCache.for_model(cfg, max_batch_size=3, max_len=10, dtype=torch.float16)
    assert cache.nbytes == contiguous_reservation_bytes(cfg, 3, 10, torch.float16) == 30 * kv_bytes_per_token(cfg)


def test_weight_bytes_match_the_real_parameter_count(tiny_model):
    assert weight_bytes(tiny_model.config, torch.float32) == sum(p.numel() for p in tiny_model.parameters()) * 4
    assert round(weight_bytes(KV_PRESETS["Llama-3.1-8B"], "bfloat16") / 2 / 1e9, 2) == 8.03


def test_reservation_waste():
    cfg = ModelConfig.tiny()
    r = contiguous_reservation([100, 300, 1000, 600], max_len=1000, config=cfg, dtype=torch.float16)
    assert (r.reserved_tokens, r.used_tokens) == (4000, 2000) and r.waste == pytest.approx(0.5)
    assert r.reserved_bytes == 4000 * kv_bytes_per_token(cfg)
    p = paged_reservation([100, 300, 1000, 600], block_size=16, config=cfg)
    assert p.reserved_tokens == 112 + 304 + 1008 + 608 and p.waste < 16 * 4 / 2000
    with pytest.raises(ValueError, match="does not fit max_len=500"):
        contiguous_reservation([600], max_len=500, config=cfg)
    with pytest.raises(ValueError, match="lengths must be"):
        paged_reservation([], block_size=16, config=cfg)


def test_waste_fraction_is_the_one_definition():
    assert waste_fraction(0, 0) == 0.0 and waste_fraction(8, 8) == 0.0 and waste_fraction(8, 2) == 0.75
    with pytest.raises(ValueError, match="used tokens must lie in"):
        waste_fraction(4, 5)


def test_bad_dtype_and_formatting():
    with pytest.raises(ValueError, match="unknown dtype name 'float17'"):
        dtype_bytes("float17")
    with pytest.raises(TypeError, match="dtype must be"):
        dtype_bytes(2)
    assert format_bytes(512) == "512 B" and format_bytes(1536) == "1.5 KiB" and format_bytes(3 * 2**30) == "3.0 GiB"
