"""The engine benchmark's workload and its static-batching bound (the timed runs themselves are not tests)."""

from minillm.bench.engine import make_workload, static_bound


def test_workload_is_seeded_and_in_range():
    prompts, out_lens = make_workload(20, 5, 9, vocab_size=1000, seed=3)
    assert (prompts, out_lens) == make_workload(20, 5, 9, vocab_size=1000, seed=3)
    assert all(5 <= len(p) <= 9 for p in prompts) and all(5 <= n <= 9 for n in out_lens)
    assert all(100 <= t < 900 for p in prompts for t in p)


def test_static_bound_counts_decode_steps():
    # Two slots. Static: batches (10, 1) and (1, 1) take 10 + 1 steps. Continuous: the slot freed after step 1 serves
    # the three short requests one after another while the long one runs, so 10 steps.
    assert static_bound([10, 1, 1, 1], 2) == 11 / 10
    # Equal lengths leave no hole for continuous batching to fill.
    assert static_bound([7] * 12, 4) == 1.0
    # As many slots as requests: both run everything at once; the longest output sets the pace.
    assert static_bound([3, 9, 4, 1], 4) == 1.0
    # Not a mean-based estimate: continuous cannot beat its own longest request.
    assert static_bound([20, 1, 1, 1, 1, 1], 3) == (20 + 1) / 20
