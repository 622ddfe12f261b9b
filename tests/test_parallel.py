"""Tensor-parallel pieces in one process: head assignment, parallel layers against their dense twins, shards."""

import random

import pytest
import torch
import torch.nn.functional as F

from minillm.config import ModelConfig
from minillm.model import Transformer
from minillm.parallel.comm import allreduce_bytes_per_token, ring_wire_bytes, weight_bytes_per_rank
from minillm.parallel.executor import _interrupts_after_step, check_backend
from minillm.parallel.heads import assign_heads, check_head_split, replication, split_evenly
from minillm.parallel.layers import ColumnParallelLinear, ParallelLMHead, RowParallelLinear, VocabParallelEmbedding
from minillm.parallel.shard import build_shard, local_config, model_reader, plan_shards


def test_split_evenly():
    assert split_evenly(9, 2) == [5, 4] and split_evenly(3, 3) == [1, 1, 1] and split_evenly(2, 4) == [1, 1, 0, 0]
    with pytest.raises(ValueError):
        split_evenly(3, 0)


@pytest.mark.parametrize("seed", range(40))
def test_head_assignment_properties(seed):
    rng = random.Random(seed)
    kv = rng.randint(1, 8)
    heads = kv * rng.randint(1, 6)
    world = rng.randint(1, heads)
    shards = assign_heads(heads, kv, world)
    group = heads // kv
    assert [s.rank for s in shards] == list(range(world))
    assert sorted(h for s in shards for h in s.q_heads) == list(range(heads))  # each query head exactly once
    for s in shards:
        assert s.q_heads and list(s.q_heads) == list(range(s.q_heads[0], s.q_heads[-1] + 1))  # contiguous
        assert set(s.kv_heads) == {h // group for h in s.q_heads}  # exactly the KV heads its queries use
        per_kv = [sum(h // group == k for h in s.q_heads) for k in s.kv_heads]
        assert len(set(per_kv)) == 1  # uniform local GQA: the kernels map local head h to h // (Hl / Hkvl)
    if world <= kv:
        assert replication(shards, kv) == 0
    else:
        assert all(len(s.kv_heads) == 1 for s in shards) and replication(shards, kv) == world - kv


def test_smollm2_world_sizes():
    two = assign_heads(9, 3, 2)
    assert [s.q_heads for s in two] == [(0, 1, 2, 3, 4, 5), (6, 7, 8)] and replication(two, 3) == 0
    assert [s.kv_heads for s in assign_heads(9, 3, 3)] == [(0,), (1,), (2,)]
    four = assign_heads(9, 3, 4)
    assert [s.kv_heads for s in four] == [(0,), (0,), (1,), (2,)] and replication(four, 3) == 1
    with pytest.raises(ValueError, match="larger than the model's 9 query heads"):
        check_head_split(9, 3, 10)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="positive int"):
            check_head_split(9, 3, bad)


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_linear_shards_recombine_to_dense(world):
    torch.manual_seed(world)
    out_f, in_f = 37, 23
    dense = torch.nn.Linear(in_f, out_f, bias=True)
    x = torch.randn(3, 5, in_f)
    ref = dense(x)
    # Column-parallel: each rank's slice of the outputs, side by side.
    cols, start = [], 0
    for n in split_evenly(out_f, world):
        shard = ColumnParallelLinear(in_f, n, True, start)
        shard.weight.data, shard.bias.data = dense.weight[start : start + n], dense.bias[start : start + n]
        cols.append(shard(x))
        start += n
    torch.testing.assert_close(torch.cat(cols, dim=-1), ref)
    # Row-parallel without a group: each rank's partial sum; the bias rides on one of them here, after the sum.
    partial, start = [], 0
    for n in split_evenly(in_f, world):
        shard = RowParallelLinear(n, out_f, False, start)
        shard.weight.data = dense.weight[:, start : start + n]
        partial.append(shard(x[..., start : start + n]))
        start += n
    torch.testing.assert_close(sum(partial) + dense.bias, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_vocab_parallel_embedding_and_head(world):
    torch.manual_seed(world)
    V, C = 29, 8
    table = torch.randn(V, C)
    ids = torch.randint(0, V, (2, 7))
    x = torch.randn(2, 7, C)
    rows = -(-V // world)
    embedded, logits = 0, []
    for r in range(world):
        piece = table[r * rows : (r + 1) * rows]
        emb = VocabParallelEmbedding(rows, C, r * rows, V)
        emb.weight.data = torch.cat([piece, piece.new_zeros(rows - piece.shape[0], C)])
        embedded = embedded + emb(ids)  # what the all-reduce adds up
        logits.append(ParallelLMHead(emb.weight, V)(x))  # each (.., rows): what the all-gather puts side by side
    torch.testing.assert_close(embedded, F.embedding(ids, table))
    torch.testing.assert_close(torch.cat(logits, dim=-1)[..., :V], x @ table.T)


def test_one_shard_is_the_dense_model():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.tiny()).eval()
    shard = build_shard(model.config, model_reader(model), plan_shards(model.config, 1)[0])
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    torch.testing.assert_close(shard(ids), model(ids))
    assert weight_bytes_per_rank(shard) == weight_bytes_per_rank(model)


def test_shard_configs_and_sizes():
    torch.manual_seed(0)
    config = ModelConfig.tiny()
    model = Transformer(config).eval()
    shards = plan_shards(config, 2)
    built = [build_shard(config, model_reader(model), s) for s in shards]
    for s, m in zip(shards, built):
        cfg = local_config(config, s)
        assert m.config.num_kv_heads == cfg.num_kv_heads == len(s.heads.kv_heads)
        assert m.layers[0].self_attn.q_proj.weight.shape == (len(s.heads.q_heads) * config.head_dim, config.hidden_size)
    assert sum(m.layers[0].mlp.down_proj.weight.shape[1] for m in built) == config.intermediate_size
    assert all(weight_bytes_per_rank(m) < weight_bytes_per_rank(model) for m in built)


def test_communication_volume():
    config = ModelConfig.tiny()
    assert allreduce_bytes_per_token(config, 4, 1) == 0
    assert allreduce_bytes_per_token(config, 2, 4) == (2 * config.num_layers + 1) * config.hidden_size * 2
    assert ring_wire_bytes(1000, 2) == 1000 and ring_wire_bytes(1000, 4) == 1500


def test_backend_checks():
    cpu = torch.device("cpu")
    assert check_backend(None, cpu, 2) == "gloo"
    with pytest.raises(ValueError, match="needs CUDA devices"):
        check_backend("nccl", cpu, 2)
    with pytest.raises(ValueError, match="unknown distributed_backend"):
        check_backend("mpi", cpu, 2)


def test_ctrl_c_waits_for_the_end_of_the_step():
    import os
    import signal

    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # CI may run us with SIGINT ignored
    try:
        finished = False
        with pytest.raises(KeyboardInterrupt):
            with _interrupts_after_step():
                os.kill(os.getpid(), signal.SIGINT)
                finished = True  # the step went on to its end
        assert finished and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a process that ignores Ctrl-C keeps ignoring it
        with _interrupts_after_step():
            os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)
