"""Chapter 11's graded checks against right answers and plausible wrong ones (collected by tests/test_grading.py).

A wrong answer is a mistake a learner would plausibly make, written as a small function with a comment saying what
is wrong; every check must reject each of its wrong answers and pass each right answer on every random seed. The
last tests recompute the worked example above each exercise in the solution notebook with minillm's reference, and
test the simulated ranks of check 11.3 on their own.
"""

import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import minillm
from answers.worked_examples import check_worked_examples
from minillm import grading
from minillm.config import ModelConfig
from minillm.kvcache.memory import KV_PRESETS
from minillm.parallel.comm import allreduce_bytes_per_token
from minillm.parallel.heads import assign_heads, split_evenly
from minillm.parallel.layers import split_linear

RIGHT_ANSWERS = []
WRONG_ANSWERS = []


# ---------------------------------------------------------------------------------------------------------------------
# 11.1 a linear layer split column-wise and row-wise.
# ---------------------------------------------------------------------------------------------------------------------


def split_linear_right(weight, world_size, how):  # the solution notebook's answer
    if how not in ("column", "row"):
        raise ValueError(f"how must be 'column' or 'row', got {how!r}")
    dim = 0 if how == "column" else 1
    return list(torch.split(weight, split_evenly(weight.shape[dim], world_size), dim=dim))


def split_linear_loop(weight, world_size, how):
    # Right too: the sizes by hand, a narrow per rank.
    if how not in ("column", "row"):
        raise ValueError(f"how must be 'column' or 'row', got {how!r}")
    dim = 0 if how == "column" else 1
    n = weight.shape[dim]
    shards, start = [], 0
    for r in range(world_size):
        size = n // world_size + (1 if r < n % world_size else 0)
        shards.append(weight.narrow(dim, start, size))
        start += size
    return shards


def split_linear_transposed(weight, world_size, how):
    # Right too: slices x @ W's (in, out) matrix and transposes back.
    if how not in ("column", "row"):
        raise ValueError(f"how must be 'column' or 'row', got {how!r}")
    wt = weight.t()  # (in, out)
    dim = 1 if how == "column" else 0
    return [s.t().contiguous() for s in torch.split(wt, split_evenly(wt.shape[dim], world_size), dim=dim)]


def _split(weight, world_size, how, dims=None, sizes=None):
    """split_linear with one thing changed: the dimension cut for each `how`, or the shard sizes."""
    if how not in ("column", "row"):
        raise ValueError(f"how must be 'column' or 'row', got {how!r}")
    dim = (dims or {"column": 0, "row": 1})[how]
    counts = (sizes or split_evenly)(weight.shape[dim], world_size)
    return list(torch.split(weight.narrow(dim, 0, sum(counts)), counts, dim=dim))  # features past sum(counts): lost


def split_linear_swapped(weight, world_size, how):
    # Wrong: thinks of W as (in, out), as in x @ W: "column" cuts the columns of W, "row" its rows.
    return _split(weight, world_size, how, dims={"column": 1, "row": 0})


def split_linear_row_slices_output(weight, world_size, how):
    # Wrong: "row" cuts the rows of W too, a slice of the output features, like "column".
    return _split(weight, world_size, how, dims={"column": 0, "row": 0})


def split_linear_drops_remainder(weight, world_size, how):
    # Wrong: n // W features per rank; the last n % W features go nowhere.
    return _split(weight, world_size, how, sizes=lambda n, W: [n // W] * W)


def split_linear_remainder_last(weight, world_size, how):
    # Wrong: n // W per rank and the remainder on the last rank (sizes differ by up to W - 1).
    return _split(weight, world_size, how, sizes=lambda n, W: [n // W] * (W - 1) + [n - (W - 1) * (n // W)])


def split_linear_chunk(weight, world_size, how):
    # Wrong: torch.chunk sizes ceil(n / W), so 7 over 3 ranks is 3, 3, 1 (and fewer shards when n is small).
    if how not in ("column", "row"):
        raise ValueError(f"how must be 'column' or 'row', got {how!r}")
    return list(torch.chunk(weight, world_size, dim=0 if how == "column" else 1))


def split_linear_no_error(weight, world_size, how):
    # Wrong: any `how` but "column" is taken for "row".
    return split_linear(weight, world_size, "column" if how == "column" else "row")


def split_linear_in_place(weight, world_size, how):
    # Wrong: transposes the caller's weight in place (t_) to slice x @ W's (in, out) layout; the shards are right,
    # but the dense layer is left transposed for everyone else.
    if how not in ("column", "row"):
        raise ValueError(f"how must be 'column' or 'row', got {how!r}")
    wt = weight.t_()  # (in, out), and so is the caller's tensor now
    dim = 1 if how == "column" else 0
    return [s.t() for s in torch.split(wt, split_evenly(wt.shape[dim], world_size), dim=dim)]


RIGHT_ANSWERS += [
    pytest.param(grading.check_split_linear, split_linear_right, id="11.1-notebook"),
    pytest.param(grading.check_split_linear, split_linear, id="11.1-reference"),
    pytest.param(grading.check_split_linear, split_linear_loop, id="11.1-loop"),
    pytest.param(grading.check_split_linear, split_linear_transposed, id="11.1-transposed"),
]
WRONG_ANSWERS += [
    pytest.param(grading.check_split_linear, split_linear_swapped, id="11.1-dims-swapped"),
    pytest.param(grading.check_split_linear, split_linear_row_slices_output, id="11.1-row-slices-output"),
    pytest.param(grading.check_split_linear, split_linear_drops_remainder, id="11.1-drops-remainder"),
    pytest.param(grading.check_split_linear, split_linear_remainder_last, id="11.1-remainder-on-last-rank"),
    pytest.param(grading.check_split_linear, split_linear_chunk, id="11.1-torch-chunk"),
    pytest.param(grading.check_split_linear, split_linear_no_error, id="11.1-no-error-for-bad-how"),
    pytest.param(grading.check_split_linear, split_linear_in_place, id="11.1-changes-the-weight"),
]


# ---------------------------------------------------------------------------------------------------------------------
# 11.2 query and KV heads per rank, with replication.
# ---------------------------------------------------------------------------------------------------------------------


def assign_heads_right(num_heads, num_kv_heads, world_size):  # the solution notebook's answer
    if world_size > num_heads:
        raise ValueError(f"world_size {world_size} > num_heads {num_heads}: some rank would hold no query head")
    group = num_heads // num_kv_heads
    out = []
    if world_size <= num_kv_heads:  # whole groups per rank
        start = 0
        for count in split_evenly(num_kv_heads, world_size):
            kv = tuple(range(start, start + count))
            out.append((tuple(range(start * group, (start + count) * group)), kv))
            start += count
        return out
    for kv, num_ranks in enumerate(split_evenly(world_size, num_kv_heads)):  # replicated: ranks per group
        start = kv * group
        for count in split_evenly(group, num_ranks):
            out.append((tuple(range(start, start + count)), (kv,)))
            start += count
    return out


def assign_heads_reference(num_heads, num_kv_heads, world_size):
    return [(s.q_heads, s.kv_heads) for s in assign_heads(num_heads, num_kv_heads, world_size)]


def assign_heads_lists(num_heads, num_kv_heads, world_size):
    # Right too: lists instead of tuples.
    return [[list(q), list(kv)] for q, kv in assign_heads_right(num_heads, num_kv_heads, world_size)]


def _checked(num_heads, world_size):
    if world_size > num_heads:
        raise ValueError(f"world_size {world_size} > num_heads {num_heads}")


def assign_heads_round_robin(num_heads, num_kv_heads, world_size):
    # Wrong: query heads and KV heads dealt round-robin, no replication: a rank's query heads lose their KV heads.
    _checked(num_heads, world_size)
    return [(tuple(range(r, num_heads, world_size)), tuple(range(r, num_kv_heads, world_size)))
            for r in range(world_size)]


def assign_heads_contiguous_queries(num_heads, num_kv_heads, world_size):
    # Wrong: split the query heads evenly and take the KV heads they use: a rank can mix parts of two groups.
    _checked(num_heads, world_size)
    group, out, start = num_heads // num_kv_heads, [], 0
    for count in split_evenly(num_heads, world_size):
        q = tuple(range(start, start + count))
        out.append((q, tuple(sorted({h // group for h in q}))))
        start += count
    return out


def assign_heads_never_replicate(num_heads, num_kv_heads, world_size):
    # Wrong: always whole groups per rank; with more ranks than KV heads the extra ranks hold nothing.
    _checked(num_heads, world_size)
    group, out, start = num_heads // num_kv_heads, [], 0
    for count in split_evenly(num_kv_heads, world_size):
        out.append((tuple(range(start * group, (start + count) * group)), tuple(range(start, start + count))))
        start += count
    return out


def assign_heads_replicate_all(num_heads, num_kv_heads, world_size):
    # Wrong: splits the query heads by group as the reference does, but every rank keeps every KV head.
    return [(q, tuple(range(num_kv_heads))) for q, _ in assign_heads_right(num_heads, num_kv_heads, world_size)]


def assign_heads_larger_last(num_heads, num_kv_heads, world_size):
    # Wrong: the larger shares on the last ranks (the right properties, not the reference's order).
    group, out = num_heads // num_kv_heads, []
    if world_size > num_heads:
        raise ValueError(f"world_size {world_size} > num_heads {num_heads}")
    if world_size <= num_kv_heads:
        start = 0
        for count in reversed(split_evenly(num_kv_heads, world_size)):
            out.append((tuple(range(start * group, (start + count) * group)), tuple(range(start, start + count))))
            start += count
        return out
    for kv, num_ranks in enumerate(reversed(split_evenly(world_size, num_kv_heads))):
        start = kv * group
        for count in reversed(split_evenly(group, num_ranks)):
            out.append((tuple(range(start, start + count)), (kv,)))
            start += count
    return out


def assign_heads_one_rank_per_group(num_heads, num_kv_heads, world_size):
    # Wrong balance: with more ranks than KV heads, the first groups get one rank each and the last group the rest.
    if world_size <= num_kv_heads:
        return assign_heads_right(num_heads, num_kv_heads, world_size)
    _checked(num_heads, world_size)
    group, out = num_heads // num_kv_heads, []
    ranks = [1] * (num_kv_heads - 1) + [world_size - num_kv_heads + 1]
    if ranks[-1] > group:
        return assign_heads_right(num_heads, num_kv_heads, world_size)  # would leave ranks empty: fall back
    for kv, num_ranks in enumerate(ranks):
        start = kv * group
        for count in split_evenly(group, num_ranks):
            out.append((tuple(range(start, start + count)), (kv,)))
            start += count
    return out


def assign_heads_no_error(num_heads, num_kv_heads, world_size):
    # Wrong: more ranks than query heads comes back with empty ranks instead of an error.
    if world_size > num_heads:
        return assign_heads_right(num_heads, num_kv_heads, num_heads) + [((), ())] * (world_size - num_heads)
    return assign_heads_right(num_heads, num_kv_heads, world_size)


RIGHT_ANSWERS += [
    pytest.param(grading.check_assign_heads, assign_heads_right, id="11.2-notebook"),
    pytest.param(grading.check_assign_heads, assign_heads_reference, id="11.2-reference"),
    pytest.param(grading.check_assign_heads, assign_heads_lists, id="11.2-lists"),
]
WRONG_ANSWERS += [
    pytest.param(grading.check_assign_heads, assign_heads_round_robin, id="11.2-round-robin"),
    pytest.param(grading.check_assign_heads, assign_heads_contiguous_queries, id="11.2-mixes-groups"),
    pytest.param(grading.check_assign_heads, assign_heads_never_replicate, id="11.2-never-replicates"),
    pytest.param(grading.check_assign_heads, assign_heads_replicate_all, id="11.2-every-kv-head-everywhere"),
    pytest.param(grading.check_assign_heads, assign_heads_larger_last, id="11.2-larger-shares-last"),
    pytest.param(grading.check_assign_heads, assign_heads_one_rank_per_group, id="11.2-unbalanced-replication"),
    pytest.param(grading.check_assign_heads, assign_heads_no_error, id="11.2-no-error-past-num-heads"),
]


# ---------------------------------------------------------------------------------------------------------------------
# 11.3 the MLP of one rank, and where its all-reduce goes.
# ---------------------------------------------------------------------------------------------------------------------


def parallel_mlp_right(x, gate_shard, up_shard, down_shard, all_reduce):  # the solution notebook's answer
    hidden = F.silu(F.linear(x, gate_shard)) * F.linear(x, up_shard)  # (B, T, I_r): this rank's hidden features
    return all_reduce(F.linear(hidden, down_shard))  # (B, T, C): partial sums -> the full output


def parallel_mlp_ignores_return(x, gate_shard, up_shard, down_shard, all_reduce):
    # Right too: uses all_reduce as in-place, like torch.distributed.all_reduce.
    y = F.linear(F.silu(F.linear(x, gate_shard)) * F.linear(x, up_shard), down_shard)
    all_reduce(y)
    return y


def parallel_mlp_reduce_gate_up(x, gate_shard, up_shard, down_shard, all_reduce):
    # Wrong: all-reduces gate and up outputs before SiLU, adding different ranks' different hidden features.
    g = all_reduce(F.linear(x, gate_shard))
    u = all_reduce(F.linear(x, up_shard))
    return F.linear(F.silu(g) * u, down_shard)


def parallel_mlp_reduce_hidden(x, gate_shard, up_shard, down_shard, all_reduce):
    # Wrong: all-reduces the hidden activation before down_proj instead of its output.
    hidden = all_reduce(F.silu(F.linear(x, gate_shard)) * F.linear(x, up_shard))
    return F.linear(hidden, down_shard)


def parallel_mlp_no_reduce(x, gate_shard, up_shard, down_shard, all_reduce):
    # Wrong: returns this rank's partial sum: correct only on one rank.
    return F.linear(F.silu(F.linear(x, gate_shard)) * F.linear(x, up_shard), down_shard)


def parallel_mlp_reduce_twice(x, gate_shard, up_shard, down_shard, all_reduce):
    # Wrong: all-reduces twice "to be sure": the second sums the sums, world_size times the output.
    y = F.linear(F.silu(F.linear(x, gate_shard)) * F.linear(x, up_shard), down_shard)
    return all_reduce(all_reduce(y))


def parallel_mlp_silu_after_reduce(x, gate_shard, up_shard, down_shard, all_reduce):
    # Wrong: the gate's SiLU applied to the reduced output instead of inside the hidden product.
    return F.silu(all_reduce(F.linear(F.linear(x, gate_shard) * F.linear(x, up_shard), down_shard)))


RIGHT_ANSWERS += [
    pytest.param(grading.check_parallel_mlp, parallel_mlp_right, id="11.3-notebook"),
    pytest.param(grading.check_parallel_mlp, parallel_mlp_ignores_return, id="11.3-in-place-all-reduce"),
]
WRONG_ANSWERS += [
    pytest.param(grading.check_parallel_mlp, parallel_mlp_reduce_gate_up, id="11.3-reduce-before-silu"),
    pytest.param(grading.check_parallel_mlp, parallel_mlp_reduce_hidden, id="11.3-reduce-before-down"),
    pytest.param(grading.check_parallel_mlp, parallel_mlp_no_reduce, id="11.3-no-all-reduce"),
    pytest.param(grading.check_parallel_mlp, parallel_mlp_reduce_twice, id="11.3-two-all-reduces"),
    pytest.param(grading.check_parallel_mlp, parallel_mlp_silu_after_reduce, id="11.3-silu-after-reduce"),
]


# ---------------------------------------------------------------------------------------------------------------------
# 11.4 the bytes a rank all-reduces per token.
# ---------------------------------------------------------------------------------------------------------------------


def allreduce_bytes_right(config, dtype_bytes, world_size):  # the solution notebook's answer
    if world_size == 1:
        return 0
    num_all_reduces = 2 * config.num_layers + 1  # after o_proj and down_proj in every layer, after the embedding
    return num_all_reduces * config.hidden_size * dtype_bytes


def allreduce_bytes_no_embedding(config, dtype_bytes, world_size):
    # Wrong: forgets the vocabulary-parallel embedding's all-reduce.
    return 0 if world_size == 1 else 2 * config.num_layers * config.hidden_size * dtype_bytes


def allreduce_bytes_one_per_layer(config, dtype_bytes, world_size):
    # Wrong: one all-reduce per layer (and the embedding's), as if attention and MLP shared one.
    return 0 if world_size == 1 else (config.num_layers + 1) * config.hidden_size * dtype_bytes


def allreduce_bytes_times_world(config, dtype_bytes, world_size):
    # Wrong: multiplies by world_size, as if each rank handed in everyone's vectors.
    return (2 * config.num_layers + 1) * config.hidden_size * dtype_bytes * world_size if world_size > 1 else 0


def allreduce_bytes_one_rank_too(config, dtype_bytes, world_size):
    # Wrong: counts the all-reduces on one rank too, where there is nothing to reduce.
    return (2 * config.num_layers + 1) * config.hidden_size * dtype_bytes


def allreduce_bytes_elements(config, dtype_bytes, world_size):
    # Wrong: elements, not bytes.
    return 0 if world_size == 1 else (2 * config.num_layers + 1) * config.hidden_size


def allreduce_bytes_slice(config, dtype_bytes, world_size):
    # Wrong: each rank hands in a 1/W slice (that is a reduce-scatter's output, not an all-reduce's input).
    return 0 if world_size == 1 else (2 * config.num_layers + 1) * config.hidden_size * dtype_bytes // world_size


RIGHT_ANSWERS += [
    pytest.param(grading.check_allreduce_bytes, allreduce_bytes_right, id="11.4-notebook"),
    pytest.param(grading.check_allreduce_bytes, allreduce_bytes_per_token, id="11.4-reference"),
]
WRONG_ANSWERS += [
    pytest.param(grading.check_allreduce_bytes, allreduce_bytes_no_embedding, id="11.4-no-embedding"),
    pytest.param(grading.check_allreduce_bytes, allreduce_bytes_one_per_layer, id="11.4-one-per-layer"),
    pytest.param(grading.check_allreduce_bytes, allreduce_bytes_times_world, id="11.4-times-world-size"),
    pytest.param(grading.check_allreduce_bytes, allreduce_bytes_one_rank_too, id="11.4-nonzero-on-one-rank"),
    pytest.param(grading.check_allreduce_bytes, allreduce_bytes_elements, id="11.4-elements-not-bytes"),
    pytest.param(grading.check_allreduce_bytes, allreduce_bytes_slice, id="11.4-a-slice-per-rank"),
]


# ---------------------------------------------------------------------------------------------------------------------
# The worked examples above each exercise, recomputed with minillm's reference; the simulated ranks on their own.
# ---------------------------------------------------------------------------------------------------------------------

SOLUTION = Path(__file__).resolve().parents[2] / "solutions" / "11_tensor_parallelism.ipynb"


def parallel_mlp_reference(x, gate_shard, up_shard, down_shard, all_reduce):
    """One rank's MLP from minillm's own pieces: minillm.model.MLP's math on the shards, then the all-reduce."""
    from minillm.grading.ch11_tensor_parallelism import dense_mlp

    return all_reduce(dense_mlp(x, gate_shard, up_shard, down_shard))


# The learner's function names, bound to the package's reference for the worked examples.
REFERENCE = {
    "torch": torch,
    "F": F,
    "minillm": minillm,
    "ModelConfig": ModelConfig,
    "KV_PRESETS": KV_PRESETS,
    "split_evenly": split_evenly,
    "split_linear": split_linear,
    "assign_heads": assign_heads_reference,
    "parallel_mlp": parallel_mlp_reference,
    "allreduce_bytes_per_token": allreduce_bytes_per_token,
}


def test_worked_examples_are_the_references_output():
    check_worked_examples(SOLUTION, 11, ["11.1", "11.2", "11.3", "11.4"], REFERENCE)


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_thread_all_reduce_sums_in_rank_order_and_records_calls(world_size):
    from minillm.grading.ch11_tensor_parallelism import ThreadAllReduce, run_ranks

    comm = ThreadAllReduce(world_size)
    outs = run_ranks(lambda r, all_reduce: all_reduce(torch.full((2, 3), float(r + 1))),
                     [(r,) for r in range(world_size)], comm)
    total = world_size * (world_size + 1) / 2
    assert all(torch.equal(o, torch.full((2, 3), total)) for o in outs)
    assert [len(c) for c in comm.calls] == [1] * world_size


def test_a_rank_that_fails_does_not_hang_the_others():
    from minillm.grading.ch11_tensor_parallelism import ThreadAllReduce, run_ranks

    def rank_main(r, all_reduce):
        if r == 1:
            raise NotImplementedError("the stub")
        return all_reduce(torch.ones(2))

    start = time.perf_counter()
    with pytest.raises(NotImplementedError, match="the stub"):
        run_ranks(rank_main, [(r,) for r in range(3)], ThreadAllReduce(3, timeout_s=30))
    assert time.perf_counter() - start < 10, "the other ranks waited for the barrier's timeout"


def test_the_mlp_shards_of_the_check_are_what_build_shard_loads():
    """Check 11.3 splits gate/up column-wise and down row-wise with split_linear; build_shard's MLP slices agree."""
    from minillm.model import Transformer
    from minillm.parallel.shard import build_shard, model_reader, plan_shards

    config = ModelConfig.tiny(intermediate_size=130)
    torch.manual_seed(0)
    model = Transformer(config).eval()
    mlp = model.layers[0].mlp
    for W in (2, 3):
        for shard in plan_shards(config, W):
            local = build_shard(config, model_reader(model), shard).layers[0].mlp
            r = shard.rank
            assert torch.equal(local.gate_proj.weight, split_linear(mlp.gate_proj.weight, W, "column")[r])
            assert torch.equal(local.up_proj.weight, split_linear(mlp.up_proj.weight, W, "column")[r])
            assert torch.equal(local.down_proj.weight, split_linear(mlp.down_proj.weight, W, "row")[r])
