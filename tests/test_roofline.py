"""Roofline helpers: datasheet lookup, bytes-per-token accounting, the decode bound and its limits, measured speeds
in hardware units, best-of-rounds, the figures, and the benchmark's files.

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


def test_decode_roofline_limits_bound_every_batch_size():
    config = ModelConfig.tiny()
    kw = dict(config=config, dtype=torch.float32, bandwidth=1e11, context_len=64, peak_flops=1e12)
    roofs = [roofline.decode_roofline(batch_size=b, **kw) for b in (1, 2, 8, 64, 512, 4096, 1 << 20)]
    tokens = [r["tokens_per_s"] for r in roofs]
    assert all(a <= b for a, b in zip(tokens, tokens[1:]))  # batching never lowers the bound
    assert all(a < b for a, b, r in zip(tokens, tokens[1:], roofs[1:]) if r["bound"] == "memory")
    intensities = [r["intensity"] for r in roofs]
    assert all(a < b for a, b in zip(intensities, intensities[1:]))
    limit, top = roofs[0]["limit_tokens_per_s"], roofs[0]["max_intensity"]
    assert all(t <= limit * (1 + 1e-9) for t in tokens) and tokens[-1] == pytest.approx(limit, rel=1e-3)
    assert all(i < top for i in intensities) and intensities[-1] == pytest.approx(top, rel=1e-3)
    assert top == pytest.approx(roofs[0]["flops_per_token"] / roofs[0]["kv_bytes"])
    # Here the KV cache limits before the compute roof does: bandwidth / kv_bytes < peak / flops_per_token.
    assert limit == pytest.approx(min(1e11 / roofs[0]["kv_bytes"], 1e12 / roofs[0]["flops_per_token"]))


def test_decode_roofline_limits_without_context_or_peak():
    config = ModelConfig.tiny()
    no_context = roofline.decode_roofline(config, torch.bfloat16, 1e12, context_len=0, peak_flops=1e13)
    assert no_context["max_intensity"] == float("inf")
    assert no_context["limit_tokens_per_s"] == pytest.approx(1e13 / no_context["flops_per_token"])
    no_peak = roofline.decode_roofline(config, torch.bfloat16, 1e12, context_len=0)
    assert no_peak["limit_tokens_per_s"] == float("inf")


def test_decode_achieved_inverts_the_memory_bound():
    config = ModelConfig.tiny()
    for batch_size in (1, 8):
        roof = roofline.decode_roofline(config, torch.bfloat16, bandwidth=1e12, batch_size=batch_size)
        got = roofline.decode_achieved(config, torch.bfloat16, roof["tokens_per_s"], batch_size)
        # A step at exactly the memory bound reads the weights at exactly the bandwidth.
        assert got["bandwidth"] == pytest.approx(1e12)
        assert got["intensity"] == pytest.approx(roof["intensity"])
        assert got["flops"] == pytest.approx(got["bandwidth"] * got["intensity"])
    with pytest.raises(ValueError, match="tokens_per_s"):
        roofline.decode_achieved(config, torch.bfloat16, 0.0)


def test_best_of_rounds_interleaves_and_keeps_the_best():
    calls = []
    rates = {"a": iter([3.0, 5.0, 4.0]), "b": iter([2.0, 1.0, 7.0])}

    def measure(name):
        calls.append(name)
        return next(rates[name])

    best = roofline.best_of_rounds({"a": lambda: measure("a"), "b": lambda: measure("b")}, rounds=3)
    assert best == {"a": 5.0, "b": 7.0}
    assert calls == ["a", "b"] * 3
    with pytest.raises(ValueError, match="rounds"):
        roofline.best_of_rounds({"a": lambda: 1.0}, rounds=0)


def test_measurements_return_positive_rates():
    assert roofline.measure_matmul_flops("cpu", torch.float32, 32, warmup=0, iters=1) > 0
    assert roofline.measure_copy_bandwidth("cpu", 1 << 16) > 0
    assert roofline.measure_read_bandwidth("cpu", 1 << 16, warmup=0, iters=2) > 0
    with pytest.raises(ValueError, match="size"):
        roofline.measure_matmul_flops("cpu", torch.float32, 0)
    with pytest.raises(ValueError, match="nbytes"):
        roofline.measure_read_bandwidth("cpu", 100)


def test_measure_decode_runs_a_one_token_step_per_sequence():
    model = Transformer(ModelConfig.tiny()).eval()
    shapes = []
    model.register_forward_hook(lambda module, args, out: shapes.append((tuple(args[0].shape), tuple(out.shape))))
    assert roofline.measure_decode_tokens_per_s(model, batch_size=3, warmup=0, iters=2) > 0
    V = model.config.vocab_size
    assert shapes == [((3, 1), (3, 1, V))] * 2
    with pytest.raises(ValueError, match="batch_size"):
        roofline.measure_decode_tokens_per_s(model, batch_size=0)


def test_decode_figure_and_points():
    import matplotlib

    matplotlib.use("Agg")
    from minillm.viz import roofline as viz

    config = ModelConfig.tiny()
    points = viz.decode_points(config, torch.float32, 1e10, 1e10, [1, 8, 64], context_len=16)
    assert [p["batch_size"] for p in points] == [1, 8, 64]
    assert all(p["flops"] <= 1e10 * (1 + 1e-9) for p in points)  # on or under the compute roof
    assert points[0]["bound"] == "memory" and f"({points[0]['bound']} bound)" in points[0]["label"]
    measured = [dict(label="measured", intensity=0.5, flops=1e9)]
    fig = viz.draw_decode_roofline(config, torch.float32, 1e10, 1e10, [1, 8, 64], 16, measured, "t")
    assert len(fig.axes) == 2
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_main_writes_json_and_png(tmp_path, monkeypatch):
    import minillm.loading

    tiny = Transformer(ModelConfig.tiny())
    monkeypatch.setattr(minillm.loading, "load_model", lambda *a, **k: (tiny, None))
    roofline.main(["--out", str(tmp_path), "--device", "cpu", "--size", "32", "--nbytes", "65536", "--rounds", "1"])
    record = json.loads((tmp_path / "roofline-cpu.json").read_text())
    assert record["topic"] == "roofline" and record["results"]["model"] == "tiny"
    assert set(record["results"]["decode"]) == {"batch1", "batch8", "batch64", "batch256"}
    results = record["results"]
    assert results["measured_bandwidth"] == max(results["measured_copy_bandwidth"], results["measured_read_bandwidth"])
    assert results["decode_step_batch1"]["tokens_per_s"] > 0
    assert (tmp_path / "roofline-cpu.png").stat().st_size > 0
