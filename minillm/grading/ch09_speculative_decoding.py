"""Chapter 9 checks (speculative decoding), used by solutions/09_speculative_decoding.ipynb.

Each check compares the learner's function with minillm's own on fixed cases and on fresh random ones (``ex.rng``,
a new seed every run) and tests the properties whose failure names the likely mistake: the longest match first and
its latest occurrence, never the suffix itself (9.1); the bonus token and the first disagreement (9.2); the output
distribution of speculative sampling (9.3); what a rollback does to shared, cached and private blocks (9.4); the
expected tokens per step at the edges (9.5) and an acceptance estimate that does not count unverified guesses
(9.6). The references are ``minillm.spec.propose_ngram``, ``greedy_accept``, ``rejection_sample`` and
``expected_tokens_per_step``, ``BlockManager.trim`` on a real manager, and the acceptance estimate of
``minillm.spec.proposers.Proposer``. Every check has plausible wrong answers in
tests/answers/ch09_speculative_decoding.py that it must reject.

Rejection sampling is checked by its *distribution*, not draw by draw: the learner's function runs on 1,500 to 2,000
seeds per case and the frequency of every token must land within a Hoeffding bound of the target probability. Any
order of random draws is right, as long as they all come from the ``generator`` argument.

Shapes: k speculative tokens, V vocab.
"""

from __future__ import annotations

import math
import numbers
import random
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

import torch

from minillm.grading.framework import assert_equal, exercise, generator

__all__ = [  # the checks, re-exported by minillm.grading
    "check_propose_ngram",
    "check_greedy_accept",
    "check_rejection_sample",
    "check_trim_blocks",
    "check_expected_tokens_per_step",
    "check_acceptance_estimate",
]


def _description(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return f"{type(x).__name__} {str(x)[:80]}"


def _token_list(got: Any, what: str) -> list[int]:
    """`got` as a list of Python ints, or an AssertionError that says what it was."""
    if not isinstance(got, list):
        raise AssertionError(f"{what}: expected a list of token ids, got {_description(got)}")
    bad = [t for t in got if type(t) is not int]
    if bad:
        raise AssertionError(
            f"{what}: the token ids must be Python ints (the engine appends them to a sequence), got "
            f"{type(bad[0]).__name__} {bad[0]!r}: use int(...) or .tolist()"
        )
    return got


# ---------------------------------------------------------------------------------------------------------------------
# Exercise 9.1: prompt lookup.
# ---------------------------------------------------------------------------------------------------------------------


def _ngram_variant(token_ids: list[int], k: int, max_n: int, min_n: int, longest_first: bool = True,
                   latest: bool = True) -> list[int]:
    """Prompt lookup with the search order changed: used only to name a learner's mistake in a failure message."""
    length = len(token_ids)
    sizes = list(range(min(max_n, length - 1), min_n - 1, -1))
    for n in sizes if longest_first else sizes[::-1]:
        starts = list(range(length - n - 1, -1, -1))
        for start in starts if latest else starts[::-1]:
            if token_ids[start : start + n] == token_ids[length - n :]:
                return token_ids[start + n : start + n + k]
    return []


def _copying_sequence(rng: random.Random) -> list[int]:
    """Token ids that copy themselves, as an edit of a document does: random tokens with earlier spans repeated."""
    vocab = rng.randint(3, 9)
    ids = [rng.randrange(vocab) for _ in range(rng.randint(3, 12))]
    for _ in range(rng.randint(1, 4)):
        start = rng.randrange(len(ids))
        ids += ids[start : start + rng.randint(1, 8)] + [rng.randrange(vocab) for _ in range(rng.randint(0, 3))]
    return ids


def check_propose_ngram(fn: Callable) -> None:
    """Exercise 9.1. `fn(token_ids, num_speculative_tokens, max_n, min_n) -> guesses`: prompt lookup.

    For n from `max_n` down to `min_n` (and at most len(token_ids) - 1): the latest earlier occurrence of the last n
    tokens (not the suffix itself) gives its continuation, up to `num_speculative_tokens` tokens and at most to the
    end of the sequence. [] when nothing matches. Same as ``minillm.spec.propose_ngram``.
    """
    from minillm.spec.ngram import propose_ngram

    def same(token_ids, k, max_n, min_n, what=None):
        what = what or f"propose_ngram({token_ids}, num_speculative_tokens={k}, max_n={max_n}, min_n={min_n})"
        given = list(token_ids)
        got = _token_list(fn(given, k, max_n, min_n), what)
        assert given == list(token_ids), f"{what}: your function changed token_ids to {given}: only read it"
        want = propose_ngram(list(token_ids), k, max_n, min_n)
        if got == want:
            return
        hint = ""
        if got == [] and want:
            hint = (": a match was there. Try every n from max_n down to min_n (at most len - 1), and start each "
                    "search at len - n - 1: the suffix itself always matches and has nothing after it")
        elif got == _ngram_variant(token_ids, k, max_n, min_n, latest=False):
            hint = ": that follows the earliest occurrence; take the latest one (search from the end backwards)"
        elif got == _ngram_variant(token_ids, k, max_n, min_n, longest_first=False):
            hint = ": that follows the shortest match; try the longest n first (max_n down to min_n)"
        elif len(got) > k:
            hint = f": at most num_speculative_tokens = {k} guesses"
        raise AssertionError(f"{what}: expected {want}, got {got}{hint}")

    def example():
        same([5, 6, 7, 9, 5, 6], 3, 2, 1)

    def longest_first():
        # [1, 2, 3] matched at 0 (followed by 4, 9); [3] alone also matched later, at 5 (followed by 8).
        same([1, 2, 3, 4, 9, 3, 8, 1, 2, 3], 3, 3, 1)
        same([1, 2, 3, 4, 9, 3, 8, 1, 2, 3], 2, 2, 1)

    def latest_occurrence():
        same([7, 1, 2, 7, 3, 4, 7], 3, 1, 1)
        same([2, 5, 0, 2, 5, 1, 1, 2, 5], 2, 2, 1)

    def nothing_matches():
        for ids in ([1, 2, 3, 4], [], [5], [8, 9]):
            same(ids, 3, 3, 1)

    def runs_to_the_end():
        same([1, 1, 1, 1], 3, 3, 1)  # the match at 0 overlaps the suffix; one token follows it
        same([4, 5, 4, 5, 4], 5, 3, 1)
        same([3, 0, 3], 4, 1, 1)

    def min_n():
        same([1, 2, 3, 9, 3], 3, 3, 2)  # only [3] matches, shorter than min_n
        same([1, 2, 3, 9, 3], 3, 3, 1)
        same([6, 7, 8, 6, 7, 8, 9, 6, 7], 4, 4, 2)

    def long_max_n():
        same([2, 2], 4, 5, 1)
        same([3, 1, 3], 2, 8, 1)
        same([1, 2, 1, 2], 1, 8, 2)

    def fresh_cases():
        for i in range(150):
            if i % 2:
                ids = [ex.rng.randrange(ex.rng.randint(2, 4)) for _ in range(ex.rng.randint(0, 30))]
            else:
                ids = _copying_sequence(ex.rng)
            max_n = ex.rng.randint(1, 5)
            same(ids, ex.rng.randint(1, 6), max_n, ex.rng.randint(1, max_n))

    with exercise("9.1", "prompt lookup") as ex:
        ex.check("the docstring's example: [5, 6, 7, 9, 5, 6] proposes [7, 9, 5]", example)
        ex.check("the longest n first: a 3-token match wins over a later 1-token one", longest_first)
        ex.check("the latest earlier occurrence of the suffix", latest_occurrence)
        ex.check("no earlier occurrence (or too few tokens) gives []; the suffix never matches itself",
                 nothing_matches)
        ex.check("a continuation stops at the end of the sequence (fewer guesses), even inside the suffix",
                 runs_to_the_end)
        ex.check("matches shorter than min_n do not count", min_n)
        ex.check("max_n longer than the sequence", long_max_n)
        ex.check("fresh random and self-copying token lists match minillm.spec.propose_ngram", fresh_cases)


# ---------------------------------------------------------------------------------------------------------------------
# Exercise 9.2: greedy acceptance.
# ---------------------------------------------------------------------------------------------------------------------


def check_greedy_accept(fn: Callable) -> None:
    """Exercise 9.2. `fn(proposed, target_argmax) -> emitted`: greedy verification.

    proposed: k guesses; target_argmax: k + 1 tokens, the target's argmax after each prefix. Returns the longest
    prefix of `proposed` that agrees with `target_argmax`, then the target's token at the first disagreement (or
    after the last guess): 1 to k + 1 tokens. Same as ``minillm.spec.greedy_accept``.
    """
    from minillm.spec.verify import greedy_accept

    def same(proposed, target, what=None):
        what = what or f"greedy_accept({proposed}, {target})"
        given_p, given_t = list(proposed), list(target)
        got = _token_list(fn(given_p, given_t), what)
        assert given_p == proposed and given_t == target, f"{what}: your function changed its inputs: only read them"
        want = greedy_accept(list(proposed), list(target))
        if got == want:
            return
        hint = ""
        if got == want[:-1]:
            hint = (": the target's own token comes last, after the accepted guesses: the replacement at the first "
                    "disagreement, or the bonus token after the last guess")
        elif len(got) == len(want) and got[:-1] == want[:-1] and got[-1] == proposed[len(got) - 1:len(got)]:
            hint = ": at the first disagreement emit the target's token, not the rejected guess"
        elif len(got) > len(want):
            hint = ": stop at the first disagreement (the guesses after it were scored on a wrong prefix)"
        raise AssertionError(f"{what}: expected {want}, got {got}{hint}")

    def example():
        same([4, 7, 2], [4, 7, 9, 3])

    def all_accepted():
        same([4, 7, 2], [4, 7, 2, 5])
        same([1], [1, 1])

    def first_rejected():
        same([4, 7, 2], [1, 7, 2, 5])
        same([3, 3, 3], [2, 3, 3, 3])

    def no_guesses():
        same([], [8])

    def shifted():
        same([2, 3], [1, 2, 3])  # the guesses equal the *next* targets: guess i is compared with target i
        same([5, 5, 6], [5, 6, 6, 0])

    def fresh_cases():
        for _ in range(200):
            k = ex.rng.randint(0, 8)
            proposed = [ex.rng.randrange(5) for _ in range(k)]
            keep = ex.rng.randint(0, k)
            target = proposed[:keep] + [ex.rng.randrange(5) for _ in range(k + 1 - keep)]
            same(proposed, target)

    with exercise("9.2", "greedy acceptance") as ex:
        ex.check("the docstring's example: [4, 7, 2] against [4, 7, 9, 3] emits [4, 7, 9]", example)
        ex.check("all guesses accepted: k + 1 tokens, the last the target's bonus token", all_accepted)
        ex.check("the first guess rejected: the target's token only, whatever matches later", first_rejected)
        ex.check("no guesses: the target's one token, as plain decoding", no_guesses)
        ex.check("guess i is compared with the target's token i (after the same prefix)", shifted)
        ex.check("fresh random guesses and targets match minillm.spec.greedy_accept", fresh_cases)


# ---------------------------------------------------------------------------------------------------------------------
# Exercise 9.3: speculative sampling, one rejection-sampling step.
# ---------------------------------------------------------------------------------------------------------------------

FALSE_ALARM = 1e-6  # probability that the distribution tests below reject a right answer, over the whole check

# A draft model's case (k = 2, V = 5): the target's rows p and the draft's rows q, where they disagree a lot.
P_DRAFT = [[0.50, 0.20, 0.15, 0.10, 0.05], [0.10, 0.10, 0.60, 0.10, 0.10], [0.05, 0.05, 0.10, 0.20, 0.60]]
Q_DRAFT = [[0.10, 0.20, 0.30, 0.10, 0.30], [0.25, 0.25, 0.30, 0.10, 0.10]]
# Prompt lookup's case: no draft probabilities (q one-hot on each guess), the guesses 1 then 3.
P_LOOKUP = [[0.15, 0.40, 0.25, 0.10, 0.10], [0.30, 0.10, 0.10, 0.50, 0.00], [0.20, 0.20, 0.20, 0.20, 0.20]]
GUESSES_LOOKUP = [1, 3]
NUM_COMPARISONS = 5  # distributions compared with p in the check: 3 for the draft's case, 2 for prompt lookup's
# Runs per case; each calls the learner's function once. The bound shrinks like 1/sqrt(n): ±0.067 on the draft's first
# token over 2000 runs, ±0.077 on prompt lookup's over 1500. The mistakes in tests/answers/ch09_speculative_decoding.py
# that only these distribution tests catch move a frequency by 0.2 to 0.6, over 2.5 times the bound on every seed the
# tests try: more runs would slow the check (and its tests, 20 seeds per answer) without catching more of them.
NUM_RUNS_DRAFT = 2000
NUM_RUNS_LOOKUP = 1500


def hoeffding_bound(num_samples: int, num_tokens: int, num_comparisons: int = NUM_COMPARISONS,
                    false_alarm: float = FALSE_ALARM) -> float:
    """The t with P(|frequency - p| >= t) <= false_alarm for every token of every comparison at once.

    Hoeffding: one token's frequency over n independent draws is off by t or more with probability at most
    2 exp(-2 n t²); a union bound over the V tokens of each of the m comparisons asks 2 m V exp(-2 n t²) <= delta.
    """
    return math.sqrt(math.log(2 * num_comparisons * num_tokens / false_alarm) / (2 * num_samples))


def _distribution_matches(tokens: list[int], p: list[float], what: str) -> None:
    n, V = len(tokens), len(p)
    assert n > 0, f"{what}: no samples (were any guesses accepted?)"
    freq = [0.0] * V
    for t in tokens:
        freq[t] += 1 / n
    bound = hoeffding_bound(n, V)
    worst = max(range(V), key=lambda v: abs(freq[v] - p[v]))
    if abs(freq[worst] - p[worst]) >= bound:
        raise AssertionError(
            f"{what}: over {n} draws token {worst} came out with frequency {freq[worst]:.3f}, but its target "
            f"probability is {p[worst]:.3f} (a right answer lands within ±{bound:.3f} except with probability "
            f"{FALSE_ALARM:g}: Hoeffding's bound over all tokens and comparisons of this check).\n"
            f"frequencies {[round(f, 3) for f in freq]}\ntarget p    {p}"
        )


def _sample(fn: Callable, proposed: list[int], target_probs: torch.Tensor, draft_probs: torch.Tensor | None,
            seed: int, what: str) -> list[int]:
    """One call on copies of the tensors (an in-place edit must not change the next call's inputs), checked for
    the shape every answer has: 1..k+1 Python ints, all but the last of them the first guesses."""
    got = fn(list(proposed), target_probs.clone(), None if draft_probs is None else draft_probs.clone(),
             generator(seed))
    got = _token_list(got, what)
    k = len(proposed)
    if not 1 <= len(got) <= k + 1:
        raise AssertionError(f"{what}: emitted {got}: a step emits 1 to k + 1 = {k + 1} tokens")
    if got[:-1] != proposed[: len(got) - 1]:
        raise AssertionError(
            f"{what}: emitted {got} for the guesses {proposed}: every token but the last is an accepted guess (the "
            "guesses are kept in order and the step stops at the first rejection)"
        )
    return got


def _draft_case(num: int, seed: int) -> tuple[list[list[int]], torch.Tensor, torch.Tensor]:
    """`num` pairs of guesses drawn from the draft's rows Q_DRAFT, as a draft model proposes them."""
    q = torch.tensor(Q_DRAFT)
    g = generator(seed)
    columns = [torch.multinomial(row, num, replacement=True, generator=g) for row in q]  # k x (num,)
    return torch.stack(columns, dim=1).tolist(), torch.tensor(P_DRAFT), q


def _random_probs(rng: random.Random, rows: int, V: int, zero_share: float) -> torch.Tensor:
    """Random distributions over V tokens, about `zero_share` of the entries 0 (filtered out), never a zero row."""
    probs = torch.tensor([[rng.random() ** 2 if rng.random() >= zero_share else 0.0 for _ in range(V)]
                          for _ in range(rows)]).reshape(rows, V)  # (rows, V), also for rows = 0
    for row in probs:
        if row.sum() == 0:
            row[rng.randrange(V)] = 1.0
    return probs / probs.sum(dim=-1, keepdim=True)


def check_rejection_sample(fn: Callable) -> None:
    """Exercise 9.3. `fn(proposed, target_probs, draft_probs, generator) -> emitted`: speculative sampling.

    proposed: k guesses; target_probs (k + 1, V) the target's distributions after each prefix; draft_probs (k, V) the
    draft's distributions the guesses were drawn from, or None (prompt lookup: q one-hot on each guess). Guess x is
    accepted with probability min(1, p(x) / q(x)); at the first rejection a token is drawn from max(0, p - q),
    normalized, and the step ends; when all k are accepted a bonus token is drawn from the last row of p. Raises
    ValueError for a guess with q(x) = 0. Every random draw uses `generator`; in any order (the check compares
    distributions, not individual draws). Returns 1..k+1 Python ints, distributed as ``minillm.spec.rejection_sample``.
    """

    def draft_model():
        """The first token over the runs, guesses drawn from q: exactly p's first row (Leviathan et al., A.1)."""
        proposals, p, q = _draft_case(NUM_RUNS_DRAFT, seed=ex.rng.randrange(2**31))
        base = ex.rng.randrange(2**31)
        runs = [(x, _sample(fn, x, p, q, base + i, what=f"guesses {x} from the draft's q, generator seed {base + i}"))
                for i, x in enumerate(proposals)]
        _distribution_matches([out[0] for _, out in runs], P_DRAFT[0],
                              what="the first emitted token (guesses drawn from q: it must be distributed as p[0])")
        second = [out[1] for x, out in runs if out[0] == x[0]]  # the first guess accepted
        _distribution_matches(second, P_DRAFT[1], what="the second token, when the first guess was accepted "
                                                       "(distributed as p[1])")
        all_accepted = [out for x, out in runs if out[:2] == x]
        if any(len(out) == 2 for out in all_accepted):
            raise AssertionError(
                f"emitted {next(out for out in all_accepted if len(out) == 2)}, the two guesses and nothing after "
                "them: when every guess is accepted, a bonus token from the last row of p follows (k + 1 tokens)"
            )
        bonus = [out[2] for out in all_accepted]
        _distribution_matches(bonus, P_DRAFT[2], what="the bonus token, when both guesses were accepted "
                                                      "(drawn from p[k], the last row)")

    def prompt_lookup():
        p = torch.tensor(P_LOOKUP)
        base = ex.rng.randrange(2**31)
        outs = [_sample(fn, GUESSES_LOOKUP, p, None, base + i, what=f"draft_probs None, seed {base + i}")
                for i in range(NUM_RUNS_LOOKUP)]
        _distribution_matches([o[0] for o in outs], P_LOOKUP[0],
                              what=f"the first emitted token, guesses {GUESSES_LOOKUP} without draft_probs (q "
                                   "one-hot on the guess: accepted with probability p(guess), else a draw from p "
                                   "with the guess removed; distributed as p[0])")
        _distribution_matches([o[1] for o in outs if o[0] == GUESSES_LOOKUP[0]], P_LOOKUP[1],
                              what="the second token without draft_probs, when the first guess was accepted")

    def p_equals_q():
        probs = torch.tensor(P_DRAFT)
        for seed in range(20):
            got = _sample(fn, [0, 2], probs, probs[:2], seed, what="p == q")
            assert got[:2] == [0, 2], (
                f"p == q, guesses [0, 2], seed {seed}: emitted {got}; min(1, p(x) / q(x)) = 1 accepts every guess"
            )

    def bonus_token():
        # p one-hot on each guess: p(x) / q(x) >= 1 accepts it; the bonus row is one-hot on token 4.
        p = torch.tensor([[0.0, 1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0]])
        q = torch.tensor(Q_DRAFT)
        for seed in range(5):
            got = _sample(fn, [1, 3], p, q, seed, what=f"p one-hot on the guesses [1, 3], seed {seed}")
            assert_equal(got, [1, 3, 4], what="all guesses accepted: the guesses, then the bonus token from the last "
                                              "row of p (one-hot on 4)")
            got = _sample(fn, [1, 3], p, None, seed, what=f"the same without draft_probs, seed {seed}")
            assert_equal(got, [1, 3, 4], what="all guesses accepted without draft_probs: then the bonus token")

    def no_guesses():
        for seed in range(5):
            got = _sample(fn, [], torch.tensor([[0.0, 0.0, 1.0, 0.0, 0.0]]), None, seed, what="no guesses")
            assert_equal(got, [2], what="no guesses (k = 0, target_probs one row, one-hot on 2): one token from it")

    def residual():
        # Guess 0 has p = 0: always rejected. max(0, p - q) is one-hot on 3; p itself would also give 1.
        p = torch.tensor([[0.0, 0.3, 0.0, 0.7, 0.0], [0.2] * 5])
        q = torch.tensor([[0.5, 0.5, 0.0, 0.0, 0.0]])
        for seed in range(200):
            got = _sample(fn, [0], p, q, seed, what=f"a guess with p = 0, seed {seed}")
            assert got == [3], (
                f"p[0] = {p[0].tolist()}, q[0] = {q[0].tolist()}, guess 0 (p = 0: always rejected), seed {seed}: "
                f"emitted {got}, expected [3], the only token of the residual max(0, p - q) (draw the replacement "
                "from the residual, not from p: p's mass on token 1 was already offered by q)"
            )

    def rejected_guess_not_redrawn():
        # Without draft_probs the residual is p without the guess: a rejected guess never comes back.
        p = torch.tensor([[0.1, 0.6, 0.1, 0.1, 0.1], [0.2] * 5])
        for seed in range(200):
            got = _sample(fn, [1], p, None, seed, what=f"draft_probs None, guess 1 with p = 0.6, seed {seed}")
            if len(got) == 1:
                assert got != [1], (
                    f"guess 1 rejected, then token 1 drawn again (seed {seed}): without draft_probs q is one-hot on "
                    "the guess, so the residual max(0, p - q) is p with the guess removed"
                )

    def zero_draft_probability():
        p = torch.tensor(P_DRAFT)
        q = torch.tensor([[0.0, 0.25, 0.25, 0.25, 0.25], Q_DRAFT[1]])
        try:
            got = fn([0, 2], p.clone(), q.clone(), generator(0))
        except ValueError:
            return
        raise AssertionError(
            f"guess 0 has draft probability q(0) = 0 but p(0) = 0.5: it cannot have been drawn from q, so the inputs "
            f"are inconsistent; raise ValueError (you returned {got!r})"
        )

    def uses_the_generator():
        p, q = torch.tensor(P_DRAFT), torch.tensor(Q_DRAFT)
        with torch.random.fork_rng(devices=[]):  # leave the learner's global RNG as it was
            for seed in range(30):
                torch.manual_seed(seed)
                first = _sample(fn, [2, 4], p, q, seed, what=f"generator seed {seed}")
                torch.manual_seed(10_000 + seed)
                again = _sample(fn, [2, 4], p, q, seed, what=f"generator seed {seed}, again")
                assert first == again, (
                    f"two calls with generators seeded {seed} emitted {first} then {again}: draw every random number "
                    "from `generator` (torch.rand(..., generator=generator), torch.multinomial(..., "
                    "generator=generator)), not from the global RNG, so that a seeded request is reproducible"
                )

    def fresh_cases():
        for _ in range(60):
            V, k = ex.rng.randint(2, 12), ex.rng.randint(0, 5)
            p = _random_probs(ex.rng, k + 1, V, zero_share=0.3)
            use_draft = ex.rng.random() < 0.6
            q = _random_probs(ex.rng, k, V, zero_share=0.3) if use_draft else None
            if ex.rng.random() < 0.3:
                p = p.double()
                q = None if q is None else q.double()
            proposed = ([int(torch.multinomial(row, 1, generator=generator(ex.rng.randrange(2**31)))) for row in q]
                        if use_draft else [ex.rng.randrange(V) for _ in range(k)])
            seed = ex.rng.randrange(2**31)
            what = f"fresh case V={V}, k={k}, {'a draft q' if use_draft else 'draft_probs None'}, seed {seed}"
            got = _sample(fn, proposed, p, q, seed, what=what)
            i, last = len(got) - 1, got[-1]
            if i < k:  # guess i was rejected: the replacement comes from max(0, p - q)
                q_row = q[i] if use_draft else torch.nn.functional.one_hot(torch.tensor(proposed[i]), V)
                assert p[i, last] > q_row[last], (
                    f"{what}: guess {i} rejected and replaced by token {last}, where p = {p[i, last]:.3f} <= q = "
                    f"{q_row[last]:.3f}: the replacement must come from the residual max(0, p - q)"
                )
            else:
                assert p[k, last] > 0, f"{what}: bonus token {last} has probability 0 in p's last row"

    with exercise("9.3", "speculative sampling") as ex:
        ex.check("p == q accepts every guess", p_equals_q)
        ex.check("all guesses accepted: then a bonus token from the last row of p", bonus_token)
        ex.check("no guesses: one token from p", no_guesses)
        ex.check("a rejection draws its replacement from the residual max(0, p - q)", residual)
        ex.check("without draft_probs a rejected guess is never drawn again", rejected_guess_not_redrawn)
        ex.check("a guess with q(x) = 0 raises ValueError", zero_draft_probability)
        ex.check("every draw comes from `generator`: the same seed emits the same tokens", uses_the_generator)
        ex.check(f"a draft model's guesses: the emitted tokens are distributed exactly as the target's p "
                 f"({NUM_RUNS_DRAFT} seeds, Hoeffding bound)", draft_model)
        ex.check(f"prompt lookup (draft_probs None, q one-hot): distributed as p too ({NUM_RUNS_LOOKUP} seeds)",
                 prompt_lookup)
        ex.check("fresh random p and q (zeros, float64, k = 0..5): replacements from the residual, bonus from p[k]",
                 fresh_cases)


# ---------------------------------------------------------------------------------------------------------------------
# Exercise 9.4: rolling back the KV blocks of rejected guesses.
# ---------------------------------------------------------------------------------------------------------------------


def _trim_blocks_ref(block_table: list[int], num_written_blocks: int, num_tokens: int, block_size: int,
                     ref_counts: list[int], block_hashes: list[int | None], free_block_ids: list[int],
                     evictable: dict[int, None]) -> None:
    """``BlockManager.trim`` on the exercise's plain lists, in place: the lists become a real manager's state (one
    sequence, its chain `num_written_blocks` long), the manager trims, and its state is copied back."""
    from minillm.kvcache.blocks import BlockManager

    bm = BlockManager(len(ref_counts), block_size)
    bm.tables[0], bm.seq_hashes[0] = list(block_table), [0] * num_written_blocks  # trim reads only the chain's length
    bm.ref_counts, bm.block_hashes = list(ref_counts), list(block_hashes)
    bm.free_block_ids, bm.evictable = deque(free_block_ids), OrderedDict.fromkeys(evictable)
    bm.trim(0, num_tokens)
    block_table[:], ref_counts[:], free_block_ids[:] = bm.tables[0], bm.ref_counts, bm.free_block_ids
    evictable.clear()
    evictable.update(bm.evictable)


def _pool_state(block_table, num_written_blocks, block_size, ref_counts, block_hashes) -> str:
    held = ", ".join(f"{b}: ref {ref_counts[b]}" + (", hashed" if block_hashes[b] is not None else "")
                     for b in block_table)
    return (f"block size {block_size}, block_table {block_table} ({num_written_blocks} written full blocks, "
            f"{len(block_table) * block_size} slots; {held})")


def _compare_trim(fn: Callable, block_table: list[int], num_written_blocks: int, num_tokens: int, block_size: int,
                  ref_counts: list[int], block_hashes: list[int | None], free_block_ids: list[int],
                  evictable: dict[int, None], what: str = "") -> None:
    """The learner's trim and the manager's on copies of one state: same error, same lists afterwards."""
    pool = _pool_state(block_table, num_written_blocks, block_size, ref_counts, block_hashes)
    state = f"{what + ': ' if what else ''}{pool}, trim to {num_tokens} tokens"
    mine = [list(block_table), list(ref_counts), list(block_hashes), list(free_block_ids), dict.fromkeys(evictable)]
    ref = [list(block_table), list(ref_counts), list(block_hashes), list(free_block_ids), dict.fromkeys(evictable)]
    try:
        _trim_blocks_ref(ref[0], num_written_blocks, num_tokens, block_size, ref[1], ref[2], ref[3], ref[4])
        refused = None
    except ValueError as e:
        refused = e
    before = [list(x) if isinstance(x, list) else dict(x) for x in mine]
    try:
        fn(mine[0], num_written_blocks, num_tokens, block_size, mine[1], mine[2], mine[3], mine[4])
    except ValueError as e:
        if refused is None:
            raise AssertionError(f"{state}: you raised ValueError ({e}), but this trim is allowed") from None
        names = ["block_table", "ref_counts", "block_hashes", "free_block_ids", "evictable"]
        changed = [name for name, a, b in zip(names, mine, before) if a != b]
        assert not changed, f"{state}: refused, but your function had already changed {changed}: check first"
        return
    if refused is not None:
        raise AssertionError(
            f"{state}: expected ValueError ({refused}); num_tokens must lie in [num_written_blocks * block_size, "
            "len(block_table) * block_size]: below, the trim would give back K/V already written and hashed into the "
            "prefix cache; above, the sequence has no such slots"
        )
    table, refs, hashes, free, evict = mine
    want_table, want_refs, want_hashes, want_free, want_evict = ref
    keep = len(want_table)
    if table != want_table:
        hint = ""
        if len(table) == keep + 1 and num_tokens % block_size == 0:
            hint = f": {num_tokens} tokens fill exactly {keep} blocks of {block_size}, so keep ceil(num_tokens / BS)"
        elif len(table) == keep - 1:
            hint = f": {num_tokens} tokens need ceil({num_tokens} / {block_size}) = {keep} blocks"
        raise AssertionError(f"{state}: block_table: expected {want_table}, got {table}{hint}")
    released = block_table[keep:]
    if refs != want_refs:
        assert_equal(len(refs), len(want_refs), what=f"{state}: len(ref_counts) (one count per block of the pool)")
        b = next(b for b in range(len(refs)) if refs[b] != want_refs[b])
        raise AssertionError(
            f"{state}: ref count of block {b}: expected {want_refs[b]}, got {refs[b]} (each released block loses "
            f"one reference: the blocks released here are {released})"
        )
    assert_equal(hashes, want_hashes, what=f"{state}: block_hashes (a released block keeps its hash: evictable blocks "
                                           "stay findable in the prefix cache until a fresh block is needed)")
    if free != want_free or list(evict) != list(want_evict):
        shared = [b for b in released if want_refs[b] > 0]
        hashed = [b for b in released if want_refs[b] == 0 and want_hashes[b] is not None]
        hint = []
        if shared:
            hint.append(f"{shared} still have holders (ref count > 0) and go nowhere")
        if hashed:
            hint.append(f"{hashed} hold a hash and become evictable, not free")
        if sorted(free) == sorted(want_free) and sorted(evict) == sorted(want_evict):
            hint.append("release the blocks last first (block_table.pop()), as BlockManager.free does")
        raise AssertionError(
            f"{state}: free_block_ids expected {want_free}, got {free}; evictable expected {list(want_evict)}, got "
            f"{list(evict)}" + (f" ({'; '.join(hint)})" if hint else "")
        )


def _random_pool(rng: random.Random) -> tuple:
    """A random consistent pool: one sequence's table with written (hashed) head blocks, tail blocks that are shared,
    cached by someone else, or private; the rest of the pool free, evictable or held by other sequences."""
    block_size = rng.choice([1, 2, 4, 8])
    num_blocks = rng.randint(6, 20)
    ids = rng.sample(range(num_blocks), num_blocks)
    table, others = ids[: rng.randint(1, min(7, num_blocks))], ids[num_blocks // 2 :]
    num_written = rng.randint(0, len(table))
    ref_counts, hashes = [0] * num_blocks, [None] * num_blocks
    for i, b in enumerate(table):
        ref_counts[b] = 1 + (rng.random() < 0.3) * rng.randint(1, 3)  # some are shared (forks, prefix hits)
        if i < num_written or rng.random() < 0.3:  # written blocks are hashed; a tail block may be, by another holder
            hashes[b] = rng.randrange(2**40)
    free, evictable = [], {}
    for b in others:
        if b in table:
            continue
        kind = rng.random()
        if kind < 0.3:
            ref_counts[b] = rng.randint(1, 2)
        elif kind < 0.55:
            hashes[b] = rng.randrange(2**40)
            evictable[b] = None
        else:
            free.append(b)
    free += [b for b in range(num_blocks) if ref_counts[b] == 0 and hashes[b] is None and b not in free]
    if rng.random() < 0.15:  # refused: into the written blocks, or past the slots
        num_tokens = len(table) * block_size + rng.randint(1, block_size)
        if num_written and rng.random() < 0.5:
            num_tokens = num_written * block_size - rng.randint(1, block_size)
    else:
        low = num_written * block_size
        num_tokens = rng.choice([rng.randint(low, len(table) * block_size), low, low + block_size])
        num_tokens = min(num_tokens, len(table) * block_size)
    return table, num_written, num_tokens, block_size, ref_counts, hashes, free, evictable


def _block_manager_run(rng: random.Random, num_ops: int = 60):
    """Drive a real BlockManager through random operations: prompts (some sharing a cached prefix), forks,
    verification steps as the engine takes them (reserve slots for k guesses, commit the accepted tokens, trim the
    rest), and, in any order, spare slots reserved, commits, trims of any length, frees. Yields (bm, seq_id,
    num_tokens) before every trim; the caller trims. Forks of a sequence holding spare slots share blocks past its
    tokens, and a sibling's commit into a shared block hashes it: trims then meet shared and cached blocks too."""
    from minillm.kvcache.blocks import BlockManager

    block_size = rng.choice([1, 2, 4])
    bm = BlockManager(rng.randint(32, 96), block_size, enable_prefix_caching=rng.random() < 0.7)
    system = [rng.randrange(3) for _ in range(rng.randint(0, 8))]
    tokens: dict[int, list[int]] = {}  # each sequence's token ids; its K/V is written up to its last commit
    next_id = 0

    def fits(seq_id, num_tokens):
        return bm.can_allocate(bm.num_blocks_needed(seq_id, num_tokens))

    for _ in range(num_ops):
        action = rng.random()
        if len(tokens) < 2 or action < 0.12:  # a new request, prefilled in one step
            prompt = system + [rng.randrange(3) for _ in range(rng.randint(1, 7))]
            bm.allocate_prompt(next_id, prompt)
            if not fits(next_id, len(prompt)):
                bm.free(next_id)
                continue
            bm.ensure_capacity(next_id, len(prompt))
            bm.commit(next_id, prompt, len(prompt))
            tokens[next_id] = prompt + [rng.randrange(3)]  # the sampled token, not computed yet
            next_id += 1
            continue
        seq_id = rng.choice(list(tokens))
        ids, slots = tokens[seq_id], len(bm.tables[seq_id]) * block_size
        written = len(bm.seq_hashes[seq_id]) * block_size
        if action < 0.22:  # parallel sampling: the child shares every block, spare slots included
            bm.fork(seq_id, next_id)
            tokens[next_id] = list(ids)
            next_id += 1
        elif action < 0.3:
            bm.free(seq_id)
            del tokens[seq_id]
        elif action < 0.36:  # a forked sibling writes the spare slots it shares (hashing them), then finishes
            bm.fork(seq_id, next_id)
            sibling = ids + [rng.randrange(3) for _ in range(max(0, slots - len(ids)))]
            bm.commit(next_id, sibling, rng.randint(written, min(len(sibling), slots)))
            bm.free(next_id)
            next_id += 1
        elif action < 0.44:  # spare slots reserved (copy-on-write of the shared blocks they touch)
            num_tokens = len(ids) + rng.randint(1, 6)
            if fits(seq_id, num_tokens):
                bm.ensure_capacity(seq_id, num_tokens)
        elif action < 0.52:  # K/V written into the slots, whoever else holds them
            ids += [rng.randrange(3) for _ in range(max(0, slots - len(ids)))]
            bm.commit(seq_id, ids, rng.randint(written, min(len(ids), slots)))
        elif action < 0.64:  # a trim of any length, allowed or refused
            num_tokens = rng.choice([written, slots, rng.randint(written, slots), written - 1, slots + 1])
            yield bm, seq_id, num_tokens
            del ids[max(len(bm.tables[seq_id]) * block_size, written, 1):]
        else:  # a verification step: the last token and k guesses written, a + 1 tokens come out
            k = rng.randint(1, 5)
            if not fits(seq_id, len(ids) + k):
                continue
            bm.ensure_capacity(seq_id, len(ids) + k)
            accepted = rng.randint(0, k)
            num_computed = len(ids) + accepted  # the K/V of the last token and of the accepted guesses
            ids += [rng.randrange(3) for _ in range(accepted + 1)]
            bm.commit(seq_id, ids, num_computed)
            yield bm, seq_id, min(len(ids), len(bm.tables[seq_id]) * block_size)


def check_trim_blocks(fn: Callable) -> None:
    """Exercise 9.4. `fn(block_table, num_written_blocks, num_tokens, block_size, ref_counts, block_hashes,
    free_block_ids, evictable) -> None`: give back the KV blocks of rejected guesses, in place.

    Keep ``ceil(num_tokens / block_size)`` blocks of `block_table`; release the others last first: each loses one
    reference (`ref_counts`), and a block nobody holds any more goes to `free_block_ids` (append) when it has no hash,
    or becomes evictable (``evictable[b] = None``) when it has one (``block_hashes[b] is not None``). Raise ValueError,
    changing nothing, unless ``num_written_blocks * block_size <= num_tokens <= len(block_table) * block_size``.
    Same as ``BlockManager.trim``.
    """

    def example():
        # Block size 4: blocks 4, 1 hold positions 0-7, block 6 the spare slots of two rejected guesses (8, 9).
        _compare_trim(fn, [4, 1, 6], 1, 8, 4, [0, 1, 0, 0, 1, 0, 1], [None] * 7, [0, 2, 3, 5], {},
                      what="the worked example")

    def partial_last_block():
        _compare_trim(fn, [4, 1, 6], 1, 5, 4, [0, 1, 0, 0, 1, 0, 1], [None] * 7, [0, 2, 3, 5], {})
        _compare_trim(fn, [0, 1, 2, 3], 0, 1, 2, [1, 1, 1, 1], [None] * 4, [], {})

    def block_boundary():
        _compare_trim(fn, [3, 5, 7, 2], 1, 8, 4, [0, 0, 1, 1, 0, 1, 0, 1], [None] * 8, [0, 1, 4, 6], {})
        _compare_trim(fn, [3, 5, 7, 2], 0, 4, 4, [0, 0, 1, 1, 0, 1, 0, 1], [None] * 8, [0, 1, 4, 6], {})

    def nothing_to_give_back():
        _compare_trim(fn, [2, 0], 0, 8, 4, [1, 0, 1, 0], [None] * 4, [1, 3], {})
        _compare_trim(fn, [2, 0], 0, 6, 4, [1, 0, 1, 0], [None] * 4, [1, 3], {})

    def release_order():
        _compare_trim(fn, [5, 1, 3, 0, 4], 0, 2, 2, [1, 1, 0, 1, 1, 1], [None] * 6, [2], {})
        _compare_trim(fn, [5, 1, 3, 0, 4], 0, 0, 2, [1, 1, 0, 1, 1, 1], [None] * 6, [2], {})

    def shared_block():
        # Block 6 is shared with a forked sibling (ref 2): it only loses this sequence's reference.
        _compare_trim(fn, [4, 1, 6], 1, 5, 4, [0, 1, 0, 0, 1, 0, 2], [None] * 7, [0, 2, 3, 5], {})
        _compare_trim(fn, [4, 1, 6, 3], 1, 5, 4, [0, 1, 0, 1, 1, 0, 2], [None] * 7, [0, 2, 5], {})

    def hashed_block():
        # Block 6 holds a hash (another holder wrote and cached it, then left): it stays findable, as evictable.
        hashes = [None] * 7
        hashes[6], hashes[2] = 1234, 99
        _compare_trim(fn, [4, 1, 6], 1, 5, 4, [0, 1, 0, 0, 1, 0, 1], hashes, [0, 3, 5], {2: None})
        hashes[4] = 777  # the written head block is hashed too; it stays
        _compare_trim(fn, [4, 1, 6, 3], 1, 4, 4, [0, 1, 0, 1, 1, 0, 1], hashes, [0, 5], {2: None})

    def refused():
        hashes = [None, 11, None, None, 22, None, None]
        # Two written (hashed) full blocks of 4: 8 tokens at least. And at most 3 blocks * 4 = 12 slots.
        for num_tokens in (7, 0, 13):
            _compare_trim(fn, [4, 1, 6], 2, num_tokens, 4, [0, 1, 0, 0, 1, 0, 1], hashes, [0, 2, 3, 5], {})
        _compare_trim(fn, [4, 1, 6], 2, 8, 4, [0, 1, 0, 0, 1, 0, 1], hashes, [0, 2, 3, 5], {})

    def random_pools():
        for _ in range(150):
            _compare_trim(fn, *_random_pool(ex.rng), what="a fresh random pool")

    def manager_runs():
        for run in range(20):
            for bm, seq_id, num_tokens in _block_manager_run(ex.rng):
                table = bm.tables[seq_id]
                free, evictable = list(bm.free_block_ids), dict.fromkeys(bm.evictable)
                _compare_trim(fn, list(table), len(bm.seq_hashes[seq_id]), num_tokens, bm.block_size,
                              list(bm.ref_counts), list(bm.block_hashes), free, evictable,
                              what=f"block manager run {run}, sequence {seq_id}")
                try:
                    bm.trim(seq_id, num_tokens)
                except ValueError:
                    pass

    with exercise("9.4", "rolling back rejected guesses' KV blocks") as ex:
        ex.check("the worked example: 8 tokens of block size 4 keep 2 blocks, the third returns to the free list",
                 example)
        ex.check("a partly filled last block is kept", partial_last_block)
        ex.check("a trim to a block boundary keeps exactly num_tokens / block_size blocks", block_boundary)
        ex.check("a trim inside the last block gives nothing back", nothing_to_give_back)
        ex.check("several blocks go back last first", release_order)
        ex.check("a shared block only loses a reference", shared_block)
        ex.check("a block with a hash becomes evictable (keeping its hash), not free", hashed_block)
        ex.check("a trim into the written blocks or past the slots raises ValueError and changes nothing", refused)
        ex.check("fresh random pools (shared, cached, free, evictable blocks) match BlockManager.trim", random_pools)
        ex.check("a real BlockManager driven by prompts, forks, commits, verification steps and frees: every trim "
                 "matches", manager_runs)


# ---------------------------------------------------------------------------------------------------------------------
# Exercise 9.5: expected tokens per verification step.
# ---------------------------------------------------------------------------------------------------------------------


def check_expected_tokens_per_step(fn: Callable) -> None:
    """Exercise 9.5. `fn(acceptance_rate, num_speculative_tokens) -> float`: ``(1 - a^(k+1)) / (1 - a)``, the
    expected tokens a verification step emits when each guess is accepted with probability a; k + 1 at a = 1.
    Same as ``minillm.spec.expected_tokens_per_step``.
    """
    from minillm.spec.verify import expected_tokens_per_step

    def same(a, k, what=None):
        what = what or f"expected_tokens_per_step({a:g}, {k})"
        got = fn(a, k)
        if not isinstance(got, numbers.Real) or isinstance(got, bool):
            raise AssertionError(f"{what}: expected a number, got {_description(got)}")
        want = expected_tokens_per_step(a, k)
        if math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-12):
            return
        hint = ""
        if abs(got - (want - 1)) < 1e-9 * want:
            hint = (": that counts the accepted guesses only; every step also emits the target's own token (the "
                    "replacement or the bonus)")
        elif k and abs(got - expected_tokens_per_step(a, k - 1)) < 1e-9 * want:
            hint = ": that is one guess short: the sum runs over a^0 .. a^k, k + 1 terms"
        raise AssertionError(f"{what}: expected {want!r}, got {got!r}{hint}")

    def example():
        same(0.8, 4)

    def edges():
        for k in (0, 1, 3, 8):
            same(0.0, k, what=f"a = 0, k = {k} (every guess rejected: one token, the target's own)")
            same(1.0, k, what=f"a = 1, k = {k} (every guess accepted: k + 1 tokens; 1 - a = 0, so no division)")
        same(0.6, 0, what="k = 0 (no guesses: the target's one token)")

    def grid():
        for a in (0.1, 0.3, 0.5, 0.7, 0.9, 0.99):
            for k in range(1, 9):
                same(a, k)

    def fresh_cases():
        for _ in range(50):
            same(ex.rng.random() * 0.999, ex.rng.randint(0, 16))

    with exercise("9.5", "expected tokens per step") as ex:
        ex.check("a = 0.8, k = 4 matches the reference", example)
        ex.check("a = 0 gives 1 token, a = 1 gives k + 1, k = 0 gives 1", edges)
        ex.check("a grid of rates and k", grid)
        ex.check("fresh random rates and k match minillm.spec.expected_tokens_per_step", fresh_cases)


# ---------------------------------------------------------------------------------------------------------------------
# Exercise 9.6: the acceptance estimate.
# ---------------------------------------------------------------------------------------------------------------------


def _acceptance_estimate_ref(observations: list[tuple[int, int]], decay: float) -> float:
    """What ``Proposer.observe`` / ``Proposer.acceptance_estimate`` compute from (num_proposed, num_accepted) steps,
    oldest first, with the decay as an argument: accepted / (accepted + rejections), older evidence weighted by
    decay per step; 1.0 before any evidence."""
    accepted = rejections = 0.0
    for num_proposed, num_accepted in observations:
        accepted = decay * accepted + num_accepted
        rejections = decay * rejections + (1.0 if num_accepted < num_proposed else 0.0)
    return 1.0 if accepted + rejections == 0 else accepted / (accepted + rejections)


def check_acceptance_estimate(fn: Callable) -> None:
    """Exercise 9.6. `fn(observations, decay) -> float`: the acceptance rate, estimated from verification steps.

    observations: (num_proposed, num_accepted) of each step, oldest first, 1 <= num_proposed, 0 <= num_accepted <=
    num_proposed. A step shows num_accepted accepted guesses and one rejection unless all were accepted (the guesses
    after a rejection were never verified). Returns accepted / (accepted + rejections), where a step's counts are
    weighted by decay^(steps after it); 1.0 with no observations. What ``minillm.spec.proposers.Proposer`` estimates
    (there with decay ``minillm.spec.proposers.DECAY``).
    """

    def same(observations, decay, what=None):
        what = what or f"acceptance_estimate({observations}, decay={decay:g})"
        got = fn([tuple(o) for o in observations], decay)
        if not isinstance(got, numbers.Real) or isinstance(got, bool):
            raise AssertionError(f"{what}: expected a number, got {_description(got)}")
        want = _acceptance_estimate_ref(observations, decay)
        if math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-12):
            return
        hint = ""
        proposed = sum(k for k, _ in observations)
        if proposed and decay == 1 and math.isclose(got, sum(a for _, a in observations) / proposed, rel_tol=1e-9):
            hint = (": that divides by every guess proposed, but the guesses after a rejection were never verified "
                    "(they would have been scored on a wrong prefix): count one rejection per step that had one")
        elif decay < 1 and math.isclose(got, _acceptance_estimate_ref(observations, 1.0), rel_tol=1e-9):
            hint = f": that weights every step alike; weight a step by decay^(number of steps after it), decay={decay}"
        raise AssertionError(f"{what}: expected {want!r}, got {got!r}{hint}")

    def example():
        same([(4, 4), (4, 1), (4, 2)], 1.0)
        same([(4, 4), (4, 1), (4, 2)], 0.8)

    def unverified_guesses_do_not_count():
        same([(5, 0)], 1.0, what="one step, its first guess rejected (the other 4 were never verified)")
        same([(5, 2), (5, 0), (3, 3)], 1.0)

    def all_accepted():
        same([(3, 3)], 1.0, what="every guess accepted: no rejection seen, the estimate is 1")
        same([(3, 3), (2, 2), (4, 4)], 0.5)

    def no_evidence():
        same([], 0.8, what="no observations yet (the engine tries speculating first): 1.0")

    def decay():
        same([(4, 0), (4, 0), (4, 4), (4, 4)], 0.5, what="two bad steps, then two good ones with decay 0.5: the "
                                                          "recent steps weigh more")
        same([(4, 4), (4, 4), (4, 0), (4, 0)], 0.5)
        same([(2, 1), (6, 6)], 0.0, what="decay 0: only the latest step counts")

    def fresh_cases():
        for _ in range(100):
            steps = []
            for _ in range(ex.rng.randint(1, 12)):
                k = ex.rng.randint(1, 6)
                steps.append((k, ex.rng.choice([0, k, ex.rng.randint(0, k)])))
            same(steps, ex.rng.choice([1.0, 0.8, ex.rng.random()]))

    with exercise("9.6", "the acceptance estimate") as ex:
        ex.check("three steps with and without decay match the reference", example)
        ex.check("the guesses after a rejection were never verified: they are no rejections",
                 unverified_guesses_do_not_count)
        ex.check("a step with every guess accepted shows no rejection", all_accepted)
        ex.check("no observations: 1.0", no_evidence)
        ex.check("older steps weigh decay^(steps after them)", decay)
        ex.check("fresh random steps and decays match the reference", fresh_cases)
