"""Verification: keep the guesses the target model agrees with, so that speculation never changes what is generated.

In doing so, you will learn about:
  * greedy verification: the target scores the k guessed tokens in one forward pass (k + 1 query tokens: the last
    real token and the k guesses), giving its own argmax after each prefix. Guess i is kept while it equals the
    target's argmax at its position; at the first disagreement the target's argmax replaces it, and if all k are
    kept the target's argmax after the last guess is a free extra token. Every step emits between 1 and k + 1
    tokens, exactly the tokens greedy decoding without speculation emits;
  * speculative sampling (Leviathan et al., arXiv 2211.17192, algorithm 1 and appendix A.1; Chen et al., arXiv
    2302.01318, algorithm 2): a guess x drawn from the draft's distribution q is accepted with probability
    ``min(1, p(x) / q(x))``; on rejection, the replacement is drawn from the residual ``max(0, p - q)``, normalized.
    The token that comes out is distributed exactly as p: ``P(x) = q(x) min(1, p(x)/q(x)) + (1 - beta) r(x)
    = min(q(x), p(x)) + max(0, p(x) - q(x)) = p(x)``, where beta is the total acceptance probability;
  * a proposer without probabilities (prompt lookup, ``ngram.py``) is a draft whose q is one-hot on its guess: the
    guess is accepted with probability p(guess), and a rejection draws from p with the guess removed;
  * the expected number of tokens per step with acceptance rate alpha: ``(1 - alpha^(k+1)) / (1 - alpha)``.

Each request draws with its own generator, so a seeded request produces the same tokens in any batch.
Notebook 09 (``09_speculative_decoding``) draws p, q and the residual on a small vocabulary.

Shapes: k speculative tokens, V vocab.
"""

from __future__ import annotations

import torch


def greedy_accept(proposed: list[int], target_argmax: list[int]) -> list[int]:
    """The tokens greedy verification emits: the longest prefix of `proposed` (k) that matches `target_argmax`
    (k + 1: the target's argmax after each prefix), then the target's own token at the first mismatch (or after the
    last guess). Returns 1..k+1 tokens.

    Example: proposed [4, 7, 2], target_argmax [4, 7, 9, 3] -> [4, 7, 9] (two accepted, the third replaced).
    """
    if len(target_argmax) != len(proposed) + 1:
        raise ValueError(f"need k + 1 target tokens for k proposed, got {len(target_argmax)} for {len(proposed)}")
    emitted = []
    for guess, target in zip(proposed, target_argmax):
        if guess != target:
            break
        emitted.append(guess)
    emitted.append(target_argmax[len(emitted)])
    return emitted


def rejection_sample(
    proposed: list[int],
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor | None,
    generator: torch.Generator,
) -> list[int]:
    """The tokens speculative sampling emits for one sequence: 1..k+1 of them, distributed exactly as the target's.

    proposed: k guesses; target_probs (k + 1, V): the target's distribution after each prefix (already tempered and
    filtered by top-k/top-p, as plain sampling would use them); draft_probs (k, V): the draft's distributions the
    guesses were drawn from, or None for a proposer without probabilities (q one-hot on each guess). All draws use
    `generator` (CPU), in a fixed order: one uniform per guess, then one draw from the residual or the bonus row.
    """
    k = len(proposed)
    if target_probs.dim() != 2 or target_probs.shape[0] != k + 1:
        raise ValueError(f"target_probs must be (k + 1, V) = ({k + 1}, V), got {tuple(target_probs.shape)}")
    if draft_probs is not None and draft_probs.shape != (k, target_probs.shape[1]):
        raise ValueError(f"draft_probs must be (k, V) = ({k}, {target_probs.shape[1]}), got {tuple(draft_probs.shape)}")
    p_all = target_probs.detach().double().cpu()  # (k + 1, V): float64 so p / q and the residual lose nothing
    q_all = None if draft_probs is None else draft_probs.detach().double().cpu()  # (k, V)
    emitted = []
    for i, x in enumerate(proposed):
        p = p_all[i]  # (V,)
        q = torch.zeros_like(p).index_fill_(0, torch.tensor([x]), 1.0) if q_all is None else q_all[i]  # (V,)
        if q[x] <= 0:
            raise ValueError(f"guess {i} (token {x}) has draft probability 0: it cannot have been drawn from q")
        u = torch.rand((), dtype=torch.float64, generator=generator)
        if u < torch.clamp(p[x] / q[x], max=1.0):
            emitted.append(x)
            continue
        residual = torch.clamp(p - q, min=0.0)  # (V,) where the target wants more than the draft offered
        # A rejection has probability sum(residual) > 0, but rounding can leave an all-zero row: then p itself.
        weights = residual if residual.sum() > 0 else p
        emitted.append(int(torch.multinomial(weights, 1, generator=generator)))
        return emitted
    emitted.append(int(torch.multinomial(p_all[k], 1, generator=generator)))  # every guess accepted: a bonus token
    return emitted


def expected_tokens_per_step(acceptance_rate: float, num_speculative_tokens: int) -> float:
    """``(1 - a^(k+1)) / (1 - a)``: tokens emitted per verification step when each guess is accepted independently
    with probability a (Leviathan et al., equation 1); k + 1 at a = 1."""
    a, k = acceptance_rate, num_speculative_tokens
    if not 0.0 <= a <= 1.0 or k < 0:
        raise ValueError(f"need acceptance_rate in [0, 1] and num_speculative_tokens >= 0, got {a}, {k}")
    return float(k + 1) if a == 1.0 else (1 - a ** (k + 1)) / (1 - a)
