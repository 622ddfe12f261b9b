"""Chapter 09's graded checks against right answers and plausible wrong ones (collected by tests/test_grading.py).

A wrong answer is a mistake a learner would plausibly make, written as a small function with a comment saying what
is wrong; every check must reject each of its wrong answers and pass each right answer on every random seed. The
last tests recompute the worked example above each exercise in the solution notebook with minillm's reference, and
tie the checks' own references to the package's.
"""

import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import minillm
from answers.worked_examples import check_worked_examples
from minillm import grading
from minillm.grading.ch09_speculative_decoding import (
    _acceptance_estimate_ref,
    _block_manager_run,
    _trim_blocks_ref,
    hoeffding_bound,
)
from minillm.spec import expected_tokens_per_step, greedy_accept, propose_ngram, rejection_sample
from minillm.spec.proposers import DECAY, Proposer

RIGHT_ANSWERS = []
WRONG_ANSWERS = []


# ---------------------------------------------------------------------------------------------------------------------
# 9.1 prompt lookup
# ---------------------------------------------------------------------------------------------------------------------


def propose_ngram_right(token_ids, num_speculative_tokens, max_n, min_n):  # the solution notebook's answer
    length = len(token_ids)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        suffix = token_ids[length - n :]
        for start in range(length - n - 1, -1, -1):
            if token_ids[start : start + n] == suffix:
                return token_ids[start + n : start + n + num_speculative_tokens]
    return []


def propose_ngram_forward_scan(token_ids, num_speculative_tokens, max_n, min_n):
    # Scans forward and keeps the last match it sees: the latest occurrence too.
    for n in range(max_n, min_n - 1, -1):
        if n >= len(token_ids):
            continue
        suffix, found = tuple(token_ids[-n:]), None
        for start in range(len(token_ids) - n):
            if tuple(token_ids[start : start + n]) == suffix:
                found = start
        if found is not None:
            return list(token_ids[found + n : found + n + num_speculative_tokens])
    return []


def _lookup(token_ids, k, sizes, starts_of, follow_of=None):
    """Prompt lookup with its search order given: sizes of n, then starts for each n."""
    length = len(token_ids)
    for n in sizes:
        if n < 1 or n > length - 1:
            continue
        for start in starts_of(n):
            if token_ids[start : start + n] == token_ids[length - n :]:
                return (follow_of or (lambda s, n: token_ids[s + n : s + n + k]))(start, n)
    return []


def propose_ngram_shortest_first(token_ids, num_speculative_tokens, max_n, min_n):
    # Wrong: tries n = min_n first: a 1-token match (which almost any token has) wins over a specific 3-token one.
    return _lookup(token_ids, num_speculative_tokens, range(min_n, max_n + 1),
                   lambda n: range(len(token_ids) - n - 1, -1, -1))


def propose_ngram_earliest(token_ids, num_speculative_tokens, max_n, min_n):
    # Wrong: the earliest occurrence instead of the latest.
    return _lookup(token_ids, num_speculative_tokens, range(max_n, min_n - 1, -1),
                   lambda n: range(0, len(token_ids) - n))


def propose_ngram_matches_itself(token_ids, num_speculative_tokens, max_n, min_n):
    # Wrong: the search starts at the suffix itself, which always matches and has nothing after it.
    return _lookup(token_ids, num_speculative_tokens, range(max_n, min_n - 1, -1),
                   lambda n: range(len(token_ids) - n, -1, -1))


def propose_ngram_only_max_n(token_ids, num_speculative_tokens, max_n, min_n):
    # Wrong: tries n = max_n only (capped at the length), never falls back to shorter matches.
    n = min(max_n, len(token_ids) - 1)
    return _lookup(token_ids, num_speculative_tokens, [n], lambda n: range(len(token_ids) - n - 1, -1, -1))


def propose_ngram_needs_k_tokens(token_ids, num_speculative_tokens, max_n, min_n):
    # Wrong: skips a match with fewer than k tokens after it, instead of proposing the tokens there are.
    length, k = len(token_ids), num_speculative_tokens
    return _lookup(token_ids, k, range(max_n, min_n - 1, -1), lambda n: range(length - n - k, -1, -1))


def propose_ngram_ignores_min_n(token_ids, num_speculative_tokens, max_n, min_n):
    # Wrong: goes down to n = 1 whatever min_n says.
    return propose_ngram(token_ids, num_speculative_tokens, max_n, 1)


def propose_ngram_skips_min_n(token_ids, num_speculative_tokens, max_n, min_n):
    # Wrong: range(max_n, min_n, -1) stops one short: n = min_n is never tried.
    return _lookup(token_ids, num_speculative_tokens, range(max_n, min_n, -1),
                   lambda n: range(len(token_ids) - n - 1, -1, -1))


def propose_ngram_includes_match(token_ids, num_speculative_tokens, max_n, min_n):
    # Wrong: proposes from the start of the match: the matched n-gram itself comes back as the guesses.
    return _lookup(token_ids, num_speculative_tokens, range(max_n, min_n - 1, -1),
                   lambda n: range(len(token_ids) - n - 1, -1, -1),
                   lambda s, n: token_ids[s : s + num_speculative_tokens])


def propose_ngram_stops_before_suffix(token_ids, num_speculative_tokens, max_n, min_n):
    # Wrong: the continuation may not run into the suffix (it stops where the suffix starts).
    length = len(token_ids)
    return _lookup(token_ids, num_speculative_tokens, range(max_n, min_n - 1, -1),
                   lambda n: range(length - n - 1, -1, -1),
                   lambda s, n: token_ids[s + n : min(s + n + num_speculative_tokens, length - n)])


# ---------------------------------------------------------------------------------------------------------------------
# 9.2 greedy acceptance
# ---------------------------------------------------------------------------------------------------------------------


def greedy_accept_right(proposed, target_argmax):  # the solution notebook's answer
    num_accepted = 0
    while num_accepted < len(proposed) and proposed[num_accepted] == target_argmax[num_accepted]:
        num_accepted += 1
    return proposed[:num_accepted] + [target_argmax[num_accepted]]


def greedy_accept_tensor_ops(proposed, target_argmax):  # with tensors: the first mismatch by cumprod
    guesses, target = torch.tensor(proposed, dtype=torch.long), torch.tensor(target_argmax, dtype=torch.long)
    num_accepted = int((guesses == target[: len(proposed)]).long().cumprod(0).sum())
    return target[: num_accepted + 1].tolist()


def greedy_accept_no_bonus(proposed, target_argmax):
    # Wrong: the target's token only replaces a rejected guess; when all are accepted nothing follows them.
    emitted = []
    for guess, target in zip(proposed, target_argmax):
        if guess != target:
            return emitted + [target]
        emitted.append(guess)
    return emitted


def greedy_accept_keeps_rejected_guess(proposed, target_argmax):
    # Wrong: at the first disagreement emits the rejected guess, not the target's token.
    emitted = []
    for guess, target in zip(proposed, target_argmax):
        emitted.append(guess)
        if guess != target:
            return emitted
    return emitted + [target_argmax[-1]]


def greedy_accept_all_matches(proposed, target_argmax):
    # Wrong: keeps every guess that matches, also after a disagreement.
    emitted = [g for g, t in zip(proposed, target_argmax) if g == t]
    return emitted + [target_argmax[len(proposed)]]


def greedy_accept_no_replacement(proposed, target_argmax):
    # Wrong: returns the accepted guesses only (nothing at all when the first is rejected).
    emitted = []
    for guess, target in zip(proposed, target_argmax):
        if guess != target:
            break
        emitted.append(guess)
    return emitted


def greedy_accept_shifted(proposed, target_argmax):
    # Wrong: compares guess i with target i + 1, the target's token after the guess rather than before it.
    emitted = []
    for i, guess in enumerate(proposed):
        if guess != target_argmax[i + 1]:
            return emitted + [target_argmax[i]]
        emitted.append(guess)
    return emitted + [target_argmax[-1]]


def greedy_accept_last_target(proposed, target_argmax):
    # Wrong: always appends the target's last token, whatever position the disagreement was at.
    emitted = []
    for guess, target in zip(proposed, target_argmax):
        if guess != target:
            break
        emitted.append(guess)
    return emitted + [target_argmax[-1]]


# ---------------------------------------------------------------------------------------------------------------------
# 9.3 speculative sampling
# ---------------------------------------------------------------------------------------------------------------------


def _rows(proposed, target_probs, draft_probs):
    p = target_probs.double()
    if draft_probs is None:
        q = torch.zeros(len(proposed), p.shape[1], dtype=p.dtype)
        q[torch.arange(len(proposed)), torch.tensor(proposed, dtype=torch.long)] = 1.0
    else:
        q = draft_probs.double()
    return p, q


def rejection_sample_right(proposed, target_probs, draft_probs, generator):  # the solution notebook's answer
    k, V = len(proposed), target_probs.shape[-1]
    p = target_probs.float()  # (k + 1, V)
    q = torch.eye(V)[proposed] if draft_probs is None else draft_probs.float()  # (k, V): one-hot rows for None
    u = torch.rand(k, generator=generator)  # all k uniforms at once: another draw order than the reference
    emitted = []
    for i, x in enumerate(proposed):
        if q[i, x] <= 0:
            raise ValueError(f"guess {i} (token {x}) has draft probability 0")
        if u[i] < torch.clamp(p[i, x] / q[i, x], max=1.0):
            emitted.append(x)
            continue
        residual = torch.clamp(p[i] - q[i], min=0.0)
        emitted.append(int(torch.multinomial(residual, 1, generator=generator)))
        return emitted
    return emitted + [int(torch.multinomial(p[k], 1, generator=generator))]


def _draw(weights, generator):
    """One draw by inverse CDF: a uniform against the normalized cumulative weights."""
    cdf = torch.cumsum(weights / weights.sum(), 0)
    u = torch.rand((), dtype=cdf.dtype, generator=generator)
    return min(int(torch.searchsorted(cdf, u, right=True)), len(cdf) - 1)


def rejection_sample_inverse_cdf(proposed, target_probs, draft_probs, generator):
    # p / q without the min (a uniform below 1 is below any ratio >= 1), draws by inverse CDF.
    p, q = _rows(proposed, target_probs, draft_probs)
    emitted = []
    for i, x in enumerate(proposed):
        if q[i, x] == 0:
            raise ValueError("a guess with q(x) = 0")
        if torch.rand((), dtype=p.dtype, generator=generator) < p[i, x] / q[i, x]:
            emitted.append(x)
        else:
            return emitted + [_draw((p[i] - q[i]).clamp(min=0), generator)]
    return emitted + [_draw(p[len(proposed)], generator)]


def _speculate(proposed, target_probs, draft_probs, generator, accept, replace, bonus_row=None, stop=True,
               check_zero=True):
    """A speculative sampler with its pieces swappable: accept(p_x, q_x, u) -> bool, replace(p, q) -> weights."""
    p, q = _rows(proposed, target_probs, draft_probs)
    k, emitted = len(proposed), []
    for i, x in enumerate(proposed):
        if check_zero and q[i, x] <= 0:
            raise ValueError("a guess with q(x) = 0")
        if accept(p[i, x], q[i, x], torch.rand((), dtype=torch.float64, generator=generator)):
            emitted.append(x)
            continue
        emitted.append(int(torch.multinomial(replace(p[i], q[i]), 1, generator=generator)))
        if stop:
            return emitted
    row = k if bonus_row is None else bonus_row(k)
    return emitted + [int(torch.multinomial(p[row], 1, generator=generator))]


def _min_ratio(p_x, q_x, u):
    return u < min(1.0, float(p_x / q_x))


def _residual(p, q):
    return (p - q).clamp(min=0)


def rejection_sample_always_accept(proposed, target_probs, draft_probs, generator):
    # Wrong: keeps every guess (the output is distributed as the draft's q, not the target's p).
    return _speculate(proposed, target_probs, draft_probs, generator, lambda p_x, q_x, u: True, _residual)


def rejection_sample_resample_from_p(proposed, target_probs, draft_probs, generator):
    # Wrong: a rejection draws from p itself instead of the residual: tokens q already offered come out too often.
    return _speculate(proposed, target_probs, draft_probs, generator, _min_ratio, lambda p, q: p)


def rejection_sample_inverted_ratio(proposed, target_probs, draft_probs, generator):
    # Wrong: accepts with min(1, q(x) / p(x)), the ratio upside down.
    return _speculate(proposed, target_probs, draft_probs, generator,
                      lambda p_x, q_x, u: p_x > 0 and u < min(1.0, float(q_x / p_x)), _residual)


def rejection_sample_no_bonus(proposed, target_probs, draft_probs, generator):
    # Wrong: when every guess is accepted, no bonus token follows.
    out = _speculate(proposed, target_probs, draft_probs, generator, _min_ratio, _residual)
    return out[:-1] if out[:-1] == list(proposed) and proposed else out


def rejection_sample_bonus_off_by_one(proposed, target_probs, draft_probs, generator):
    # Wrong: the bonus token is drawn from row k - 1 (the last guess's row) instead of row k.
    return _speculate(proposed, target_probs, draft_probs, generator, _min_ratio, _residual,
                      bonus_row=lambda k: max(k - 1, 0))


def rejection_sample_reversed_residual(proposed, target_probs, draft_probs, generator):
    # Wrong: the residual max(0, q - p), where the draft wanted more than the target.
    return _speculate(proposed, target_probs, draft_probs, generator, _min_ratio,
                      lambda p, q: (q - p).clamp(min=0) if ((q - p) > 0).any() else p)


def rejection_sample_continues(proposed, target_probs, draft_probs, generator):
    # Wrong: after a rejection it goes on checking the next guesses (which were scored on a wrong prefix).
    return _speculate(proposed, target_probs, draft_probs, generator, _min_ratio, _residual, stop=False)


def rejection_sample_global_rng(proposed, target_probs, draft_probs, generator):
    # Wrong: draws from the global RNG: right in distribution, but a seeded request is not reproducible.
    p, q = _rows(proposed, target_probs, draft_probs)
    emitted = []
    for i, x in enumerate(proposed):
        if q[i, x] <= 0:
            raise ValueError("a guess with q(x) = 0")
        if torch.rand(()) < min(1.0, float(p[i, x] / q[i, x])):
            emitted.append(x)
            continue
        return emitted + [int(torch.multinomial(_residual(p[i], q[i]), 1))]
    return emitted + [int(torch.multinomial(p[len(proposed)], 1))]


def rejection_sample_uniform_q(proposed, target_probs, draft_probs, generator):
    # Wrong: without draft_probs takes q uniform over the vocabulary instead of one-hot on the guess.
    if draft_probs is None:
        V = target_probs.shape[-1]
        draft_probs = torch.full((len(proposed), V), 1.0 / V, dtype=target_probs.dtype)
    return _speculate(proposed, target_probs, draft_probs, generator, _min_ratio, _residual)


def rejection_sample_no_zero_check(proposed, target_probs, draft_probs, generator):
    # Wrong: a guess with q(x) = 0 goes through (p / q = inf accepts it) instead of raising ValueError.
    return _speculate(proposed, target_probs, draft_probs, generator, _min_ratio, _residual, check_zero=False)


def rejection_sample_argmax_residual(proposed, target_probs, draft_probs, generator):
    # Wrong: replaces a rejected guess by the residual's most likely token instead of drawing from it.
    def replace(p, q):
        residual = _residual(p, q)
        return torch.nn.functional.one_hot(residual.argmax(), len(p)).to(p.dtype)

    return _speculate(proposed, target_probs, draft_probs, generator, _min_ratio, replace)


def rejection_sample_deterministic_accept(proposed, target_probs, draft_probs, generator):
    # Wrong: accepts exactly when p(x) >= q(x), with no random draw.
    return _speculate(proposed, target_probs, draft_probs, generator, lambda p_x, q_x, u: bool(p_x >= q_x), _residual)


# ---------------------------------------------------------------------------------------------------------------------
# 9.4 rollback of a block table
# ---------------------------------------------------------------------------------------------------------------------


def trim_blocks_right(block_table, num_written_blocks, num_tokens, block_size, ref_counts, block_hashes,
                      free_block_ids, evictable):  # the solution notebook's answer
    if not num_written_blocks * block_size <= num_tokens <= len(block_table) * block_size:
        raise ValueError(f"cannot trim to {num_tokens} tokens")
    num_kept = -(-num_tokens // block_size)  # ceil
    while len(block_table) > num_kept:
        block_id = block_table.pop()  # the last block first
        ref_counts[block_id] -= 1
        if ref_counts[block_id] == 0:
            if block_hashes[block_id] is None:
                free_block_ids.append(block_id)
            else:
                evictable[block_id] = None


def trim_blocks_slices(block_table, num_written_blocks, num_tokens, block_size, ref_counts, block_hashes,
                       free_block_ids, evictable):  # the released blocks as a reversed slice, math.ceil
    import math

    if num_tokens < num_written_blocks * block_size or num_tokens > len(block_table) * block_size:
        raise ValueError("out of range")
    num_kept = math.ceil(num_tokens / block_size)
    released = block_table[num_kept:][::-1]
    del block_table[num_kept:]
    for block_id in released:
        ref_counts[block_id] -= 1
        if ref_counts[block_id] > 0:
            continue
        if block_hashes[block_id] is not None:
            evictable[block_id] = None
        else:
            free_block_ids.append(block_id)


def _trim(block_table, num_written_blocks, num_tokens, block_size, ref_counts, block_hashes, free_block_ids,
          evictable, num_kept=None, check=True, release=None, order=reversed):
    """A trim with its pieces swappable: how many blocks are kept, the range check, what releasing a block does."""
    if check and not num_written_blocks * block_size <= num_tokens <= len(block_table) * block_size:
        raise ValueError("out of range")
    keep = -(-num_tokens // block_size) if num_kept is None else num_kept(num_tokens, block_size)
    keep = max(0, min(keep, len(block_table)))
    released = block_table[keep:]
    del block_table[keep:]
    for block_id in order(released):
        if release is not None:
            release(block_id, ref_counts, block_hashes, free_block_ids, evictable)
            continue
        ref_counts[block_id] -= 1
        if ref_counts[block_id] == 0:
            if block_hashes[block_id] is None:
                free_block_ids.append(block_id)
            else:
                evictable[block_id] = None


def trim_blocks_forgets_to_free(*args):
    # Wrong: drops the blocks from the table and their references, but never returns them to the pool (a leak).
    _trim(*args, release=lambda b, refs, hashes, free, evictable: refs.__setitem__(b, refs[b] - 1))


def trim_blocks_frees_shared(*args):
    # Wrong: every released block goes to the free list, also one a forked sibling still holds.
    def release(b, refs, hashes, free, evictable):
        refs[b] -= 1
        (free.append(b) if hashes[b] is None else evictable.__setitem__(b, None))

    _trim(*args, release=release)


def trim_blocks_zeroes_shared(*args):
    # Wrong: sets a released block's reference count to 0, as if this sequence were its only holder.
    def release(b, refs, hashes, free, evictable):
        refs[b] = 0
        (free.append(b) if hashes[b] is None else evictable.__setitem__(b, None))

    _trim(*args, release=release)


def trim_blocks_hashed_to_free(*args):
    # Wrong: a block with a hash goes to the free list too, where its cached K/V would be overwritten first.
    def release(b, refs, hashes, free, evictable):
        refs[b] -= 1
        if refs[b] == 0:
            free.append(b)

    _trim(*args, release=release)


def trim_blocks_drops_hash(*args):
    # Wrong: a hashed block loses its hash and goes to the free list (forgotten by the prefix cache).
    def release(b, refs, hashes, free, evictable):
        refs[b] -= 1
        if refs[b] == 0:
            hashes[b] = None
            free.append(b)

    _trim(*args, release=release)


def trim_blocks_one_too_many(*args):
    # Wrong: keeps num_tokens // block_size + 1 blocks: at a block boundary one empty block stays.
    _trim(*args, num_kept=lambda n, bs: n // bs + 1)


def trim_blocks_one_too_few(*args):
    # Wrong: keeps num_tokens // block_size blocks: a partly filled last block is given back with its tokens.
    _trim(*args, num_kept=lambda n, bs: n // bs)


def trim_blocks_no_check(*args):
    # Wrong: never refuses: a trim into the written (hashed) blocks gives back K/V the prefix cache points to.
    _trim(*args, check=False)


def trim_blocks_head_first(*args):
    # Wrong: releases the tail blocks first to last, so the free list and the eviction order come out reversed.
    _trim(*args, order=list)


def trim_blocks_checks_late(block_table, num_written_blocks, num_tokens, block_size, ref_counts, block_hashes,
                            free_block_ids, evictable):
    # Wrong: releases first and checks afterwards: a refused trim has already changed the pool.
    table = list(block_table)
    _trim(block_table, num_written_blocks, num_tokens, block_size, ref_counts, block_hashes, free_block_ids,
          evictable, check=False)
    if not num_written_blocks * block_size <= num_tokens <= len(table) * block_size:
        raise ValueError("out of range")


def trim_blocks_no_decrement(block_table, num_written_blocks, num_tokens, block_size, ref_counts, block_hashes,
                             free_block_ids, evictable):
    # Wrong: frees the blocks with one reference and leaves the shared ones alone: the reference counts never move.
    def release(b, refs, hashes, free, evictable):
        if refs[b] == 1:
            refs[b] = 0
            (free.append(b) if hashes[b] is None else evictable.__setitem__(b, None))

    _trim(block_table, num_written_blocks, num_tokens, block_size, ref_counts, block_hashes, free_block_ids,
          evictable, release=release)


# ---------------------------------------------------------------------------------------------------------------------
# 9.5 expected tokens per step
# ---------------------------------------------------------------------------------------------------------------------


def expected_tokens_right(acceptance_rate, num_speculative_tokens):  # the solution notebook's answer
    a, k = acceptance_rate, num_speculative_tokens
    if a == 1.0:
        return float(k + 1)
    return (1 - a ** (k + 1)) / (1 - a)


def expected_tokens_sum(acceptance_rate, num_speculative_tokens):  # the geometric sum, term by term
    return sum(acceptance_rate**i for i in range(num_speculative_tokens + 1))


def expected_tokens_one_short(acceptance_rate, num_speculative_tokens):
    # Wrong: (1 - a^k) / (1 - a), one term short.
    a, k = acceptance_rate, num_speculative_tokens
    return float(k) if a == 1.0 else (1 - a**k) / (1 - a)


def expected_tokens_divides_by_zero(acceptance_rate, num_speculative_tokens):
    # Wrong: no special case at a = 1: ZeroDivisionError.
    a, k = acceptance_rate, num_speculative_tokens
    return (1 - a ** (k + 1)) / (1 - a)


def expected_tokens_accepted_only(acceptance_rate, num_speculative_tokens):
    # Wrong: the expected accepted guesses, without the target's own token at the end of every step.
    return expected_tokens_per_step(acceptance_rate, num_speculative_tokens) - 1


def expected_tokens_linear(acceptance_rate, num_speculative_tokens):
    # Wrong: 1 + k * a, as if every guess were verified whatever happened before it.
    return 1 + num_speculative_tokens * acceptance_rate


def expected_tokens_unbounded(acceptance_rate, num_speculative_tokens):
    # Wrong: 1 / (1 - a), the geometric series without its k + 1 cap.
    return float("inf") if acceptance_rate == 1 else 1 / (1 - acceptance_rate)


def expected_tokens_edge_k(acceptance_rate, num_speculative_tokens):
    # Wrong: k at a = 1 (forgets the bonus token there).
    a, k = acceptance_rate, num_speculative_tokens
    return float(k) if a == 1.0 else (1 - a ** (k + 1)) / (1 - a)


# ---------------------------------------------------------------------------------------------------------------------
# 9.6 acceptance estimate
# ---------------------------------------------------------------------------------------------------------------------


def acceptance_estimate_right(observations, decay):  # the solution notebook's answer
    accepted = rejections = 0.0
    for num_proposed, num_accepted in observations:
        accepted = decay * accepted + num_accepted
        rejections = decay * rejections + (num_accepted < num_proposed)
    return 1.0 if accepted + rejections == 0 else accepted / (accepted + rejections)


def acceptance_estimate_weights(observations, decay):  # explicit weights decay^(steps after), decayed after adding
    n = len(observations)
    accepted = sum(decay ** (n - 1 - i) * a for i, (_, a) in enumerate(observations))
    rejections = sum(decay ** (n - 1 - i) * (a < k) for i, (k, a) in enumerate(observations))
    return accepted / (accepted + rejections) if observations else 1.0


def acceptance_estimate_over_proposed(observations, decay):
    # Wrong: accepted / proposed: the guesses after a rejection were never verified, yet count as rejected.
    accepted = proposed = 0.0
    for num_proposed, num_accepted in observations:
        accepted = decay * accepted + num_accepted
        proposed = decay * proposed + num_proposed
    return 1.0 if proposed == 0 else accepted / proposed


def acceptance_estimate_no_decay(observations, decay):
    # Wrong: every step weighs the same, however old.
    return acceptance_estimate_right(observations, 1.0)


def acceptance_estimate_rejection_every_step(observations, decay):
    # Wrong: counts a rejection after every step, also when every guess was accepted.
    accepted = rejections = 0.0
    for _, num_accepted in observations:
        accepted = decay * accepted + num_accepted
        rejections = decay * rejections + 1
    return 1.0 if accepted + rejections == 0 else accepted / (accepted + rejections)


def acceptance_estimate_zero_without_evidence(observations, decay):
    # Wrong: 0.0 before any evidence, which would turn speculation down before it ever ran.
    return acceptance_estimate_right(observations, decay) if observations else 0.0


def acceptance_estimate_newest_first(observations, decay):
    # Wrong: walks the steps newest first, so the oldest step weighs most.
    return acceptance_estimate_right(observations[::-1], decay)


def acceptance_estimate_mean_of_steps(observations, decay):
    # Wrong: the mean of each step's own rate a / (a + rejection), decayed: a step of 5 accepted counts as one.
    if not observations:
        return 1.0
    total = weight = 0.0
    for num_proposed, num_accepted in observations:
        rejected = num_accepted < num_proposed
        rate = num_accepted / (num_accepted + rejected) if num_accepted + rejected else 1.0
        total, weight = decay * total + rate, decay * weight + 1
    return total / weight


RIGHT_ANSWERS += [
    pytest.param(grading.check_propose_ngram, propose_ngram, id="9.1-reference"),
    pytest.param(grading.check_propose_ngram, propose_ngram_right, id="9.1-latest-start-first"),
    pytest.param(grading.check_propose_ngram, propose_ngram_forward_scan, id="9.1-forward-scan-keeps-last"),
    pytest.param(grading.check_greedy_accept, greedy_accept, id="9.2-reference"),
    pytest.param(grading.check_greedy_accept, greedy_accept_right, id="9.2-while-loop"),
    pytest.param(grading.check_greedy_accept, greedy_accept_tensor_ops, id="9.2-cumprod"),
    pytest.param(grading.check_rejection_sample, rejection_sample, id="9.3-reference"),
    pytest.param(grading.check_rejection_sample, rejection_sample_right, id="9.3-uniforms-up-front-float32"),
    pytest.param(grading.check_rejection_sample, rejection_sample_inverse_cdf, id="9.3-no-min-inverse-cdf"),
    pytest.param(grading.check_trim_blocks, _trim_blocks_ref, id="9.4-block-manager"),
    pytest.param(grading.check_trim_blocks, trim_blocks_right, id="9.4-pop-loop"),
    pytest.param(grading.check_trim_blocks, trim_blocks_slices, id="9.4-reversed-slice"),
    pytest.param(grading.check_expected_tokens_per_step, expected_tokens_per_step, id="9.5-reference"),
    pytest.param(grading.check_expected_tokens_per_step, expected_tokens_right, id="9.5-closed-form"),
    pytest.param(grading.check_expected_tokens_per_step, expected_tokens_sum, id="9.5-geometric-sum"),
    pytest.param(grading.check_acceptance_estimate, _acceptance_estimate_ref, id="9.6-reference"),
    pytest.param(grading.check_acceptance_estimate, acceptance_estimate_right, id="9.6-running-counts"),
    pytest.param(grading.check_acceptance_estimate, acceptance_estimate_weights, id="9.6-explicit-weights"),
]
WRONG_ANSWERS += [
    pytest.param(grading.check_propose_ngram, propose_ngram_shortest_first, id="9.1-shortest-n-first"),
    pytest.param(grading.check_propose_ngram, propose_ngram_earliest, id="9.1-earliest-occurrence"),
    pytest.param(grading.check_propose_ngram, propose_ngram_matches_itself, id="9.1-suffix-matches-itself"),
    pytest.param(grading.check_propose_ngram, propose_ngram_only_max_n, id="9.1-only-max-n"),
    pytest.param(grading.check_propose_ngram, propose_ngram_needs_k_tokens, id="9.1-needs-k-following-tokens"),
    pytest.param(grading.check_propose_ngram, propose_ngram_ignores_min_n, id="9.1-ignores-min-n"),
    pytest.param(grading.check_propose_ngram, propose_ngram_skips_min_n, id="9.1-never-tries-min-n"),
    pytest.param(grading.check_propose_ngram, propose_ngram_includes_match, id="9.1-proposes-the-match-itself"),
    pytest.param(grading.check_propose_ngram, propose_ngram_stops_before_suffix, id="9.1-stops-before-suffix"),
    pytest.param(grading.check_greedy_accept, greedy_accept_no_bonus, id="9.2-no-bonus-token"),
    pytest.param(grading.check_greedy_accept, greedy_accept_keeps_rejected_guess, id="9.2-emits-rejected-guess"),
    pytest.param(grading.check_greedy_accept, greedy_accept_all_matches, id="9.2-matches-after-mismatch"),
    pytest.param(grading.check_greedy_accept, greedy_accept_no_replacement, id="9.2-no-replacement"),
    pytest.param(grading.check_greedy_accept, greedy_accept_shifted, id="9.2-compares-with-next-target"),
    pytest.param(grading.check_greedy_accept, greedy_accept_last_target, id="9.2-always-last-target"),
    pytest.param(grading.check_rejection_sample, rejection_sample_always_accept, id="9.3-always-accept"),
    pytest.param(grading.check_rejection_sample, rejection_sample_resample_from_p, id="9.3-resample-from-p"),
    pytest.param(grading.check_rejection_sample, rejection_sample_inverted_ratio, id="9.3-q-over-p"),
    pytest.param(grading.check_rejection_sample, rejection_sample_no_bonus, id="9.3-no-bonus-token"),
    pytest.param(grading.check_rejection_sample, rejection_sample_bonus_off_by_one, id="9.3-bonus-from-row-k-1"),
    pytest.param(grading.check_rejection_sample, rejection_sample_reversed_residual, id="9.3-residual-q-minus-p"),
    pytest.param(grading.check_rejection_sample, rejection_sample_continues, id="9.3-continues-after-rejection"),
    pytest.param(grading.check_rejection_sample, rejection_sample_global_rng, id="9.3-global-rng"),
    pytest.param(grading.check_rejection_sample, rejection_sample_uniform_q, id="9.3-uniform-q-without-draft"),
    pytest.param(grading.check_rejection_sample, rejection_sample_no_zero_check, id="9.3-accepts-q-zero"),
    pytest.param(grading.check_rejection_sample, rejection_sample_argmax_residual, id="9.3-argmax-of-residual"),
    pytest.param(grading.check_rejection_sample, rejection_sample_deterministic_accept, id="9.3-accept-if-p-ge-q"),
    pytest.param(grading.check_trim_blocks, trim_blocks_forgets_to_free, id="9.4-forgets-to-free"),
    pytest.param(grading.check_trim_blocks, trim_blocks_frees_shared, id="9.4-frees-shared-blocks"),
    pytest.param(grading.check_trim_blocks, trim_blocks_zeroes_shared, id="9.4-zeroes-ref-counts"),
    pytest.param(grading.check_trim_blocks, trim_blocks_hashed_to_free, id="9.4-hashed-to-free-list"),
    pytest.param(grading.check_trim_blocks, trim_blocks_drops_hash, id="9.4-drops-the-hash"),
    pytest.param(grading.check_trim_blocks, trim_blocks_one_too_many, id="9.4-keeps-one-too-many"),
    pytest.param(grading.check_trim_blocks, trim_blocks_one_too_few, id="9.4-keeps-one-too-few"),
    pytest.param(grading.check_trim_blocks, trim_blocks_no_check, id="9.4-never-refuses"),
    pytest.param(grading.check_trim_blocks, trim_blocks_head_first, id="9.4-releases-head-first"),
    pytest.param(grading.check_trim_blocks, trim_blocks_checks_late, id="9.4-checks-after-releasing"),
    pytest.param(grading.check_trim_blocks, trim_blocks_no_decrement, id="9.4-shared-keep-their-count"),
    pytest.param(grading.check_expected_tokens_per_step, expected_tokens_one_short, id="9.5-one-term-short"),
    pytest.param(grading.check_expected_tokens_per_step, expected_tokens_divides_by_zero, id="9.5-zero-division"),
    pytest.param(grading.check_expected_tokens_per_step, expected_tokens_accepted_only, id="9.5-accepted-only"),
    pytest.param(grading.check_expected_tokens_per_step, expected_tokens_linear, id="9.5-linear"),
    pytest.param(grading.check_expected_tokens_per_step, expected_tokens_unbounded, id="9.5-no-cap"),
    pytest.param(grading.check_expected_tokens_per_step, expected_tokens_edge_k, id="9.5-k-at-a-1"),
    pytest.param(grading.check_acceptance_estimate, acceptance_estimate_over_proposed, id="9.6-over-proposed"),
    pytest.param(grading.check_acceptance_estimate, acceptance_estimate_no_decay, id="9.6-no-decay"),
    pytest.param(grading.check_acceptance_estimate, acceptance_estimate_rejection_every_step,
                 id="9.6-rejection-every-step"),
    pytest.param(grading.check_acceptance_estimate, acceptance_estimate_zero_without_evidence,
                 id="9.6-zero-without-evidence"),
    pytest.param(grading.check_acceptance_estimate, acceptance_estimate_newest_first, id="9.6-newest-first"),
    pytest.param(grading.check_acceptance_estimate, acceptance_estimate_mean_of_steps, id="9.6-mean-of-step-rates"),
]


# ---------------------------------------------------------------------------------------------------------------------
# The worked examples above each exercise, recomputed with minillm's reference; the checks' references.
# ---------------------------------------------------------------------------------------------------------------------

SOLUTION = Path(__file__).resolve().parents[2] / "solutions" / "09_speculative_decoding.ipynb"
# The learner's function names, bound to the package's reference for the worked examples.
REFERENCE = {
    "torch": torch,
    "minillm": minillm,
    "propose_ngram": propose_ngram,
    "greedy_accept": greedy_accept,
    "rejection_sample": rejection_sample,
    "trim_blocks": _trim_blocks_ref,
    "expected_tokens_per_step": expected_tokens_per_step,
    "acceptance_estimate": _acceptance_estimate_ref,
}


def test_worked_examples_are_the_references_output():
    check_worked_examples(SOLUTION, 9, ["9.1", "9.2", "9.3", "9.4", "9.5", "9.6"], REFERENCE)


def test_acceptance_reference_is_the_proposers_estimate():
    """With the package's DECAY, the check's reference is what the engine's Proposer estimates."""
    rng = random.Random(0)
    for _ in range(20):
        proposer, seq = Proposer(4), SimpleNamespace(seq_id=7)
        steps = []
        for _ in range(rng.randint(0, 10)):
            k = rng.randint(1, 4)
            steps.append((k, rng.randint(0, k)))
            proposer.observe(seq, *steps[-1])
        assert abs(proposer.acceptance_estimate(7) - _acceptance_estimate_ref(steps, DECAY)) < 1e-12


def test_trim_reference_is_the_block_managers_trim():
    """The plain-list reference, run on a driven manager's own lists, leaves them as the manager's trim does."""
    for seed in range(10):
        for bm, seq_id, num_tokens in _block_manager_run(random.Random(seed)):
            lists = [list(bm.tables[seq_id]), list(bm.ref_counts), list(bm.block_hashes), list(bm.free_block_ids),
                     dict.fromkeys(bm.evictable)]
            try:
                _trim_blocks_ref(lists[0], len(bm.seq_hashes[seq_id]), num_tokens, bm.block_size, *lists[1:])
            except ValueError:
                with pytest.raises(ValueError):
                    bm.trim(seq_id, num_tokens)
                continue
            bm.trim(seq_id, num_tokens)
            assert lists == [bm.tables[seq_id], bm.ref_counts, bm.block_hashes, list(bm.free_block_ids),
                             dict.fromkeys(bm.evictable)]
        for seq_id in list(bm.tables):
            bm.free(seq_id)
        assert bm.num_free_blocks == bm.num_blocks, "the driven run leaked blocks"


def test_hoeffding_bound_is_what_the_check_states():
    # 2 * m * V * exp(-2 n t^2) = delta at the returned t.
    import math

    t = hoeffding_bound(4000, 5)
    assert math.isclose(2 * 5 * 5 * math.exp(-2 * 4000 * t * t), 1e-6, rel_tol=1e-9)
    assert 0.04 < t < 0.05


def test_block_manager_runs_meet_shared_and_cached_blocks():
    """The driven runs of check 9.4 release shared blocks and hashed ones, not only private ones."""
    shared = hashed = 0
    for seed in range(40):
        for bm, seq_id, num_tokens in _block_manager_run(random.Random(seed)):
            table, bs = bm.tables[seq_id], bm.block_size
            if len(bm.seq_hashes[seq_id]) * bs <= num_tokens <= len(table) * bs:
                released = table[-(-num_tokens // bs):]
                shared += sum(bm.ref_counts[b] > 1 for b in released)
                hashed += sum(bm.ref_counts[b] == 1 and bm.block_hashes[b] is not None for b in released)
            try:
                bm.trim(seq_id, num_tokens)
            except ValueError:
                pass
    assert shared > 0 and hashed > 0, (shared, hashed)


def test_rejection_sample_reference_is_unbiased_on_the_checks_case():
    # The check's distribution test, on BlockManager-free ground: p's first row from the reference over the check's
    # number of seeds.
    from minillm.grading.ch09_speculative_decoding import NUM_RUNS_DRAFT, P_DRAFT, _draft_case

    proposals, p, q = _draft_case(NUM_RUNS_DRAFT, seed=1)
    counts = torch.zeros(5)
    for i, x in enumerate(proposals):
        counts[rejection_sample(x, p, q, torch.Generator().manual_seed(i))[0]] += 1
    assert (counts / NUM_RUNS_DRAFT - torch.tensor(P_DRAFT[0])).abs().max() < hoeffding_bound(NUM_RUNS_DRAFT, 5)
