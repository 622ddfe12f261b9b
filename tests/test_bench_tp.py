"""minillm.bench.tp: which world sizes run where, and one quick run at world sizes 1 and 2 on the CPU (two processes,
gloo; about 30 s on 2 cores) whose JSON carries the counts the benchmark promises. No timing is checked."""

import json

import pytest
import torch

from minillm.bench import tp
from minillm.bench.headlines import tp_headline


def test_world_sizes_per_device(monkeypatch):
    assert tp.plan_world_sizes(None, torch.device("cpu")) == ([1, 2, 3], None)
    assert tp.plan_world_sizes("1,2", torch.device("cpu")) == ([1, 2], None)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    sizes, skipped = tp.plan_world_sizes(None, torch.device("cuda"))
    assert sizes == [] and "needs >= 2" in skipped
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert tp.plan_world_sizes(None, torch.device("cuda")) == ([1, 2, 4], None)  # 8 is more than the GPUs


def test_shard_weight_bytes_add_up_to_the_model():
    from minillm.config import ModelConfig

    config = ModelConfig.tiny()  # V=256, C=64, 2 layers: vocabulary and MLP split evenly over 2 ranks
    dense, *_ = tp.shard_weight_bytes(config, 1, torch.float32)
    shards = tp.shard_weight_bytes(config, 2, torch.float32)
    norms = (2 * config.num_layers + 1) * config.hidden_size * 4  # RMSNorm weights: every rank holds them all
    assert sum(shards) == dense + norms


@pytest.mark.slow
def test_quick_run_at_world_sizes_1_and_2(tmp_path):
    tp.main(["--quick", "--world-sizes", "1,2", "--device", "cpu", "--out", str(tmp_path)])
    record = json.loads((tmp_path / "tp-cpu.json").read_text())
    assert (tmp_path / "tp-cpu.png").exists()
    results = record["results"]
    assert "skipped" in results["gpu"]
    one, two = results["cpu"]["rows"]
    assert one["world_size"] == 1 and one["all_reduces_per_step"] == 0 and one["comm_bytes_per_token"] == 0
    assert two["same_tokens_as_world_size_1"] and two["steps_agree_with_stats"]
    assert two["all_reduces_per_step"] == 2 * 30 + 1 and two["all_gathers_per_step"] == 1
    assert two["allreduce_bytes_per_token"] == two["allreduce_bytes_per_token_predicted"] == 61 * 576 * 4  # fp32
    assert two["allgather_bytes_per_token"] == 49152 // 2 * 4  # this rank's vocabulary slice of one logits row
    assert two["rank0_weight_bytes_measured"] == two["weight_bytes_by_rank"][0]
    assert sum(two["weight_bytes_by_rank"]) == one["weight_bytes_per_rank"] + 61 * 576 * 4  # norms on both ranks
    assert 0 < two["collective_s_per_step"] < two["step_s"]
    headline = tp_headline(results)
    assert headline["cpu W=2 / W=1 decode tokens/s"] == pytest.approx(two["speedup"])
    assert headline["cpu: same tokens as W=1"] is True
