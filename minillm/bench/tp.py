"""Benchmark: tensor parallelism: decode speed at several world sizes, and what the ranks spend talking.

``python -m minillm.bench tp`` serves a batch of chat requests (greedy, EOS ignored) with SmolLM2-135M at each world
size, one ``LLM(..., tensor_parallel_size=W)`` after another, and wraps the engine's ``step`` to record, per step,
its wall time and what rank 0's collectives counters (``minillm.parallel.comm.COUNTERS``, the numbers
``llm.stats()["tensor_parallel"]["communication"]`` reports) added in it. Per world size:
  * decode tokens/s = batch size / median decode step time (a decode step: every sequence brings one token);
  * seconds in collectives per decode step (rank 0: this includes waiting for slower ranks), and their share of
    the step: communication / compute = collective seconds / (step seconds - collective seconds). gloo's
    collectives block, so on a CPU that is their time; NCCL's return once queued on the GPU, so there the counter
    times the launch only and the share is a lower bound;
  * collectives per step (2L + 1 all-reduces, 1 all-gather), bytes all-reduced per token measured (all-reduce bytes /
    tokens forwarded) against ``allreduce_bytes_per_token``'s prediction, and the ring's wire bytes
    (``ring_wire_bytes``);
  * weight bytes per rank (each rank's shard built on the meta device: its real slices, no data), and rank 0's
    measured on its model (``weight_bytes_per_rank``); a decode step reads those bytes once;
  * whether the greedy tokens equal world size 1's.
``--device cpu`` (the default without CUDA) runs W = 1, 2, 3 on this machine's cores: W processes of cores / W
threads each (gloo) against one process using all of them, so no new hardware is added; what changes is how the cores
are shared (processes instead of one process's threads) and the price of the collectives. On a busy machine the
one-process run suffers most (its threads wait for each other at every op), so the 1-minute load average is recorded.
``--device cuda`` runs W = 1, 2, 4, 8 up to the GPU count (NCCL, one GPU per rank), the scaling efficiency being
speedup / W; with fewer than 2 GPUs it records why nothing ran. Every run is eager (``enforce_eager=True``): tensor
parallelism in minillm is, so W = 1 is timed the same way.
Writes JSON + PNG (``minillm.viz.parallel.plot_comm_vs_compute``). ``--quick``: a few tokens, one round.
"""

from __future__ import annotations

import os
import statistics
import time

import torch

from minillm.bench.common import environment_info, make_parser, write_results
from minillm.parallel.comm import COUNTERS, allreduce_bytes_per_token, ring_wire_bytes, weight_bytes_per_rank

MODEL = "smollm2-135m"
QUESTIONS = [
    "Why is the sky blue? Explain it to a ten-year-old.",
    "Give me three ideas for a rainy Sunday afternoon.",
    "What makes a good cup of tea?",
    "How do bees make honey?",
    "Write a short poem about the sea.",
    "What should I pack for a weekend of hiking?",
    "Describe the city of your dreams.",
    "Write a short story about a cat who learns to fly.",
]
GPU_WORLD_SIZES = (1, 2, 4, 8)  # up to the GPU count
COUNTER_KEYS = ("all_reduce_calls", "all_reduce_bytes", "all_gather_calls", "all_gather_bytes", "seconds")


class StepRecorder:
    """Wraps ``engine.step`` (an instance attribute shadows the method): per step its wall seconds, tokens and
    sequences, and what it added to rank 0's collectives counters."""

    def __init__(self, engine):
        self.engine, self.rows = engine, []
        self._step = engine.step
        engine.step = self.step

    def step(self):
        before = COUNTERS.as_dict()
        start = time.perf_counter()
        out = self._step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        after = COUNTERS.as_dict()
        scheduled = self.engine.last_step
        self.rows.append({"step_s": seconds, "num_tokens": scheduled.num_batched_tokens,
                          "num_seqs": len(scheduled.seqs), **{k: after[k] - before[k] for k in COUNTER_KEYS}})
        return out


def shard_weight_bytes(config, world_size: int, dtype: torch.dtype) -> list[int]:
    """Weight bytes of every rank's shard: ``build_shard`` on the meta device (the real slicing, no data)."""
    from minillm.model import Transformer
    from minillm.parallel.shard import build_shard, model_reader, plan_shards

    with torch.device("meta"):
        dense = Transformer(config)
    read = model_reader(dense)
    sizes = []
    for shard in plan_shards(config, world_size):
        model = build_shard(config, read, shard, device="meta", dtype=dtype)
        sizes.append(sum(p.numel() * p.element_size() for p in model.parameters()))  # parameters(): tied ones once
    return sizes


def run_world_size(config, world_size: int, device: torch.device, prompts: list, max_tokens: int,
                   repeats: int) -> dict:
    """Serve `prompts` `repeats` times at one world size; the row described in the module docstring (and the
    generated tokens, under "tokens"). `config`: the whole model's (a tensor-parallel ``llm.config`` is rank 0's
    shard: its own head counts and MLP width)."""
    import minillm

    start = time.perf_counter()
    llm = minillm.LLM(MODEL, device=device, tensor_parallel_size=world_size, max_num_seqs=len(prompts),
                      enforce_eager=True)
    try:
        build_s = time.perf_counter() - start
        params = minillm.SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        llm.generate(prompts, minillm.SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)  # warm-up
        recorder = StepRecorder(llm.engine)
        walls, tokens, agree = [], None, True
        for _ in range(repeats):
            first = len(recorder.rows)
            t0 = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            walls.append(time.perf_counter() - t0)
            tokens = [o.token_ids for o in outs]
            stats = llm.stats()  # its counters describe this generate call (the engine's last run)
            comm = stats.get("tensor_parallel", {}).get("communication")
            if comm is not None:  # the steps recorded add up to what stats() reports
                run = recorder.rows[first:]
                agree &= all(abs(sum(r[k] for r in run) - comm[k]) <= 1e-6 * max(1.0, comm[k]) for k in COUNTER_KEYS)
        steps = recorder.rows
        rank0_bytes = weight_bytes_per_rank(llm.model)
        threads = stats["tensor_parallel"]["rank0_threads"] if world_size > 1 else torch.get_num_threads()
        heads = stats["tensor_parallel"]["heads"] if world_size > 1 else None
        dtype = llm.dtype
    finally:
        llm.close()

    decode = [s for s in steps if s["num_tokens"] == s["num_seqs"]]  # one new token per sequence
    step_s = statistics.median(s["step_s"] for s in decode)
    collective_s = statistics.median(s["seconds"] for s in decode)
    dtype_bytes = torch.empty((), dtype=dtype).element_size()
    num_tokens = sum(s["num_tokens"] for s in steps)
    sampled_rows = sum(s["num_seqs"] for s in steps)  # one logits row per sequence per step (no speculation)
    measured = sum(s["all_reduce_bytes"] for s in steps) / num_tokens
    predicted = allreduce_bytes_per_token(config, dtype_bytes, world_size)
    gather = sum(s["all_gather_bytes"] for s in steps) / sampled_rows
    shards = shard_weight_bytes(config, world_size, dtype)
    generated = sum(map(len, tokens))
    return {
        "world_size": world_size, "threads_per_rank": threads, "heads": heads, "build_s": build_s,
        "batch_size": len(prompts), "decode_steps": len(decode), "step_s": step_s,
        "decode_tokens_per_s": len(prompts) / step_s, "tokens_per_s": generated * repeats / sum(walls),
        "collective_s_per_step": collective_s, "comm_to_compute": collective_s / max(step_s - collective_s, 1e-12),
        "all_reduces_per_step": statistics.median(s["all_reduce_calls"] for s in decode),
        "all_gathers_per_step": statistics.median(s["all_gather_calls"] for s in decode),
        "allreduce_bytes_per_token": measured, "allreduce_bytes_per_token_predicted": predicted,
        "allreduce_wire_bytes_per_token": ring_wire_bytes(predicted, world_size),
        "allgather_bytes_per_token": gather, "comm_bytes_per_token": measured + gather,
        "weight_bytes_per_rank": max(shards), "weight_bytes_by_rank": shards,
        "rank0_weight_bytes_measured": rank0_bytes,
        "communication_timed_runs": {k: sum(s[k] for s in steps) for k in COUNTER_KEYS},
        "steps_agree_with_stats": agree, "tokens": tokens,
    }


def sweep(world_sizes: list[int], device: torch.device, prompts: list, max_tokens: int, repeats: int) -> list[dict]:
    """Rows for every world size, each compared with the first (world size 1): speedup, efficiency, same tokens."""
    from minillm.parallel.shard import checkpoint_source

    config = checkpoint_source(MODEL)[0]
    rows = []
    for W in world_sizes:
        row = run_world_size(config, W, device, prompts, max_tokens, repeats)
        base = rows[0] if rows else row
        row["speedup"] = row["decode_tokens_per_s"] / base["decode_tokens_per_s"]
        row["scaling_efficiency"] = row["speedup"] / W
        row["same_tokens_as_world_size_1"] = row["tokens"] == base["tokens"]
        rows.append(row)
        print(f"[tp] {device.type} W={W}: {row['decode_tokens_per_s']:.1f} decode tokens/s "
              f"({row['speedup']:.2f}x W=1), step {row['step_s'] * 1e3:.1f} ms of which collectives "
              f"{row['collective_s_per_step'] * 1e3:.1f} ms, {row['all_reduces_per_step']:.0f} all-reduces/step, "
              f"{row['allreduce_bytes_per_token']:.0f} B all-reduced/token (predicted "
              f"{row['allreduce_bytes_per_token_predicted']}), same tokens: {row['same_tokens_as_world_size_1']}",
              flush=True)
        if not row["same_tokens_as_world_size_1"]:
            print(f"[tp] warning: W={W}'s greedy tokens differ from W=1's (a different summation order)", flush=True)
    for row in rows:
        del row["tokens"]
    return rows


def plan_world_sizes(requested: str | None, device: torch.device) -> tuple[list[int], str | None]:
    """World sizes to run on `device` (requested, or 1, 2, 3 on a CPU and 1, 2, 4, 8 up to the GPU count on CUDA), or
    why there is nothing to run there."""
    if device.type != "cuda":
        return [int(w) for w in (requested or "1,2,3").split(",")], None
    count = torch.cuda.device_count()
    if count < 2:
        return [], f"{count} CUDA GPU here; tensor parallelism across GPUs needs >= 2 (one per rank)"
    sizes = [int(w) for w in requested.split(",")] if requested else list(GPU_WORLD_SIZES)
    return [w for w in sizes if w <= count], None


def main(argv: list[str] | None = None) -> None:
    parser = make_parser("tp", __doc__.splitlines()[0])
    parser.add_argument("--world-sizes", default=None, help="comma-separated, starting at 1 (default: 1,2,3 on a "
                        "CPU, 1,2,4,8 up to the GPU count on CUDA)")
    parser.add_argument("--batch-size", type=int, default=None, help="chat requests served together (default 4)")
    parser.add_argument("--max-tokens", type=int, default=None, help="new tokens per request (32 CPU, 128 GPU)")
    parser.add_argument("--repeats", type=int, default=None, help="generate calls per world size (default 3)")
    parser.add_argument("--quick", action="store_true", help="tiny: 2 requests, 4 tokens, one round")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    world_sizes, skipped = plan_world_sizes(args.world_sizes, device)
    if world_sizes and (world_sizes[0] != 1 or min(world_sizes) < 1):
        parser.error(f"--world-sizes must start at 1 (the reference) and be positive, got {args.world_sizes}")
    batch = args.batch_size or (2 if args.quick else 4)
    repeats = args.repeats or (1 if args.quick else 3)
    if batch < 1 or repeats < 1 or batch > len(QUESTIONS):
        parser.error(f"need 1 <= --batch-size <= {len(QUESTIONS)} and --repeats >= 1")
    prompts = [[{"role": "user", "content": q}] for q in QUESTIONS[:batch]]
    max_tokens = args.max_tokens or (4 if args.quick else 128 if device.type == "cuda" else 32)

    wall_start, load_before = time.perf_counter(), os.getloadavg()
    part, other = ("gpu", "cpu") if device.type == "cuda" else ("cpu", "gpu")
    if skipped:
        print(f"[tp] skipped: {skipped}", flush=True)
        measured = {"skipped": skipped}
    else:
        measured = {"rows": sweep(world_sizes, device, prompts, max_tokens, repeats)}
        if part == "cpu":
            measured["note"] = "every world size shares the same cores"
    results = {
        "model": MODEL, "workload": {"prompts": prompts, "batch_size": batch, "greedy": True, "ignore_eos": True,
                                     "repeats": repeats, "max_tokens": max_tokens, "enforce_eager": True},
        "formulas": {"decode_tokens_per_s": "batch size / median decode step seconds",
                     "comm_to_compute": "collective seconds / (step seconds - collective seconds), rank 0, medians",
                     "allreduce_bytes_per_token": "rank 0's all-reduce bytes / tokens forwarded; predicted "
                                                  "(2 L + 1) C dtype_bytes",
                     "scaling_efficiency": "decode tokens/s at W / (W x decode tokens/s at W = 1)"},
        part: measured,
        other: {"skipped": f"--device {device.type}: the {other.upper()} sweep runs with --device "
                           f"{'cuda' if other == 'gpu' else 'cpu'}"},
        "wall_s": round(time.perf_counter() - wall_start, 1),
        # Other work on the machine hurts W = 1 most: one process whose threads wait on each other at every op.
        "load_average_1min": {"before": load_before[0], "after": os.getloadavg()[0]},
    }
    fig = None
    if "rows" in measured:
        rows = measured["rows"]
        fig = plot(rows, f"tensor parallelism, SmolLM2-135M, batch {batch}, {environment_info(device)['device']}: "
                   "decode tokens/s " + ", ".join(f"W={r['world_size']} {r['decode_tokens_per_s']:.1f}" for r in rows))
    for path in write_results("tp", results, fig, args.out, device):
        print(f"[tp] wrote {path}")
    print(f"[tp] total wall time {results['wall_s']:.0f} s")


def plot(rows: list[dict], title: str):
    import matplotlib

    matplotlib.use("Agg")
    from minillm.viz.parallel import plot_comm_vs_compute

    fig = plot_comm_vs_compute(rows)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig
