"""Pictures of batching: who sits in which batch slot at every step, the KV pool's fill level, what a step costs.

In doing so, you will see:
  * static batching (a batch runs until its longest member is done) leave holes in the batch that continuous
    batching, iteration-level scheduling (Orca, Yu et al., OSDI 2022), refills the step after they open;
  * preemption under a small KV pool (vLLM, Kwon et al., arXiv:2309.06180, section 4.5) as red marks on the
    pool's fill level;
  * what one engine step costs against the number of tokens it carries: whether fewer, fuller steps pay off
    depends on that curve (nearly flat for a decode step on a GPU, rising with the tokens on a CPU).
Every timeline is drawn from ``minillm.engine.simulate``, which runs the real ``Scheduler`` and ``BlockManager``.
Used by notebooks/05_continuous_batching.ipynb. Matplotlib and NumPy only.
"""

from __future__ import annotations

import numpy as np

from minillm.engine import simulate as sim


def slot_grid(timeline: sim.Timeline) -> np.ndarray:
    """(num_slots, num_steps) float array: the request in each batch slot at each step, NaN for an empty slot."""
    grid = np.array([[np.nan if r is None else r for r in step] for step in timeline.slots], dtype=float)
    return grid.T


def draw_slots(timeline: sim.Timeline, ax, title: str = "") -> None:
    """Batch slot (rows) x step (columns), colored by the request that occupies it; white = a hole."""
    ax.imshow(slot_grid(timeline), aspect="auto", interpolation="nearest", cmap="tab20")
    ax.set_xlabel("step")
    ax.set_ylabel("batch slot")
    ax.set_title(title)


def mark_preemptions(ax, preemptions: list[int]) -> None:
    """A red vertical line at every step that preempted at least one sequence."""
    for step, n in enumerate(preemptions):
        if n:
            ax.axvline(step, color="tab:red", alpha=0.4)


def simulate_arrivals(
    rate: float = 0.5,
    num_blocks: int = 64,
    policy: str = "continuous",
    num_requests: int = 40,
    seed: int = 3,
    max_num_seqs: int = 8,
    max_num_batched_tokens: int = 256,
) -> tuple[list[sim.Request], sim.Timeline]:
    """The widget's workload: Poisson arrivals, `rate` per step, lengths uniform in [8, 96]; -> (requests, timeline)."""
    reqs = sim.random_requests(num_requests, rate=rate, min_len=8, max_len=96, seed=seed)
    tl = sim.simulate(reqs, num_blocks=num_blocks, max_num_seqs=max_num_seqs,
                      max_num_batched_tokens=max_num_batched_tokens, policy=policy)
    return reqs, tl


def mean_batch_size(timeline: sim.Timeline) -> float:
    """Occupied batch slots per step, averaged over the steps."""
    return sum(r is not None for step in timeline.slots for r in step) / max(1, timeline.num_steps)


def scheduler_figure(rate: float = 0.5, num_blocks: int = 64, policy: str = "continuous", **kwargs):
    """Draw `simulate_arrivals(rate, num_blocks, policy, **kwargs)`: the batch slots, then the KV pool's fill level."""
    import matplotlib.pyplot as plt

    reqs, tl = simulate_arrivals(rate, num_blocks, policy, **kwargs)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(12, 4.5), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    draw_slots(tl, ax1, f"{policy}, rate {rate}/step, {num_blocks} blocks: {tl.num_steps} steps, "
                        f"{sum(tl.preemptions)} preemptions, mean latency {np.mean(tl.latency(reqs)):.0f} steps")
    ax2.plot(tl.blocks_used)
    ax2.axhline(num_blocks, color="k", ls="--")
    mark_preemptions(ax2, tl.preemptions)
    ax2.set_ylabel("KV blocks")
    ax2.set_xlabel("step")
    fig.tight_layout()
    return fig


def draw_step_costs(ax, runs: dict[str, tuple[list[int], list[float]]], title: str = "") -> None:
    """Scatter each step's wall time (ms) against its tokens; `runs` maps a label to (tokens, seconds) per step."""
    for label, (tokens, seconds) in runs.items():
        ax.scatter(tokens, [1e3 * s for s in seconds], s=8, alpha=0.6, label=label)
    ax.set_xlabel("tokens in the step")
    ax.set_ylabel("step time, ms")
    ax.set_ylim(bottom=0)
    ax.set_title(title)
    ax.legend()
