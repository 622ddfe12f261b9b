"""Chapter 11 checks (tensor parallelism), used by solutions/11_tensor_parallelism.ipynb.

Each check compares the learner's function with minillm's own on fixed cases and on fresh random ones (``ex.rng``,
a new seed every run) and tests the properties whose failure names the likely mistake: column shards whose outputs
concatenate, and row shards whose partial outputs sum, to the dense layer's (11.1); every query head on one rank,
each with the KV head of its group, replicated when ranks outnumber KV heads (11.2); one all-reduce per rank, of the
MLP's partial output, run on simulated ranks (Python threads and a summing all-reduce, ``ThreadAllReduce``) (11.3);
the bytes a rank hands to all-reduces per token (11.4). The references are ``minillm.parallel.layers.split_linear``,
``minillm.parallel.heads.assign_heads``, ``minillm.model.MLP`` and ``minillm.parallel.comm.allreduce_bytes_per_token``.
Every check has plausible wrong answers in tests/answers/ch11_tensor_parallelism.py that it must reject.

Shapes: B batch, T tokens, C model dim, I the MLP's hidden width (I_r: one rank's slice), W world size.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from minillm.grading.framework import assert_close, assert_equal, assert_shape, exercise, randn

__all__ = [  # the checks, re-exported by minillm.grading
    "check_split_linear",
    "check_assign_heads",
    "check_parallel_mlp",
    "check_allreduce_bytes",
]


def _description(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return f"{type(x).__name__} {str(x)[:80]}"


# ---------------------------------------------------------------------------------------------------------------------
# Exercise 11.1: a linear layer split column-wise and row-wise.
# ---------------------------------------------------------------------------------------------------------------------


def check_split_linear(fn: Callable) -> None:
    """Exercise 11.1. `fn(weight, world_size, how) -> list of world_size tensors`: the dense (out, in) weight cut into
    contiguous shards sized as ``split_evenly`` (larger first), rows of W for how="column" (a slice of the output
    features), columns for how="row" (a slice of the input features); ValueError for any other `how`. Same as
    ``minillm.parallel.layers.split_linear``.
    """
    from minillm.parallel.heads import split_evenly
    from minillm.parallel.layers import split_linear

    def shards_of(weight, W, how):
        what = f"split_linear(weight {tuple(weight.shape)}, world_size={W}, how={how!r})"
        given = weight.clone()
        got = fn(weight, W, how)
        assert torch.equal(weight, given), f"{what}: your function changed the dense weight: slice it, do not modify it"
        if not isinstance(got, (list, tuple)) or len(got) != W:
            raise AssertionError(f"{what}: expected a list of {W} tensors, one per rank, got {_description(got)}")
        for r, shard in enumerate(got):
            if not isinstance(shard, torch.Tensor) or shard.dim() != 2:
                raise AssertionError(f"{what}: shard {r}: expected a 2-D tensor, got {_description(shard)}")
        return what, list(got)

    def sizes_hint(what, got, weight, W, how):
        """The shapes, compared with the reference's, and the likely mistake."""
        dim = 0 if how == "column" else 1
        want = [tuple(s.shape) for s in split_linear(weight, W, how)]
        shapes = [tuple(s.shape) for s in got]
        if shapes == want:
            return
        n = weight.shape[dim]
        other = [tuple(s.shape) for s in split_linear(weight, W, "row" if how == "column" else "column")]
        if shapes == other:
            cut, right = ("columns", "rows (the output features)") if how == "column" else (
                "rows", "columns (the input features)")
            hint = f"that cuts the {cut} of W; W is (out, in) = {tuple(weight.shape)}, so {how}-parallel cuts {right}"
        elif sum(s[dim] for s in shapes) < n:
            hint = (f"the shards cover {sum(s[dim] for s in shapes)} of the {n} features: every feature goes to a "
                    f"rank, the first {n % W} shards one larger (split_evenly({n}, {W}) = {split_evenly(n, W)})")
        else:
            hint = (f"shard sizes along dim {dim} must be split_evenly({n}, {W}) = {split_evenly(n, W)}: they differ "
                    f"by at most one, the larger ones first")
        raise AssertionError(f"{what}: expected shard shapes {want}, got {shapes}: {hint}")

    def column_outputs(weight, x, W):
        what, got = shards_of(weight, W, "column")
        sizes_hint(what, got, weight, W, "column")
        y = torch.cat([F.linear(x, shard) for shard in got], dim=-1)  # (B, out): each rank's slice side by side
        assert_close(y, F.linear(x, weight), atol=1e-5, rtol=1e-5,
                     what=f"{what}: the ranks' outputs x @ shard.T concatenated vs the dense x @ W.T")

    def row_outputs(weight, x, W):
        what, got = shards_of(weight, W, "row")
        sizes_hint(what, got, weight, W, "row")
        xs = torch.split(x, [s.shape[1] for s in got], dim=-1)  # each rank's slice of the input features
        y = sum(F.linear(x_r, shard) for x_r, shard in zip(xs, got))  # (B, out): the all-reduce, by hand
        assert_close(y, F.linear(x, weight), atol=1e-5, rtol=1e-5,
                     what=f"{what}: the ranks' partial outputs x_r @ shard.T summed vs the dense x @ W.T")

    def same_shards(weight, W, how):
        what, got = shards_of(weight, W, how)
        sizes_hint(what, got, weight, W, how)
        for r, (shard, want) in enumerate(zip(got, split_linear(weight, W, how))):
            assert_equal(shard, want, what=f"{what}: shard {r}")

    def worked_example():
        w = torch.arange(15.0).view(5, 3)
        same_shards(w, 2, "column")
        same_shards(w, 2, "row")

    def one_rank():
        w = randn(7, 5, seed=1101)
        for how in ("column", "row"):
            same_shards(w, 1, how)

    def fixed_outputs():
        w, x = randn(13, 11, seed=1102), randn(4, 11, seed=1103)
        column_outputs(w, x, 3)
        row_outputs(w, x, 3)

    def fresh(kind):
        for _ in range(12):
            W = ex.rng.randint(1, 5)
            out, inp = ex.rng.randint(W, 40), ex.rng.randint(W, 40)
            w, x = ex.randn(out, inp), ex.randn(ex.rng.randint(1, 4), inp)
            if kind == "column":
                column_outputs(w, x, W)
            elif kind == "row":
                row_outputs(w, x, W)
            else:
                same_shards(w, W, ex.rng.choice(["column", "row"]))

    def bad_how():
        w = randn(4, 4, seed=1104)
        try:
            got = fn(w, 2, "diagonal")
        except ValueError:
            return
        raise AssertionError(f"split_linear(weight, 2, 'diagonal'): expected ValueError, got {_description(got)}")

    with exercise("11.1", "a linear layer split column-wise and row-wise") as ex:
        ex.check("the example above: W (5, 3) over 2 ranks, column shards (3, 3) and (2, 3), row shards (5, 2) and "
                 "(5, 1)", worked_example)
        ex.check("one rank holds the whole weight", one_rank)
        ex.check("W (13, 11) over 3 ranks: column outputs concatenate, and row partial outputs sum, to the dense "
                 "output", fixed_outputs)
        ex.check("fresh odd shapes, 1 to 5 ranks: column shards' outputs concatenated equal the dense output",
                 lambda: fresh("column"))
        ex.check("fresh odd shapes, 1 to 5 ranks: row shards' partial outputs summed equal the dense output",
                 lambda: fresh("row"))
        ex.check("fresh shapes: exactly the reference's shards (sizes as split_evenly, larger first)",
                 lambda: fresh("same"))
        ex.check("ValueError for how other than 'column' or 'row'", bad_how)


# ---------------------------------------------------------------------------------------------------------------------
# Exercise 11.2: query and KV heads per rank, with replication.
# ---------------------------------------------------------------------------------------------------------------------


def _as_heads(got: Any, what: str, world_size: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """The learner's assignment as [(q_heads, kv_heads)] tuples of ints, checked for its structure."""
    if not isinstance(got, (list, tuple)) or len(got) != world_size:
        raise AssertionError(f"{what}: expected a list of {world_size} (q_heads, kv_heads) pairs, one per rank, got "
                             f"{_description(got)}")
    out = []
    for r, pair in enumerate(got):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise AssertionError(f"{what}: rank {r}: expected a pair (q_heads, kv_heads), got {_description(pair)}")
        try:
            q, kv = (tuple(int(h) for h in heads) for heads in pair)
        except (TypeError, ValueError):
            raise AssertionError(f"{what}: rank {r}: q_heads and kv_heads must be sequences of ints, got "
                                 f"{pair!r}") from None
        out.append((q, kv))
    return out


def check_assign_heads(fn: Callable) -> None:
    """Exercise 11.2. `fn(num_heads, num_kv_heads, world_size) -> [(q_heads, kv_heads)] per rank`: global head ids,
    contiguous and ascending; whole groups per rank when world_size <= num_kv_heads, else each group's query heads
    spread over its ranks, which all hold a copy of the group's KV head; ValueError when world_size > num_heads.
    Same as ``minillm.parallel.heads.assign_heads`` (whose HeadShards carry the same tuples).
    """
    from minillm.parallel.heads import assign_heads

    def reference(H, Hkv, W):
        return [(s.q_heads, s.kv_heads) for s in assign_heads(H, Hkv, W)]

    def heads_of(H, Hkv, W):
        what = f"assign_heads(num_heads={H}, num_kv_heads={Hkv}, world_size={W})"
        return what, _as_heads(fn(H, Hkv, W), what, W)

    def properties(H, Hkv, W):
        what, got = heads_of(H, Hkv, W)
        group = H // Hkv
        owners = {}
        for r, (q, kv) in enumerate(got):
            if not q:
                raise AssertionError(
                    f"{what}: rank {r} holds no query head: {got}. With more ranks than KV heads, spread each "
                    f"group's {group} query heads over several ranks, each with a copy of the group's KV head")
            for h in q:
                owners.setdefault(h, []).append(r)
        twice = {h: rs for h, rs in owners.items() if len(rs) > 1}
        missing = [h for h in range(H) if h not in owners]
        stray = sorted(h for h in owners if not 0 <= h < H)
        if twice or missing or stray:
            raise AssertionError(f"{what}: every query head 0..{H - 1} goes to exactly one rank; got {got} "
                                 f"(on several ranks: {twice}, on none: {missing}, not a head: {stray})")
        for r, (q, kv) in enumerate(got):
            used = tuple(sorted({h // group for h in q}))
            if kv != used:
                raise AssertionError(
                    f"{what}: rank {r} holds query heads {q}, which use KV heads {used} (head h is in group "
                    f"h // {group}), but holds KV heads {kv}: a rank holds exactly the KV heads its query heads use")
            served = [sum(1 for h in q if h // group == g) for g in kv]
            if len(set(served)) > 1:
                raise AssertionError(
                    f"{what}: rank {r}'s KV heads {kv} serve {served} of its query heads {q}: every local KV head "
                    f"must serve the same number of local query heads (the kernels map local query head h to local "
                    f"KV head h // (H_local / Hkv_local)), so a rank takes whole groups or part of one group, "
                    f"never a mix")
        want = reference(H, Hkv, W)
        got_loads, want_loads = sorted(len(q) for q, _ in got), sorted(len(q) for q, _ in want)
        if got_loads != want_loads:
            raise AssertionError(f"{what}: query heads per rank {[len(q) for q, _ in got]}, expected (in some order) "
                                 f"{[len(q) for q, _ in want]}: split the groups, and then the ranks, as evenly as "
                                 f"split_evenly does")
        return what, got, want

    def same(H, Hkv, W):
        what, got, want = properties(H, Hkv, W)
        if got != want:
            raise AssertionError(f"{what}: expected {want}, got {got}: ranks hold contiguous heads in rank order, the "
                                 f"larger shares first (as split_evenly)")

    def smollm2():
        for W in range(1, 10):
            same(9, 3, W)

    def fresh_properties():
        for _ in range(30):
            Hkv, group = ex.rng.choice([1, 2, 3, 4, 5, 8]), ex.rng.randint(1, 8)
            properties(Hkv * group, Hkv, ex.rng.randint(1, Hkv * group))

    def fresh_same():
        for _ in range(30):
            Hkv, group = ex.rng.choice([1, 2, 3, 4, 5, 8]), ex.rng.randint(1, 8)
            same(Hkv * group, Hkv, ex.rng.randint(1, Hkv * group))

    def too_many_ranks():
        for H, Hkv, W in ((9, 3, 10), (4, 4, 6)):
            try:
                got = fn(H, Hkv, W)
            except ValueError:
                continue
            raise AssertionError(f"assign_heads({H}, {Hkv}, {W}): expected ValueError (some rank would hold no query "
                                 f"head), got {_description(got)}")

    with exercise("11.2", "query and KV heads per rank, with replication") as ex:
        ex.check("the example above: SmolLM2 (9 query heads, 3 KV heads) over 2 and over 4 ranks",
                 lambda: (same(9, 3, 2), same(9, 3, 4)))
        ex.check("whole groups per rank: 32 query heads, 8 KV heads, over 1, 2, 4, 8 ranks",
                 lambda: [same(32, 8, W) for W in (1, 2, 4, 8)])
        ex.check("every query head on exactly one rank, each rank with the KV heads its query heads use, and every "
                 "local KV head serving as many local query heads: SmolLM2 over 1 to 9 ranks", smollm2)
        ex.check("more ranks than KV heads: each group's KV head replicated on the ranks that share its query heads "
                 "(8 query heads, 2 KV heads over 3, 5, 8 ranks)", lambda: [same(8, 2, W) for W in (3, 5, 8)])
        ex.check("fresh GQA configs: the properties, and query heads per rank as balanced as the reference's",
                 fresh_properties)
        ex.check("fresh GQA configs: exactly the reference's assignment", fresh_same)
        ex.check("ValueError when world_size > num_heads", too_many_ranks)


# ---------------------------------------------------------------------------------------------------------------------
# Exercise 11.3: the MLP of one rank, and where its all-reduce goes.
# ---------------------------------------------------------------------------------------------------------------------


class ThreadAllReduce:
    """A summing all-reduce over `world_size` simulated ranks, one Python thread each (``run_ranks``).

    ``for_rank(r)`` is rank r's ``all_reduce(t) -> t``: it records the call, waits for every rank's tensor, and
    returns their sum (in rank order, so every rank gets the same bits), written into `t` in place as
    ``torch.distributed.all_reduce`` would. Every rank must make the same calls in the same order, as with a real
    process group; a rank that fails aborts the barrier, so the others stop waiting.
    """

    def __init__(self, world_size: int, timeout_s: float = 10.0):
        self.world_size = world_size
        self.barrier = threading.Barrier(world_size, timeout=timeout_s)
        self.inputs: list[torch.Tensor | None] = [None] * world_size
        self.calls: list[list[torch.Tensor]] = [[] for _ in range(world_size)]  # what each rank handed in, cloned

    def for_rank(self, rank: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def all_reduce(t: torch.Tensor) -> torch.Tensor:
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"all_reduce takes a tensor, got {_description(t)}")
            self.calls[rank].append(t.detach().clone())
            self.inputs[rank] = t.detach().clone()
            self.barrier.wait()  # every rank's tensor is in
            shapes = {tuple(x.shape) for x in self.inputs}
            if len(shapes) > 1:
                raise AssertionError(f"the ranks all-reduced tensors of different shapes {sorted(shapes)}: an "
                                     f"all-reduce sums tensors of one shape. Only the (B, T, C) output of down_proj "
                                     f"has the same shape on every rank; the hidden slices (I_r) do not")
            total = torch.stack(self.inputs).sum(dim=0)  # the same order on every rank: the same bits
            self.barrier.wait()  # every rank has read the inputs before the next call overwrites them
            t.copy_(total)  # in place, like torch.distributed.all_reduce
            return t

        return all_reduce


def run_ranks(fn: Callable, per_rank_args: list[tuple], comm: ThreadAllReduce) -> list[Any]:
    """Run ``fn(*per_rank_args[r], comm.for_rank(r))`` for every rank r at once, one thread each -> their results.

    The first exception a rank raised (a broken barrier only when nothing else went wrong) is raised here.
    """
    W = len(per_rank_args)
    results: list[Any] = [None] * W
    errors: list[BaseException | None] = [None] * W

    def rank_main(r: int) -> None:
        try:
            results[r] = fn(*per_rank_args[r], comm.for_rank(r))
        except BaseException as e:  # noqa: BLE001 - reported in the main thread
            errors[r] = e
            comm.barrier.abort()  # the other ranks stop waiting for this one

    threads = [threading.Thread(target=rank_main, args=(r,), daemon=True) for r in range(W)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    real = [e for e in errors if e is not None and not isinstance(e, threading.BrokenBarrierError)]
    if real:
        raise real[0]
    broken = [r for r, e in enumerate(errors) if e is not None]
    if broken:
        raise AssertionError(
            f"ranks {broken} waited in all_reduce for ranks that never came: every rank must call all_reduce the "
            f"same number of times (calls per rank: {[len(c) for c in comm.calls]})")
    return results


def dense_mlp(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """The unsplit SwiGLU MLP, ``minillm.model.MLP`` with these weights: (B, T, C) -> (B, T, C)."""
    from minillm.config import ModelConfig
    from minillm.model import MLP

    I, C = gate.shape
    with torch.device("meta"):
        mlp = MLP(ModelConfig.tiny(hidden_size=C, intermediate_size=I, num_heads=1, num_kv_heads=1, head_dim=2))
    mlp.load_state_dict({"gate_proj.weight": gate, "up_proj.weight": up, "down_proj.weight": down}, assign=True)
    with torch.no_grad():
        return mlp(x)


def mlp_case(draw: Callable[..., torch.Tensor], B: int, T: int, C: int, I: int) -> tuple[torch.Tensor, ...]:
    """x (B, T, C) and the dense gate, up (I, C) and down (C, I), scaled so activations stay near 1, from `draw(*shape)`
    (a check's ``ex.randn``, or ``seeded(seed)``)."""
    return draw(B, T, C), draw(I, C) / C**0.5, draw(I, C) / C**0.5, draw(C, I) / I**0.5


def seeded(seed: int) -> Callable[..., torch.Tensor]:
    """`draw(*shape)` giving fixed standard normal tensors: seed, seed + 1, ... on successive calls."""
    seeds = iter(range(seed, seed + 1000))
    return lambda *shape: randn(*shape, seed=next(seeds))


def simulate_mlp(fn: Callable, x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                 world_size: int) -> tuple[list[Any], ThreadAllReduce, list[tuple[torch.Tensor, ...]]]:
    """Run `fn` as the MLP of `world_size` ranks (gate/up split column-wise, down row-wise, as split_evenly) ->
    (each rank's output, the all-reduce with its recorded calls, each rank's (gate, up, down) shards)."""
    from minillm.parallel.layers import split_linear

    shards = list(zip(split_linear(gate, world_size, "column"), split_linear(up, world_size, "column"),
                      split_linear(down, world_size, "row")))
    comm = ThreadAllReduce(world_size)
    args = [(x.clone(), g.clone(), u.clone(), d.clone()) for g, u, d in shards]
    with torch.no_grad():
        outs = run_ranks(fn, args, comm)
    return outs, comm, shards


def check_parallel_mlp(fn: Callable) -> None:
    """Exercise 11.3. `fn(x, gate_shard, up_shard, down_shard, all_reduce) -> (B, T, C)`: one rank's SwiGLU MLP with
    gate and up column-parallel (I_r, C) and down row-parallel (C, I_r): ``down(silu(gate x) * up x)`` is this
    rank's partial sum of the output, and one call to ``all_reduce`` (sum over ranks) completes it. Every rank's
    output must equal the dense ``minillm.model.MLP``'s.

    The ranks are simulated: one Python thread each, and an all-reduce (``ThreadAllReduce``) that sums their tensors.
    """

    def outputs_match(x, gate, up, down, W, what):
        outs, comm, shards = simulate_mlp(fn, x, gate, up, down, W)
        want = dense_mlp(x, gate, up, down)
        calls = [len(c) for c in comm.calls]
        for r, out in enumerate(outs):
            assert_shape(out, x.shape, what=f"{what}: rank {r}'s output")
            try:
                assert_close(out, want, atol=1e-5, rtol=1e-4, what=f"{what}: rank {r}'s output vs the dense MLP")
            except AssertionError as e:
                hint, shapes = "", [tuple(t.shape) for t in comm.calls[r]]
                if calls[r] == 0:
                    hint = ("\nno all_reduce call: each rank's down_proj output is only a partial sum over its slice "
                            "of the hidden features")
                elif W > 1 and torch.allclose(out, want * W, atol=1e-5, rtol=1e-4):
                    hint = "\nthat is world_size times the dense output: the sum was all-reduced again"
                elif any(shape != tuple(x.shape) for shape in shapes):
                    hint = (f"\nrank {r} all-reduced tensors of shapes {shapes}: before down_proj the ranks hold "
                            f"different hidden features (I_r wide), which must not be added; all-reduce the (B, T, C) "
                            f"output of down_proj, once")
                raise AssertionError(f"{e}{hint}") from None
        return outs, comm, shards

    def one_call_per_rank(x, gate, up, down, W, what):
        _, comm, shards = outputs_match(x, gate, up, down, W, what)
        for r, (handed, (g, u, d)) in enumerate(zip(comm.calls, shards)):
            if len(handed) != 1:
                shapes = [tuple(t.shape) for t in handed]
                raise AssertionError(
                    f"{what}: rank {r} called all_reduce {len(handed)} times (on {shapes}); exactly once, on the "
                    f"partial output of down_proj: a second all-reduce sums sums, and before down_proj the hidden "
                    f"slices of different ranks are different features, which must not be added")
            assert_shape(handed[0], x.shape, what=f"{what}: the tensor rank {r} hands to all_reduce (the (B, T, C) "
                                                  f"partial output of down_proj)")
            partial = F.linear(F.silu(F.linear(x, g)) * F.linear(x, u), d)  # (B, T, C): this rank's share
            assert_close(handed[0], partial, atol=1e-5, rtol=1e-4,
                         what=f"{what}: the tensor rank {r} hands to all_reduce vs down_r(silu(gate_r x) * up_r x)")

    def fresh():
        for _ in range(4):
            W = ex.rng.randint(2, 5)
            B, T, C, I = ex.rng.randint(1, 3), ex.rng.randint(1, 5), ex.rng.randint(2, 40), ex.rng.randint(W, 60)
            x, gate, up, down = mlp_case(ex.randn, B, T, C, I)
            one_call_per_rank(x, gate, up, down, W, f"{W} ranks, C={C}, I={I} (I_r = {I // W} or {-(-I // W)})")

    with exercise("11.3", "where the MLP's all-reduce goes") as ex:
        ex.check("one rank (all_reduce sums over itself): the dense MLP",
                 lambda: outputs_match(*mlp_case(seeded(1130), 2, 3, 8, 12), 1, "1 rank, C=8, I=12"))
        ex.check("2 ranks of a SmolLM2-wide MLP (C=576, I=1536): every rank's output equals the dense MLP's",
                 lambda: outputs_match(*mlp_case(seeded(1131), 1, 2, 576, 1536), 2, "2 ranks, C=576, I=1536"))
        ex.check("all_reduce called exactly once per rank, on that rank's (B, T, C) partial output of down_proj",
                 lambda: one_call_per_rank(*mlp_case(seeded(1132), 2, 3, 16, 24), 3, "3 ranks, C=16, I=24"))
        ex.check("an uneven split: 4 ranks, I=10 (hidden slices of 3, 3, 2, 2)",
                 lambda: one_call_per_rank(*mlp_case(seeded(1133), 1, 4, 12, 10), 4, "4 ranks, C=12, I=10"))
        ex.check("fresh shapes on 2 to 5 ranks: every rank equals the dense MLP, one all-reduce each", fresh)


# ---------------------------------------------------------------------------------------------------------------------
# Exercise 11.4: the bytes a rank all-reduces per token.
# ---------------------------------------------------------------------------------------------------------------------


def check_allreduce_bytes(fn: Callable) -> None:
    """Exercise 11.4. `fn(config, dtype_bytes, world_size) -> int`: the bytes each rank hands to all-reduces for one
    token's forward pass: one (hidden_size,) vector after the embedding and two per layer (after o_proj, after
    down_proj), 0 on one rank. Same as ``minillm.parallel.comm.allreduce_bytes_per_token``.
    """
    from minillm.config import ModelConfig
    from minillm.kvcache.memory import KV_PRESETS
    from minillm.parallel.comm import allreduce_bytes_per_token

    def same(config, e, W):
        what = (f"allreduce_bytes_per_token({config.name}: {config.num_layers} layers, hidden_size "
                f"{config.hidden_size}; dtype_bytes={e}, world_size={W})")
        got = fn(config, e, W)
        if isinstance(got, bool) or not isinstance(got, int):
            raise AssertionError(f"{what}: expected an int (bytes), got {_description(got)}")
        want = allreduce_bytes_per_token(config, e, W)
        if got == want:
            return
        L, C = config.num_layers, config.hidden_size
        vector = C * e
        if W == 1:
            raise AssertionError(f"{what}: expected 0, got {got}: one rank holds whole tensors, nothing to reduce")
        hints = [  # (what a mistake gives, what it forgot): several may give the same number
            (2 * L * vector, "the embedding is vocabulary-parallel: its output is all-reduced too (one more vector)"),
            ((L + 1) * vector, "two all-reduces per layer: after attention's o_proj and after the MLP's down_proj"),
            (L * vector, "two all-reduces per layer (after o_proj, after down_proj) and one after the embedding"),
            (want * W, ("the bytes handed to the all-reduce do not grow with world_size: every rank hands in its "
                        "whole (hidden_size,) partial sum")),
            ((2 * L + 1) * C, f"bytes, not elements: times dtype_bytes = {e}"),
            (want // W, "each rank hands the collective its whole (hidden_size,) vector, not a 1/W slice"),
        ]
        hint = "; or ".join(message for value, message in hints if value == got)
        raise AssertionError(f"{what}: expected {want}, got {got}" + (f": {hint}" if hint else ""))

    smol = KV_PRESETS["SmolLM2-135M"]

    def fresh():
        for _ in range(30):
            Hkv, group, D = ex.rng.choice([1, 2, 4, 8]), ex.rng.randint(1, 4), ex.rng.choice([16, 32, 64, 128])
            config = ModelConfig(vocab_size=ex.rng.randint(100, 200_000), hidden_size=Hkv * group * D,
                                 intermediate_size=ex.rng.randint(64, 30_000), num_layers=ex.rng.randint(1, 96),
                                 num_heads=Hkv * group, num_kv_heads=Hkv, name="random config")
            same(config, ex.rng.choice([1, 2, 4]), ex.rng.randint(1, 16))

    with exercise("11.4", "the bytes a rank all-reduces per token") as ex:
        ex.check("the example above: SmolLM2-135M in bf16 on 2 ranks", lambda: same(smol, 2, 2))
        ex.check("one rank: nothing to reduce, 0 bytes", lambda: same(smol, 2, 1))
        ex.check("SmolLM2-135M in fp32 on 3 and 8 ranks: the same bytes whatever the world size",
                 lambda: (same(smol, 4, 3), same(smol, 4, 8)))
        ex.check("Llama-3.1-70B in bf16 on 8 ranks", lambda: same(KV_PRESETS["Llama-3.1-70B"], 2, 8))
        ex.check("fresh configs, dtypes and world sizes", fresh)
