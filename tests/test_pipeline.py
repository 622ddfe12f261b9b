"""minillm.parallel.pipeline: the GPipe schedule's properties, its measured idle share against the bubble formula, and
the step-time formula against the event simulation. Pure Python, no model."""

import itertools

import pytest

from minillm.parallel.pipeline import (
    bubble_fraction,
    gpipe_schedule,
    idle_fraction,
    layers_per_stage,
    pipeline_times,
    step_time,
)

SIZES = list(itertools.product([1, 2, 3, 4, 7], [1, 2, 3, 5, 8]))  # (P, M)


@pytest.mark.parametrize("P, M", SIZES)
def test_every_microbatch_visits_every_stage_in_order(P, M):
    schedule = gpipe_schedule(P, M)
    assert len(schedule) == P and all(len(row) == M + P - 1 for row in schedule)
    for m in range(M):
        slots = [[t for t, x in enumerate(row) if x == m] for row in schedule]
        assert all(len(s) == 1 for s in slots), f"microbatch {m} runs once per stage: {slots}"
        visits = [s[0] for s in slots]
        assert all(b > a for a, b in itertools.pairwise(visits)), f"microbatch {m} goes back a stage: {visits}"


@pytest.mark.parametrize("P, M", SIZES)
def test_a_stage_runs_microbatches_in_order_and_one_at_a_time(P, M):
    for row in gpipe_schedule(P, M):  # one entry per slot: a stage cannot do two things at once
        busy = [x for x in row if x is not None]
        assert busy == list(range(M))


@pytest.mark.parametrize("P, M", SIZES)
def test_measured_idle_share_is_the_bubble_fraction(P, M):
    assert idle_fraction(gpipe_schedule(P, M)) == pytest.approx(bubble_fraction(P, M))


def test_bubble_fraction_values():
    assert bubble_fraction(1, 5) == 0  # one stage never waits
    assert bubble_fraction(3, 4) == pytest.approx(1 / 3)  # the module docstring's drawing
    assert bubble_fraction(4, 1) == pytest.approx(3 / 4)  # one microbatch: one stage busy at a time
    assert bubble_fraction(4, 1000) < 0.01  # many microbatches hide it
    with pytest.raises(ValueError, match="num_microbatches must be a positive int, got 0"):
        bubble_fraction(2, 0)
    with pytest.raises(ValueError, match="num_stages"):
        gpipe_schedule(0, 2)


@pytest.mark.parametrize("stage_s, send_s", [(1.0, 0.0), (1.0, 0.25), (1.0, 3.0), ([1.0, 2.5, 0.5], 0.2),
                                              ([0.3, 0.1, 0.2], 1.0)])
@pytest.mark.parametrize("M", [1, 2, 6])
def test_step_time_formula_matches_the_simulation(stage_s, send_s, M):
    P = 3
    start, end = pipeline_times(stage_s, send_s, P, M)
    assert step_time(stage_s, send_s, P, M) == pytest.approx(end[-1][-1])
    for m, s in itertools.product(range(M), range(P)):
        if s:  # a stage starts only after the stage before finished and the activation arrived
            assert start[m][s] >= end[m][s - 1] + send_s - 1e-12
        if m:  # and after its previous microbatch: never two at once
            assert start[m][s] >= end[m - 1][s] - 1e-12


def test_without_sends_the_step_takes_the_schedules_slots():
    assert step_time(2.0, 0.0, 4, 5) == pytest.approx(2.0 * len(gpipe_schedule(4, 5)[0]))


def test_layers_per_stage_cover_the_stack_once():
    ranges = layers_per_stage(30, 4)
    assert [len(r) for r in ranges] == [8, 8, 7, 7]
    assert [i for r in ranges for i in r] == list(range(30))
    with pytest.raises(ValueError, match="num_stages=5 is more than the 4 layers"):
        layers_per_stage(4, 5)
