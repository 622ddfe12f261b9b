"""minillm.viz.batching: the slot grid matches the timeline, the figures build (no display)."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from minillm.engine import simulate as sim  # noqa: E402
from minillm.viz.batching import (  # noqa: E402
    draw_slots,
    draw_step_costs,
    mark_preemptions,
    mean_batch_size,
    scheduler_figure,
    simulate_arrivals,
    slot_grid,
)


def test_slot_grid_is_slots_by_steps_with_holes_as_nan():
    tl = sim.Timeline("static", slots=[[0, None], [0, 1], [None, 1]])
    grid = slot_grid(tl)
    assert grid.shape == (2, 3)
    assert grid[0, :2].tolist() == [0, 0] and np.isnan(grid[0, 2])
    assert np.isnan(grid[1, 0]) and grid[1, 1:].tolist() == [1, 1]


def test_slot_grid_holds_every_scheduled_request_of_a_simulation():
    reqs = sim.random_requests(10, rate=0, min_len=4, max_len=20, seed=1)
    tl = sim.simulate(reqs, max_num_seqs=4, max_num_batched_tokens=64, policy="continuous")
    grid = slot_grid(tl)
    assert grid.shape == (4, tl.num_steps)
    assert set(np.unique(grid[~np.isnan(grid)]).astype(int)) == set(range(10))


def test_figures_build():
    fig = scheduler_figure(rate=0.5, num_blocks=24, num_requests=12)
    ax_slots, ax_pool = fig.axes[:2]
    assert "continuous" in ax_slots.get_title() and "preemptions" in ax_slots.get_title()
    assert len(ax_pool.lines) >= 2  # the pool's fill level and its size
    plt.close(fig)

    fig, ax = plt.subplots()
    tl = sim.Timeline("static", slots=[[0, None]], preemptions=[0, 2, 0, 1])
    draw_slots(tl, ax, "t")
    mark_preemptions(ax, tl.preemptions)
    assert ax.get_title() == "t" and len(ax.lines) == 2  # one red line per step that preempted
    plt.close(fig)

    fig, ax = plt.subplots()
    draw_step_costs(ax, {"static": ([8, 64], [0.01, 0.02]), "continuous": ([12], [0.015])}, "cost")
    assert len(ax.collections) == 2 and ax.get_ylim()[0] == 0
    plt.close(fig)


def test_simulate_arrivals_is_seeded_and_mean_batch_size_counts_occupied_slots():
    reqs, tl = simulate_arrivals(rate=1.0, num_blocks=64, num_requests=10)
    again = simulate_arrivals(rate=1.0, num_blocks=64, num_requests=10)[1]
    assert len(reqs) == 10 and tl.slots == again.slots
    assert 0 < mean_batch_size(tl) <= 8
    assert mean_batch_size(sim.Timeline("static", slots=[[0, None], [0, 1]])) == 1.5
