"""Chapter 5 checks (continuous batching), used by solutions/05_continuous_batching.ipynb.

Each check runs fixed cases (the edge cases the exercise text names) and fresh random cases drawn from the check's
seed: several requests competing for one token budget and one sequence cap, budgets that end exactly at a prompt,
prompts longer than the budget, empty queues, block pools that run out at a block boundary, shared and forked
blocks. The references are the package's own: the real `Scheduler` (5.1), the scheduler's preemption rule over a
real `BlockManager` (5.2), `prepare_batch` (5.3) and `minillm.bench.engine.static_bound` (5.4).
Every check has plausible wrong answers in tests/answers/ch05_continuous_batching.py that it must reject.
"""

from __future__ import annotations

import numbers
import random
from collections.abc import Callable

from minillm.grading.framework import (
    assert_close,
    assert_equal,
    exercise,
)

__all__ = [  # the checks, re-exported by minillm.grading
    "check_schedule_step",
    "check_preempt",
    "check_pack_batch",
    "check_static_bound",
]


# ---------------------------------------------------------------------------------------------------------------------
# 5.1 One scheduling step under a token budget
# ---------------------------------------------------------------------------------------------------------------------


def _schedule_step_ref(running: list[int], waiting: list[int], budget: int, max_seqs: int) -> tuple[list[int], list[int]]:
    """Drive the real `Scheduler` (a pool large enough for everything, no prefix caching) from the exercise's lists."""
    from minillm.engine.request import Sequence, Status
    from minillm.engine.sampling import SamplingParams
    from minillm.engine.scheduler import Scheduler
    from minillm.kvcache.blocks import BlockManager

    num_tokens = sum(8 + left for left in running) + sum(waiting)
    bm = BlockManager(num_tokens // 16 + len(running) + len(waiting) + 1, 16, enable_prefix_caching=False)
    sched = Scheduler(bm, max_seqs, budget)

    def seq(i, prompt_len):
        return Sequence(seq_id=i, request_id=str(i), prompt_token_ids=[5] * prompt_len,
                        params=SamplingParams(max_tokens=8), eos_token_ids=[], max_model_len=10**9)

    for i, rem in enumerate(running):  # a decode: 8 computed + 1 sampled token; a prompt: 8 computed, rem to go
        s = seq(i, 8 if rem == 1 else 8 + rem)
        if rem == 1:
            s.output_token_ids.append(7)
        bm.allocate_prompt(s.seq_id, s.token_ids[:8])
        bm.ensure_capacity(s.seq_id, 8)
        bm.commit(s.seq_id, s.token_ids, 8)
        s.status, s.num_computed_tokens = Status.RUNNING, 8
        sched.running.append(s)
    for j, n in enumerate(waiting):
        sched.add(seq(len(running) + j, n))
    out = sched.schedule()
    planned = {s.seq_id: n for s, n in zip(out.seqs, out.num_new_tokens)}
    admitted = [planned[len(running) + j] for j in range(len(waiting)) if len(running) + j in planned]
    return [planned.get(i, 0) for i in range(len(running))], admitted


def _random_running(rng: random.Random, num: int, p_decode: float, max_left: int) -> list[int]:
    return [1 if rng.random() < p_decode else rng.randint(2, max_left) for _ in range(num)]


def _random_schedule_case(rng: random.Random, k: int) -> tuple[str, list[int], list[int], int, int]:
    """A random (name, running, waiting, budget, max_num_seqs); k picks which competition the case is about.

    Like the real scheduler's state, the running sequences never outnumber max_num_seqs or the budget.
    """
    kind = k % 4
    if kind == 0:  # several waiting prompts compete for one budget: it runs out somewhere among them
        max_seqs = rng.randint(5, 10)
        running = _random_running(rng, rng.randint(0, 4), 0.6, 16)
        waiting = [rng.randint(1, 6) if rng.random() < 0.5 else rng.randint(10, 24) for _ in range(rng.randint(3, 8))]
        low = max(1, len(running))
        budget = rng.randint(low, max(low, sum(running) + sum(waiting) - 1))
        return f"random mix {k}: prompts compete for the token budget", running, waiting, budget, max_seqs
    if kind == 1:  # the sequence cap binds before the budget; often the running ones already fill it
        max_seqs = rng.randint(1, 5)
        num_running = max_seqs if rng.random() < 0.4 else rng.randint(0, max_seqs)
        running = _random_running(rng, num_running, 0.5, 12)
        waiting = [rng.randint(1, 4) for _ in range(rng.randint(1, 7))]
        return f"random mix {k}: prompts compete for max_num_seqs", running, waiting, rng.randint(48, 96), max_seqs
    if kind == 2:  # the budget ends exactly where a waiting prompt ends (or nothing waits at all)
        max_seqs = rng.randint(4, 10)
        running = _random_running(rng, rng.randint(0, 4), 0.6, 16)
        waiting = [rng.randint(1, 20) for _ in range(rng.choice([0, 1, 2, 3, 5]))]
        budget = sum(running) + sum(waiting[: rng.randint(1 if waiting else 0, len(waiting))])
        if budget == 0:  # both queues empty
            budget = rng.randint(1, 16)
        return f"random mix {k}: a budget that ends exactly at a prompt", running, waiting, budget, max_seqs
    # unfinished prompts longer than the budget, decodes behind them, and a waiting prompt longer than the budget
    budget = rng.randint(5, 32)
    max_seqs = rng.randint(5, 8)
    running = _random_running(rng, rng.randint(2, 3), 0.3, 2 * budget)
    if rng.random() < 0.7:  # a decode behind the unfinished prompts
        running.append(1)
    waiting = [rng.randint(budget + 1, 3 * budget)] + [rng.randint(1, 40) for _ in range(rng.randint(0, 3))]
    rng.shuffle(waiting)
    return f"random mix {k}: prompts longer than the budget are chunked", running, waiting, budget, max_seqs


def _check_schedule_invariants(got, running, waiting, budget, max_seqs, what):
    running_tokens, admitted = (list(x) for x in got)
    if len(running_tokens) != len(running):
        raise AssertionError(f"running_tokens has {len(running_tokens)} entries, expected one per running sequence "
                             f"({len(running)}) {what}")
    for i, (n, left) in enumerate(zip(running_tokens, running)):
        if not 0 <= n <= left:
            raise AssertionError(f"running sequence {i} has {left} tokens left but got {n} {what}")
    if len(admitted) > len(waiting):
        raise AssertionError(f"{len(admitted)} prompts admitted but only {len(waiting)} wait {what}")
    for j, (n, prompt_len) in enumerate(zip(admitted, waiting)):
        if not 1 <= n <= prompt_len:
            raise AssertionError(f"admitted prompt {j} ({prompt_len} tokens) got {n} tokens: an admitted prompt "
                                 f"computes between 1 and all of its tokens {what}")
    total = sum(running_tokens) + sum(admitted)
    if total > budget:
        raise AssertionError(f"{total} tokens scheduled, more than max_num_batched_tokens={budget} {what}")
    if len(running) + len(admitted) > max_seqs:
        raise AssertionError(f"{len(running)} running + {len(admitted)} admitted sequences exceed "
                             f"max_num_seqs={max_seqs} {what}")
    return running_tokens, admitted


def check_schedule_step(fn: Callable) -> None:
    """Exercise 5.1. `fn(running, waiting, max_num_batched_tokens, max_num_seqs) -> (running_tokens, admitted)`.

    running: tokens each running sequence still has to compute, oldest first (1 = a decode, > 1 = a prompt being
    prefilled in chunks); waiting: prompt lengths in arrival order. Decodes go first, then unfinished prompts (in
    order), then waiting prompts first come first served, each taking min(its tokens, budget left), while tokens
    are left and fewer than max_num_seqs sequences run. Returns the tokens given to each running sequence (0 if
    none) and the tokens of each admitted waiting prompt (the admitted ones are a prefix of `waiting`).
    """
    cases = [
        ("only prompts, all fit", [], [5, 7, 3], 32, 8),
        ("decodes first, then a prompt is chunked to the budget left", [1, 1, 1], [40, 4], 16, 8),
        ("an unfinished prompt continues before new ones are admitted", [1, 30, 1], [6], 16, 8),
        ("two unfinished prompts: the older one takes the budget first", [1, 20, 6], [3], 12, 8),
        ("max_num_seqs caps admissions", [1, 1], [2, 2, 2, 2], 64, 3),
        ("a prefilling sequence counts against max_num_seqs too", [1, 9], [2, 2, 2], 64, 3),
        ("running sequences already fill max_num_seqs: nobody is admitted", [1, 1, 1], [2, 2], 64, 3),
        ("the budget is used up exactly", [1], [7, 9], 8, 4),
        ("a budget exactly one prompt long", [], [8, 8], 8, 4),
        ("a budget of 1 token and one decode", [1], [5], 1, 1),
        ("nothing waiting", [1, 1, 12], [], 64, 8),
        ("empty queues", [], [], 16, 4),
    ]
    with exercise("5.1", "one scheduling step under a token budget") as ex:
        cases += [_random_schedule_case(ex.rng, k) for k in range(12)]
        for name, running, waiting, budget, max_seqs in cases:
            expected = _schedule_step_ref(running, waiting, budget, max_seqs)

            def same(running=running, waiting=waiting, budget=budget, max_seqs=max_seqs, expected=expected):
                got = fn(list(running), list(waiting), budget, max_seqs)
                what = (f"for running={running}, waiting={waiting}, max_num_batched_tokens={budget}, "
                        f"max_num_seqs={max_seqs}")
                got = _check_schedule_invariants(got, running, waiting, budget, max_seqs, what)
                assert_equal(got, expected, what=f"(running_tokens, admitted) {what}")

            ex.check(name, same)


# ---------------------------------------------------------------------------------------------------------------------
# 5.2 Preemption
# ---------------------------------------------------------------------------------------------------------------------


def _preempt_ref(bm, running: list[int], seq_id: int, num_tokens: int) -> list[int]:
    """The scheduler's rule (`Scheduler.schedule`, step 1): the newest running sequence goes until there is room."""
    victims = []
    while seq_id not in victims and not bm.can_allocate(bm.num_blocks_needed(seq_id, num_tokens)):
        victims.append(running.pop())
        bm.free(victims[-1])
    return victims


def _build_pool(num_blocks: int, block_size: int, seqs: list, prefix_caching: bool):
    """A BlockManager holding sequences 0, 1, ...: ``seqs[i]`` is its token list (all computed), or ("fork", j)."""
    from minillm.kvcache.blocks import BlockManager

    bm = BlockManager(num_blocks, block_size, enable_prefix_caching=prefix_caching)
    for i, tokens in enumerate(seqs):
        if isinstance(tokens, tuple):  # parallel sampling: a child shares every block of its parent
            bm.fork(tokens[1], i)
            continue
        bm.allocate_prompt(i, tokens)
        bm.ensure_capacity(i, len(tokens))
        bm.commit(i, tokens, len(tokens))
    return bm


def _seq_len(seqs: list, i: int) -> int:
    while isinstance(seqs[i], tuple):
        i = seqs[i][1]
    return len(seqs[i])


def _random_preempt_case(rng: random.Random, k: int):
    """A full or nearly full pool; k picks what the case is about: a mix, forks, prefix caching, block boundaries."""
    kind = k % 4
    block_size = rng.choice([2, 4, 8, 16])
    prefix_caching = kind == 2 or (kind == 0 and rng.random() < 0.5)
    system_prompt = [rng.randrange(1000) for _ in range(3 * block_size)]
    seqs = []
    for i in range(rng.randint(2 if kind == 1 else 1, 6)):
        if i > 0 and rng.random() < (0.5 if kind == 1 else 0.25 if kind == 0 else 0):
            seqs.append(("fork", rng.randrange(i)))  # parallel sampling: shares every block of an earlier one
            continue
        full = block_size * rng.randint(1, 3)
        length = {0: rng.choice([full, rng.randint(1, 3 * block_size)]),
                  1: full - rng.randint(1, block_size - 1),  # a partly filled last block: growing writes a shared one
                  2: rng.choice([full, full, rng.randint(1, 3 * block_size)]),
                  3: full}[kind]
        shared = prefix_caching and rng.random() < 0.6
        seqs.append(((system_prompt[:length] if shared else []) + [rng.randrange(1000) for _ in range(length)])[:length])
    used = _build_pool(1000, block_size, seqs, prefix_caching).num_used_blocks
    num_blocks = used + (0 if kind == 1 else rng.choice([0, 0, 0, 1, 2]))
    parents = sorted({s[1] for s in seqs if isinstance(s, tuple)})
    children = [i for i, s in enumerate(seqs) if isinstance(s, tuple)]
    if parents and rng.random() < 0.7:  # a sequence that shares its blocks: growing may need a copy-on-write
        seq_id = rng.choice(parents if rng.random() < 0.6 else children)
    else:
        seq_id = rng.randrange(len(seqs))
    length = _seq_len(seqs, seq_id)
    boundary = -(-(length + 1) // block_size) * block_size  # the end of the block that position `length` falls in
    choices = [length + 1, boundary, boundary + 1]  # the next token; filling its block exactly; one past it
    if kind in (0, 2):
        choices.append(length + rng.randint(1, 3 * block_size))
    num_tokens = rng.choice(choices)
    running = list(range(len(seqs)))
    if rng.random() < 0.4:  # after preemptions and re-admissions, the newest need not have the highest id
        rng.shuffle(running)
    what = ["a mix", "forked sequences", "prefix caching", "full blocks"][kind]
    return (f"random pool {k}: {what}, block size {block_size}", num_blocks, block_size, seqs, prefix_caching,
            running, seq_id, num_tokens)


def check_preempt(fn: Callable) -> None:
    """Exercise 5.2. `fn(bm, running, seq_id, num_tokens) -> victims`: make room for a sequence to grow.

    Sequence `seq_id` (in `running`, a list of seq ids oldest first) must hold `num_tokens` tokens. While
    ``bm.can_allocate(bm.num_blocks_needed(seq_id, num_tokens))`` is false, preempt the NEWEST running sequence:
    remove it from `running` (in place) and ``bm.free`` it; stop early if `seq_id` itself was preempted (it then
    waits to be recomputed). Return the preempted ids in order (empty when nothing had to go).
    """
    def lengths(*ns):  # sequences of distinct tokens
        return [[10 + i] * n for i, n in enumerate(ns)]

    # name, num_blocks, block_size, sequences, prefix caching, running (oldest first), seq_id, num_tokens
    cases = [
        ("nothing to do when a block is free", 8, 4, lengths(5, 6, 3), False, [0, 1, 2], 0, 9),
        ("a partly filled last block has room: nobody goes", 6, 4, lengths(8, 8, 7), False, [0, 1, 2], 2, 8),
        ("the newest goes first (the pool runs out at a block boundary)", 6, 4, lengths(8, 8, 7), False,
         [0, 1, 2], 0, 9),
        ("the newest is the last of `running`, whatever its id", 6, 4, lengths(8, 8, 7), False, [2, 0, 1], 0, 9),
        ("as many as needed, newest first", 8, 4, lengths(4, 4, 4, 4, 12), False, [0, 1, 2, 3, 4], 0, 25),
        ("the growing sequence may be the newest: it preempts itself and stops", 6, 4, lengths(8, 8, 7), False,
         [0, 1, 2], 2, 9),
        ("shared prefix blocks only return when their last holder goes", 4, 4, [[9] * 8] * 3, True, [0, 1, 2], 0, 16),
        ("cached blocks a victim frees count as free", 5, 4, lengths(8, 8, 4), True, [0, 1, 2], 0, 9),
        ("a forked sibling goes: the shared last block needs no copy any more", 4, 4,
         [*lengths(6, 8)[:2], ("fork", 0)], False, [0, 1, 2], 0, 7),
    ]
    with exercise("5.2", "preemption: choose victims, release blocks") as ex:
        cases += [_random_preempt_case(ex.rng, k) for k in range(8)]
        for name, num_blocks, bs, seqs, caching, order, seq_id, num_tokens in cases:
            def same(num_blocks=num_blocks, bs=bs, seqs=seqs, caching=caching, order=order, seq_id=seq_id,
                     num_tokens=num_tokens):
                bm, ref_bm = (_build_pool(num_blocks, bs, seqs, caching) for _ in range(2))
                running, ref_running = list(order), list(order)
                state = (f"(block size {bs}, {num_blocks} blocks, {bm.num_free_blocks} free, running {order} holding "
                         f"{[_seq_len(seqs, i) for i in order]} tokens, sequence {seq_id} grows to {num_tokens})")
                got = fn(bm, running, seq_id, num_tokens)
                expected = _preempt_ref(ref_bm, ref_running, seq_id, num_tokens)
                assert_equal(list(got), expected, what=f"victims {state}")
                assert_equal(running, ref_running, what=f"`running` after preemption {state}")
                assert_equal(sorted(bm.tables), sorted(ref_bm.tables), what=f"sequences still holding blocks {state}")
                assert_equal(bm.num_free_blocks, ref_bm.num_free_blocks, what=f"free blocks after preemption {state}")
                assert_equal(bm.ref_counts, ref_bm.ref_counts, what=f"block reference counts {state}")

            ex.check(name, same)


# ---------------------------------------------------------------------------------------------------------------------
# 5.3 Packing a mixed prefill/decode batch
# ---------------------------------------------------------------------------------------------------------------------


class _Tables:
    """The two BlockManager methods `prepare_batch` uses, over fixed block tables."""

    def __init__(self, tables: list[list[int]], block_size: int):
        self.tables, self.block_size = tables, block_size

    def block_table(self, i: int) -> list[int]:
        return list(self.tables[i])

    def slot_mapping(self, i: int, start: int, end: int) -> list[int]:
        return [self.tables[i][p // self.block_size] * self.block_size + p % self.block_size for p in range(start, end)]


def _pack_ref(token_ids, num_computed, num_new, block_tables, block_size):
    from types import SimpleNamespace

    from minillm.attention.backends import prepare_batch
    from minillm.engine.scheduler import SchedulerOutput

    seqs = [SimpleNamespace(seq_id=i, token_ids=t, num_computed_tokens=c, num_tokens=len(t))
            for i, (t, c) in enumerate(zip(token_ids, num_computed))]
    ids, pos, batch, _ = prepare_batch(SchedulerOutput(seqs, list(num_new)), _Tables(block_tables, block_size))
    return (ids[0].tolist(), pos[0].tolist(), batch.slot_mapping.tolist(), batch.cu_seqlens_q.tolist(),
            batch.context_lens.tolist())


def _random_pack_case(rng: random.Random, k: int):
    """A step of 1-6 sequences: decodes, whole prompts and chunks that start on or off a block boundary."""
    bs = rng.choice([1, 2, 4, 8, 16])
    tokens, computed, new, tables = [], [], [], []
    for _ in range(rng.randint(1, 6)):
        length = rng.randint(1, 40)
        kind = rng.random()
        if kind < 0.35:  # a decode (or a one-token prompt)
            start, n = length - 1, 1
        elif kind < 0.55:  # a whole prompt
            start, n = 0, length
        else:  # a chunk; one after a prefix-cache hit starts at a block boundary
            start = rng.randint(0, length - 1)
            if rng.random() < 0.4:
                start -= start % bs
            n = rng.randint(1, length - start)
        num_blocks = -(-(start + n) // bs) + rng.choice([0, 0, 1])  # a table may hold a block for later tokens
        tokens.append([rng.randrange(1000) for _ in range(length)])
        computed.append(start)
        new.append(n)
        tables.append(rng.sample(range(2 * num_blocks + 8), num_blocks))
    return f"random batch {k}: block size {bs}", tokens, computed, new, tables, bs


def check_pack_batch(fn: Callable) -> None:
    """Exercise 5.3. `fn(token_ids, num_computed, num_new, block_tables, block_size) -> packed lists`.

    Sequence i has tokens `token_ids[i]`, of which the first `num_computed[i]` have K/V in the cache; this step
    computes the next `num_new[i]`. Return (input_ids, positions, slot_mapping, cu_seqlens_q, context_lens) as
    lists: the new tokens of all sequences end to end, their positions, their pool slots
    ``block_table[p // BS] * BS + p % BS``, the cumulative query lengths starting at 0, and each context length
    after this step (as ``minillm.attention.backends.prepare_batch``).
    """
    cases = [
        ("one prompt from scratch", [list(range(10, 17))], [0], [7], [[3, 8]], 4),
        ("a prompt chunk and two decodes", [list(range(20, 40)), list(range(40, 46)), list(range(50, 59))],
         [8, 5, 8], [6, 1, 1], [[0, 4, 2, 9, 9], [7, 1], [5, 6, 11]], 4),
        ("a one-token prompt", [[42]], [0], [1], [[5]], 2),
        ("a decode at the first slot of a fresh block", [list(range(60, 69))], [8], [1], [[6, 2, 5]], 4),
        ("a chunk that starts mid-block and crosses two block boundaries, then a prompt",
         [list(range(100, 114)), [7, 8, 9]], [3, 0], [9, 3], [[7, 0, 3, 9], [12, 1]], 4),
        ("block size 1: every token has its own block", [[5, 6, 7], [8, 9]], [1, 1], [2, 1], [[4, 0, 2], [3, 1]], 1),
    ]
    with exercise("5.3", "packing a mixed prefill/decode batch") as ex:
        cases += [_random_pack_case(ex.rng, k) for k in range(6)]
        for name, tokens, computed, new, tables, bs in cases:
            def same(tokens=tokens, computed=computed, new=new, tables=tables, bs=bs):
                got = fn([list(t) for t in tokens], list(computed), list(new), [list(t) for t in tables], bs)
                expected = _pack_ref(tokens, computed, new, tables, bs)
                names = ["input_ids", "positions", "slot_mapping", "cu_seqlens_q", "context_lens"]
                assert_equal(len(got), 5, what="number of returned lists")
                for field_name, a, b in zip(names, got, expected):
                    assert_equal([int(x) for x in a], b, what=f"{field_name} (num_computed={computed}, num_new={new}, "
                                                              f"block_size={bs}, block_tables={tables})")

            ex.check(name, same)


# ---------------------------------------------------------------------------------------------------------------------
# 5.4 Static vs continuous batching, in decode steps
# ---------------------------------------------------------------------------------------------------------------------


def _random_out_lens(rng: random.Random, k: int) -> tuple[str, list[int], int]:
    kind = k % 4
    n = rng.randint(1, 40)
    if kind == 0:
        name, out_lens = "uniform lengths", [rng.randint(1, 64) for _ in range(n)]
    elif kind == 1:
        name, out_lens = "long-tailed lengths", [1 + int(rng.lognormvariate(2.5, 1.0)) for _ in range(n)]
    elif kind == 2:
        name, out_lens = "a few long requests among short ones", [rng.choice([1, 2, 3, 3, 4, 50, 90]) for _ in range(n)]
    else:
        name, out_lens = "two lengths", [rng.choice([5, 17]) for _ in range(n)]
    # The number of requests is often not a multiple of max_num_seqs; sometimes there are more slots than requests.
    max_num_seqs = rng.choice([1, 2, 3, rng.randint(2, 9), n + rng.randint(0, 3)])
    return f"random workload {k}: {name}", out_lens, max_num_seqs


def check_static_bound(fn: Callable) -> None:
    """Exercise 5.4. `fn(out_lens, max_num_seqs) -> float`, as ``minillm.bench.engine.static_bound``.

    All requests wait at step 0, request i decodes ``out_lens[i]`` tokens, one per step, and at most `max_num_seqs`
    run at a time. Static batching takes them in order in batches of `max_num_seqs`, each batch running as many
    steps as its longest member; FCFS continuous batching gives a freed slot to the next request at once. Returns
    static steps / continuous steps.
    """
    from minillm.bench.engine import static_bound

    cases = [
        ("a slot freed early serves the short requests", [10, 1, 1, 1], 2),
        ("FCFS: a freed slot takes the next request in order", [6, 2, 3, 3, 1], 2),
        ("equal lengths leave no hole to fill", [7] * 12, 4),
        ("one slot: both run the requests one after another", [3, 5, 2], 1),
        ("more slots than requests", [4, 9, 2], 8),
        ("a partial last batch still runs", [5, 1, 1, 1, 9], 2),
        ("continuous cannot beat its own longest request", [20, 1, 1, 1, 1, 1], 3),
        ("a single request", [13], 4),
    ]
    with exercise("5.4", "static vs continuous batching, in decode steps") as ex:
        cases += [_random_out_lens(ex.rng, k) for k in range(8)]
        for name, out_lens, max_num_seqs in cases:
            def same(out_lens=out_lens, max_num_seqs=max_num_seqs):
                got = fn(list(out_lens), max_num_seqs)
                what = f"static_bound({out_lens}, max_num_seqs={max_num_seqs})"
                if isinstance(got, bool) or not isinstance(got, numbers.Real):
                    raise AssertionError(f"{what}: expected a number (static steps / continuous steps), got "
                                         f"{type(got).__name__} {got!r}")
                assert_close(float(got), static_bound(out_lens, max_num_seqs), atol=0, rtol=1e-9, what=what)

            ex.check(name, same)
