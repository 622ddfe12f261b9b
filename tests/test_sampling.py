"""Sampling: filters keep the right tokens, seeds reproduce, bad parameters are clear errors."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minillm.engine.sampling import SamplingParams, apply_top_k, apply_top_p, make_generator, sample


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 5), st.integers(2, 40), st.floats(0.05, 1.0), st.integers(0, 2**31 - 1))
def test_top_p_keeps_smallest_prefix_reaching_p(rows, vocab, p, seed):
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed))
    kept = apply_top_p(logits, p) > float("-inf")
    probs = logits.softmax(-1)
    for r in range(rows):
        order = probs[r].argsort(descending=True)
        n_kept = int(kept[r].sum())
        assert kept[r, order[:n_kept]].all()  # the kept set is a prefix of the sorted order
        assert probs[r, order[:n_kept]].sum() >= p - 1e-6  # it reaches p
        assert n_kept == 1 or probs[r, order[: n_kept - 1]].sum() < p + 1e-6  # and is the smallest such prefix


def test_top_k_keeps_k():
    logits = torch.randn(3, 50)
    assert ((apply_top_k(logits, 5) > float("-inf")).sum(-1) == 5).all()
    assert torch.equal(apply_top_k(logits, 0), logits)


def test_greedy_is_argmax_and_seed_reproduces():
    logits = torch.randn(4, 100)
    greedy = SamplingParams(temperature=0.0)
    assert sample(logits, [greedy] * 4, [make_generator(0)] * 4) == logits.argmax(-1).tolist()
    hot = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=3)
    a = [sample(logits[:1], [hot], [make_generator(3)]) for _ in range(2)]
    assert a[0] == a[1]


def test_seeded_row_independent_of_batch():
    torch.manual_seed(0)
    logits = torch.randn(5, 100)
    p = SamplingParams(temperature=1.0, seed=7)
    alone = [sample(logits[2:3], [p], [make_generator(7)])[0] for _ in range(1)]
    gens = [make_generator(s) for s in (1, 2, 7, 4, 5)]
    together = sample(logits, [p] * 5, gens)
    assert together[2] == alone[0]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(temperature=-0.5), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(n=2), "n > 1 needs temperature"),
        (dict(stop=[""]), "stop"),
    ],
)
def test_impossible_params_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)
