"""Roofline helpers: datasheet lookup, bytes-per-token accounting, the decode bound, and the benchmark's files.

Nothing here is timed: the measuring functions only have to return a positive rate at tiny sizes.
"""

import json

import pytest
import torch

from minillm.bench import roofline
from minillm.config import ModelConfig
from minillm.model import Transformer


@pytest.mark.parametrize(
    "name, expected",
    [
        ("NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM"),
        ("NVIDIA H100 PCIe", "NVIDIA H100 PCIe"),
        ("NVIDIA H200", "NVIDIA H200 SXM"),
        ("NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB"),
        ("NVIDIA A100-SXM4-40GB", "NVIDIA A100 40GB"),
        ("Tesla T4", "NVIDIA T4"),
        ("NVIDIA L4", "NVIDIA L4"),
        ("NVIDIA L40S", "NVIDIA L40S"),
        ("NVIDIA A10G", "NVIDIA A10G"),
    ],
)
def test_peak_specs_known_gpus(name, expected):
    spec = roofline.peak_specs(name)
    assert spec["name"] == expected and spec["flops"] > 1e13 and spec["bandwidth"] > 1e11 and spec["source"]


def test_peak_specs_unknown_is_none():
    assert roofline.peak_specs("cpu (2 threads)") is None
    assert roofline.peak_specs("NVIDIA GeForce GTX 1080") is None


@pytest.mark.parametrize("tied", [True, False])
def test_decode_bytes_count_every_weight_once(tied):
    config = ModelConfig.tiny(tie_word_embeddings=tied)
    table = roofline.decode_bytes_table(config, torch.bfloat16, context_len=0)
    params = sum(r["params"] for r in table)
    # Every parameter of the model, except that the embedding table contributes one row, not V rows.
    V, C = config.vocab_size, config.hidden_size
    model_params = sum(p.numel() for p in Transformer(config).parameters())  # tied weights counted once
    assert params == model_params + C - (0 if tied else V * C)
    assert all(r["bytes"] == 2 * r["params"] for r in table)


def test_decode_bytes_kv_cache_grows_with_context():
    config = ModelConfig.tiny()
    kv = roofline.decode_bytes_table(config, torch.float32, context_len=10)[-1]
    L, Hkv, D = config.num_layers, config.num_kv_heads, config.head_dim
    assert kv["params"] == L * 2 * Hkv * D * 10 and kv["bytes"] == 4 * kv["params"]


def test_decode_roofline_bounds():
    config = ModelConfig.tiny()
    roof = roofline.decode_roofline(config, torch.bfloat16, bandwidth=1e12)
    assert roof["tokens_per_s"] == pytest.approx(1e12 / roof["bytes_per_token"])
    assert roof["bound"] == "memory" and roof["intensity"] < 1.01  # 2 FLOPs per 2-byte weight, fewer for the row
    batched = roofline.decode_roofline(config, torch.bfloat16, bandwidth=1e12, context_len=8, batch_size=16)
    assert batched["intensity"] > 8 * roof["intensity"]  # the batch shares one read of the weights
    capped = roofline.decode_roofline(config, torch.bfloat16, 1e12, batch_size=64, peak_flops=1e9)
    assert capped["bound"] == "compute"
    assert capped["tokens_per_s"] == pytest.approx(1e9 / capped["flops_per_token"])
    with pytest.raises(ValueError, match="bandwidth"):
        roofline.decode_roofline(config, torch.bfloat16, bandwidth=0)
    with pytest.raises(ValueError, match="context_len"):
        roofline.decode_bytes_table(config, torch.bfloat16, context_len=-1)


def test_measurements_return_positive_rates():
    assert roofline.measure_matmul_flops("cpu", torch.float32, 32) > 0
    assert roofline.measure_copy_bandwidth("cpu", 1 << 16) > 0
    with pytest.raises(ValueError, match="size"):
        roofline.measure_matmul_flops("cpu", torch.float32, 0)


def test_main_writes_json_and_png(tmp_path, monkeypatch):
    import minillm.loading

    tiny = Transformer(ModelConfig.tiny())
    monkeypatch.setattr(minillm.loading, "load_model", lambda *a, **k: (tiny, None))
    roofline.main(["--out", str(tmp_path), "--device", "cpu", "--size", "32", "--nbytes", "65536"])
    record = json.loads((tmp_path / "roofline-cpu.json").read_text())
    assert record["topic"] == "roofline" and record["results"]["model"] == "tiny"
    assert set(record["results"]["decode"]) == {"batch1", "batch8", "batch64"}
    assert (tmp_path / "roofline-cpu.png").stat().st_size > 0
