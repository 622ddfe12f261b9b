"""minillm.spec: prompt lookup's proposals, greedy verification, and speculative sampling's output distribution.

The distribution tests draw N tokens and compare every token's frequency with its target probability. By
Hoeffding's inequality and a union bound over V tokens, a correct sampler exceeds ``sqrt(log(2V/delta) / (2N))`` on
any token with probability at most delta = 1e-6 (the stated false-alarm rate); the plausible wrong samplers kept
below differ from the target by several times that bound and must fail.
"""

import math

import pytest
import torch

from minillm.spec.ngram import propose_ngram
from minillm.spec.verify import expected_tokens_per_step, greedy_accept, rejection_sample

DELTA = 1e-6
N = 20_000


def bound(vocab_size: int, n: int = N) -> float:
    return math.sqrt(math.log(2 * vocab_size / DELTA) / (2 * n))


def random_probs(rows: int, vocab_size: int, seed: int, concentration: float = 0.5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    gamma = torch._standard_gamma(torch.full((rows, vocab_size), concentration, dtype=torch.float64), generator=g)
    return gamma / gamma.sum(-1, keepdim=True)  # (rows, V) Dirichlet draws: uneven, some near 0


def first_token_frequencies(sampler, p: torch.Tensor, q: torch.Tensor | None, k: int, seed: int) -> torch.Tensor:
    """Frequencies of the first emitted token over N verification steps, each with fresh guesses drawn from q."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.zeros(p.shape[1], dtype=torch.float64)
    for _ in range(N):
        proposed = ([int(torch.multinomial(q[i], 1, generator=g)) for i in range(k)] if q is not None
                    else [2] * k)  # a proposer without probabilities always guesses token 2 here
        counts[sampler(proposed, p, q, g)[0]] += 1
    return counts / N


# -- prompt lookup ------------------------------------------------------------------------------------------------


def test_propose_ngram_examples():
    assert propose_ngram([5, 6, 7, 9, 5, 6], 3, max_n=2) == [7, 9, 5]  # the docstring's example
    assert propose_ngram([5, 6, 7, 9, 5, 6], 10, max_n=2) == [7, 9, 5, 6]  # as many as exist
    assert propose_ngram([1, 2, 3, 4], 2) == []  # nothing repeats
    assert propose_ngram([], 2) == [] and propose_ngram([7], 2) == []
    # The longest match wins over a later, shorter one: [8, 1, 2] matches at 0 (-> 3), [2] alone at 5 (-> 6).
    assert propose_ngram([8, 1, 2, 3, 0, 2, 6, 8, 1, 2], 1, max_n=3) == [3]
    # Among equal lengths, the latest occurrence: [4] is followed by 5 at 0 and by 6 at 2.
    assert propose_ngram([4, 5, 4, 6, 4], 1, max_n=1) == [6]
    assert propose_ngram([1, 1, 1, 1], 3) == [1]  # overlapping runs: the match may overlap the suffix
    for bad in [dict(num_speculative_tokens=0), dict(num_speculative_tokens=2, min_n=0),
                dict(num_speculative_tokens=2, max_n=1, min_n=2)]:
        with pytest.raises(ValueError):
            propose_ngram([1, 2, 1], **bad)


def test_propose_ngram_guesses_are_what_followed():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        ids = torch.randint(0, 4, (int(torch.randint(2, 30, (1,), generator=g)),), generator=g).tolist()
        guess = propose_ngram(ids, 4, max_n=3)
        if not guess:
            assert all(ids[i] != ids[-1] for i in range(len(ids) - 1)), ids  # even a 1-gram match would propose
            continue
        # Some earlier position followed by exactly the guess ends with at least the last token.
        assert any(ids[s + 1 : s + 1 + len(guess)] == guess and ids[s] == ids[-1] for s in range(len(ids) - 1)), ids


# -- greedy verification ------------------------------------------------------------------------------------------


def test_greedy_accept():
    assert greedy_accept([4, 7, 2], [4, 7, 9, 3]) == [4, 7, 9]
    assert greedy_accept([4, 7, 2], [4, 7, 2, 3]) == [4, 7, 2, 3]  # all accepted: a bonus token
    assert greedy_accept([4, 7, 2], [5, 7, 2, 3]) == [5]  # the first guess is wrong: still one token
    assert greedy_accept([], [8]) == [8]
    with pytest.raises(ValueError, match="k \\+ 1"):
        greedy_accept([1, 2], [1, 2])


# -- speculative sampling -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3])
def test_rejection_sampling_emits_the_target_distribution(k):
    V = 6
    p, q = random_probs(k + 1, V, seed=k), random_probs(k, V, seed=10 + k)
    freq = first_token_frequencies(rejection_sample, p, q, k, seed=1)
    assert (freq - p[0]).abs().max() < bound(V), (freq, p[0])
    # The draft alone is far from the target here: the test can tell them apart.
    assert (q[0] - p[0]).abs().max() > 4 * bound(V)


def test_rejection_sampling_without_draft_probabilities():
    V, k = 5, 2
    p = random_probs(k + 1, V, seed=3)
    freq = first_token_frequencies(rejection_sample, p, None, k, seed=2)
    assert (freq - p[0]).abs().max() < bound(V), (freq, p[0])


def always_accept(proposed, p, q, g):  # wrong: keeps every guess, so the output follows the draft
    return proposed + [int(torch.multinomial(p[len(proposed)], 1, generator=g))]


def resample_from_target(proposed, p, q, g):  # wrong: on rejection draws from p instead of max(0, p - q)
    x = proposed[0]
    if torch.rand((), dtype=torch.float64, generator=g) < min(1.0, float(p[0, x] / q[0, x])):
        return [x]
    return [int(torch.multinomial(p[0], 1, generator=g))]


@pytest.mark.parametrize("wrong", [always_accept, resample_from_target])
def test_wrong_samplers_fail_the_distribution_test(wrong):
    V, k = 6, 1
    p, q = random_probs(k + 1, V, seed=1), random_probs(k, V, seed=11)
    freq = first_token_frequencies(wrong, p, q, k, seed=1)
    assert (freq - p[0]).abs().max() > bound(V), (freq, p[0])


def test_rejection_sampling_edge_cases():
    V = 4
    p = random_probs(3, V, seed=5)
    g = torch.Generator().manual_seed(0)
    for _ in range(50):  # p == q: never a rejection, every step emits k + 1 tokens
        proposed = [int(torch.multinomial(p[i], 1, generator=g)) for i in range(2)]
        assert len(rejection_sample(proposed, p, p[:2], g)) == 3
    q = p[:2].clone()
    q[0] = torch.tensor([0.0, 0.0, 0.5, 0.5], dtype=torch.float64)
    with pytest.raises(ValueError, match="draft probability 0"):
        rejection_sample([0, 1], p, q, g)  # token 0 cannot come from a draft that gives it 0
    out = [rejection_sample([2, 1], p, q, torch.Generator().manual_seed(s)) for s in range(20)]
    assert out == [rejection_sample([2, 1], p, q, torch.Generator().manual_seed(s)) for s in range(20)]  # seeded
    with pytest.raises(ValueError, match="target_probs"):
        rejection_sample([1, 2], p[:2], None, g)
    with pytest.raises(ValueError, match="draft_probs"):
        rejection_sample([1, 2], p, p, g)


def test_expected_tokens_per_step():
    assert expected_tokens_per_step(0.0, 4) == 1.0
    assert expected_tokens_per_step(1.0, 4) == 5.0
    assert expected_tokens_per_step(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)
    with pytest.raises(ValueError):
        expected_tokens_per_step(1.5, 2)


# -- rollback in the block manager --------------------------------------------------------------------------------


def test_trim_gives_back_the_blocks_of_rejected_guesses():
    from minillm.kvcache.blocks import BlockManager

    bm = BlockManager(num_blocks=8, block_size=4)
    prompt = list(range(10))
    bm.allocate_prompt(0, prompt)
    bm.ensure_capacity(0, 10)
    bm.commit(0, prompt, 10)  # 2 full blocks hashed, 2 tokens in the third
    free_before = bm.num_free_blocks
    bm.ensure_capacity(0, 10 + 1 + 5)  # the last token and 5 guesses: positions up to 15 -> 4 blocks
    assert len(bm.block_table(0)) == 4 and bm.num_free_blocks == free_before - 1
    accepted = prompt + [50, 51]  # 2 guesses accepted: 12 tokens written and kept
    bm.commit(0, accepted, 12)
    bm.trim(0, 12)
    assert len(bm.block_table(0)) == 3 and bm.num_free_blocks == free_before
    assert len(bm.seq_hashes[0]) == 3  # the third block (tokens 8..11) is full and accepted: hashed
    with pytest.raises(ValueError, match="trim of sequence 0"):
        bm.trim(0, 11)  # into a written, hashed block
    # A forked child shares the blocks: trimming the child only drops its references.
    bm.ensure_capacity(0, 14)
    bm.fork(0, 1)
    bm.trim(1, 12)
    assert len(bm.block_table(0)) == 4 and len(bm.block_table(1)) == 3
    bm.free(0)
    bm.free(1)
    assert bm.num_free_blocks == 8 and all(r == 0 for r in bm.ref_counts)
