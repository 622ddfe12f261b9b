"""Pipeline parallelism, simulated: the layers split over devices, microbatches flowing through them, and the bubble.

Tensor parallelism (the rest of this package) cuts every layer across W devices; pipeline parallelism (GPipe,
arXiv 1811.06965) cuts the *stack* instead: stage s of P holds layers [s L / P, (s + 1) L / P) whole, runs them, and
sends its output activation, one (T, C) tensor per microbatch, to stage s + 1. That is the only communication, one
point-to-point send per stage boundary, against tensor parallelism's two all-reduces in every layer.

The price is the **bubble**. A batch split into M microbatches enters the first stage one after another; stage s
starts only when microbatch 0 has crossed the s stages before it, and has nothing to do at the end while the last
microbatch crosses the stages after it. Forward only, as in inference, the GPipe schedule of P = 3, M = 4 is

    slot      0   1   2   3   4   5
    stage 0   0   1   2   3   .   .        (microbatch id; '.' idle)
    stage 1   .   0   1   2   3   .
    stage 2   .   .   0   1   2   3

M + P - 1 slots of which each stage is busy M, so the idle share of the devices is
``bubble_fraction(P, M) = (P - 1) / (M + P - 1)``: 1/3 here. (Megatron-LM, arXiv 2104.04473 section 2.2, counts the
bubble against the ideal time instead, (P - 1) / M: the same idle slots, another denominator.) More microbatches
shrink it; an inference engine fills the pipeline with *different batches of requests* in flight at once (vLLM runs
one scheduler "virtual engine" per stage), since one decode step of one batch cannot be split without waiting.

With a compute time per stage and a send time per hop, the pipeline is a line of 2P - 1 servers (P stages, P - 1
links) that each handle the microbatches in order, so the last one finishes at

    step_time = sum(stage times) + sum(send times) + (M - 1) * max(every stage and send time)

(the first microbatch crosses everything, then one leaves every "slowest server" interval). ``pipeline_times``
simulates it event by event and the tests check the closed form against it.

Why engines use **tensor parallelism within a node and pipeline parallelism across nodes** (Megatron-LM, arXiv
2104.04473 section 3.3; vLLM's docs say tensor_parallel_size = GPUs per node, pipeline_parallel_size = nodes): tensor
parallelism puts 2L + 1 all-reduces on the critical path of every step, each waiting on the slowest rank, which only
a fast in-node link (NVLink, hundreds of GB/s) makes cheap; in exchange each rank reads 1/W of the weights, so a
single request's step gets faster. Pipeline parallelism sends P - 1 activations per microbatch and tolerates a slower
link between nodes (InfiniBand), but a token still crosses every layer in sequence: it adds throughput, not latency.
Notebook 11 draws the schedule (``minillm.viz.parallel.plot_pipeline``).
"""

from __future__ import annotations

Schedule = list[list[int | None]]  # schedule[stage][slot]: the microbatch that stage runs in that slot, or None


def check_pipeline(num_stages: int, num_microbatches: int) -> None:
    for name, value in [("num_stages", num_stages), ("num_microbatches", num_microbatches)]:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def gpipe_schedule(num_stages: int, num_microbatches: int) -> Schedule:
    """The forward-only GPipe schedule: P stages x (M + P - 1) slots; stage s runs microbatch t - s in slot t."""
    check_pipeline(num_stages, num_microbatches)
    P, M = num_stages, num_microbatches
    return [[t - s if 0 <= t - s < M else None for t in range(M + P - 1)] for s in range(P)]


def bubble_fraction(num_stages: int, num_microbatches: int) -> float:
    """Idle share of the stages' time in a GPipe schedule: (P - 1) / (M + P - 1) (see the module docstring)."""
    check_pipeline(num_stages, num_microbatches)
    return (num_stages - 1) / (num_microbatches + num_stages - 1)


def idle_fraction(schedule: Schedule) -> float:
    """Measured idle share of a schedule: idle (stage, slot) cells over all cells."""
    cells = [m for row in schedule for m in row]
    return sum(m is None for m in cells) / len(cells)


def layers_per_stage(num_layers: int, num_stages: int) -> list[range]:
    """Contiguous layer ranges of each stage, the earlier stages one layer longer when they do not divide."""
    check_pipeline(num_stages, 1)
    if num_stages > num_layers:
        raise ValueError(f"num_stages={num_stages} is more than the {num_layers} layers: some stage would hold none")
    sizes = [num_layers // num_stages + (s < num_layers % num_stages) for s in range(num_stages)]
    starts = [sum(sizes[:s]) for s in range(num_stages)]
    return [range(a, a + n) for a, n in zip(starts, sizes)]


def _stage_and_send_times(stage_s: float | list[float], send_s: float, num_stages: int) -> list[float]:
    stages = [float(stage_s)] * num_stages if isinstance(stage_s, (int, float)) else [float(t) for t in stage_s]
    if len(stages) != num_stages:
        raise ValueError(f"got {len(stages)} stage times for {num_stages} stages")
    if min(stages) < 0 or send_s < 0:
        raise ValueError(f"times must be >= 0, got stage_s={stage_s!r}, send_s={send_s!r}")
    return stages


def pipeline_times(stage_s: float | list[float], send_s: float, num_stages: int,
                   num_microbatches: int) -> tuple[list[list[float]], list[list[float]]]:
    """Event simulation: (start, end) seconds, each [microbatch][stage], of every forward in the pipeline.

    A stage starts microbatch m once it finished m - 1 and m's activation arrived from the stage before (its end
    there plus `send_s`); a link carries one activation at a time, so sends also queue in order.
    """
    check_pipeline(num_stages, num_microbatches)
    stages = _stage_and_send_times(stage_s, send_s, num_stages)
    P, M = num_stages, num_microbatches
    start = [[0.0] * P for _ in range(M)]
    end = [[0.0] * P for _ in range(M)]
    link_free = [0.0] * P  # link_free[s]: when the link into stage s is free again
    for m in range(M):
        for s in range(P):
            ready = 0.0
            if s > 0:  # the activation crosses the link into s after the previous stage and the previous send
                sent = max(end[m][s - 1], link_free[s]) + send_s
                link_free[s] = sent
                ready = sent
            start[m][s] = max(ready, end[m - 1][s] if m > 0 else 0.0)
            end[m][s] = start[m][s] + stages[s]
    return start, end


def step_time(stage_s: float | list[float], send_s: float, num_stages: int, num_microbatches: int) -> float:
    """Seconds until the last microbatch leaves the last stage: sum of every stage and send time, plus (M - 1) times
    the slowest of them (the module docstring's formula). `stage_s`: one time for every stage, or a list of P."""
    check_pipeline(num_stages, num_microbatches)
    stages = _stage_and_send_times(stage_s, send_s, num_stages)
    servers = stages + [float(send_s)] * (num_stages - 1)
    return sum(servers) + (num_microbatches - 1) * max(servers)
