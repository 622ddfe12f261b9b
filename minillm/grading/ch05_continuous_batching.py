"""Chapter 5 checks (continuous batching), used by solutions/05_continuous_batching.ipynb.

Every check has a plausible wrong answer in tests/test_grading.py that it must reject.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from minillm.grading.framework import (
    assert_equal,
    exercise,
    generator,
)


__all__ = [  # the checks, re-exported by minillm.grading
    "check_schedule_step",
    "check_preempt",
    "check_pack_batch",
]

def _schedule_step_ref(running: list[int], waiting: list[int], budget: int, max_seqs: int) -> tuple[list[int], list[int]]:
    """Drive the real `Scheduler` (huge pool, no prefix caching) from the exercise's plain lists."""
    from minillm.engine.request import Sequence, Status
    from minillm.engine.sampling import SamplingParams
    from minillm.engine.scheduler import Scheduler
    from minillm.kvcache.blocks import BlockManager

    bm = BlockManager(100_000, 16, enable_prefix_caching=False)
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
        ("max_num_seqs caps admissions", [1, 1], [2, 2, 2, 2], 64, 3),
        ("the budget is used up exactly", [1], [7, 9], 8, 4),
        ("nothing waiting", [1, 1, 12], [], 64, 8),
    ]
    g = generator(150)
    for k in range(6):  # random mixes
        running = [1 if torch.rand(1, generator=g) < 0.6 else int(torch.randint(2, 40, (1,), generator=g))
                   for _ in range(int(torch.randint(0, 6, (1,), generator=g)))]
        waiting = torch.randint(1, 50, (int(torch.randint(0, 6, (1,), generator=g)),), generator=g).tolist()
        cases.append((f"random mix {k}", running, waiting, int(torch.randint(8, 64, (1,), generator=g)), 6))
    with exercise("5.1", "one scheduling step under a token budget") as ex:
        for name, running, waiting, budget, max_seqs in cases:
            expected = _schedule_step_ref(running, waiting, budget, max_seqs)

            def same(running=running, waiting=waiting, budget=budget, max_seqs=max_seqs, expected=expected):
                got = fn(list(running), list(waiting), budget, max_seqs)
                assert_equal((list(got[0]), list(got[1])), expected,
                             what=f"(running_tokens, admitted) for running={running}, waiting={waiting}, "
                                  f"budget={budget}, max_num_seqs={max_seqs}")

            ex.check(name, same)


def _preempt_ref(bm, running: list[int], seq_id: int, num_tokens: int) -> list[int]:
    victims = []
    while seq_id not in victims and not bm.can_allocate(bm.num_blocks_needed(seq_id, num_tokens)):
        victims.append(running.pop())
        bm.free(victims[-1])
    return victims


def _preempt_case(num_blocks: int, lengths: list[int], shared: bool = False):
    """A BlockManager with block size 4 holding sequences 0.. of the given lengths (1 and 2 share a prefix if asked)."""
    from minillm.kvcache.blocks import BlockManager

    bm = BlockManager(num_blocks, 4, enable_prefix_caching=shared)
    for i, n in enumerate(lengths):
        tokens = [9] * n if shared else [10 + i] * n
        bm.allocate_prompt(i, tokens)
        bm.ensure_capacity(i, n)
        bm.commit(i, tokens, n)
    return bm


def check_preempt(fn: Callable) -> None:
    """Exercise 5.2. `fn(bm, running, seq_id, num_tokens) -> victims`: make room for a sequence to grow.

    Sequence `seq_id` (in `running`, a list of seq ids oldest first) must hold `num_tokens` tokens. While
    ``bm.can_allocate(bm.num_blocks_needed(seq_id, num_tokens))`` is false, preempt the NEWEST running sequence:
    remove it from `running` (in place) and ``bm.free`` it; stop early if `seq_id` itself was preempted (it then
    waits to be recomputed). Return the preempted ids in order (empty when nothing had to go).
    """
    cases = [
        ("nothing to do when a block is free", 8, [5, 6, 3], 0, 9),
        ("the newest goes first", 6, [8, 8, 7], 0, 9),
        ("as many as needed, newest first", 8, [4, 4, 4, 4, 12], 0, 25),
        ("the growing sequence may be the newest: it preempts itself and stops", 6, [8, 8, 7], 2, 9),
        ("shared prefix blocks only return when their last holder goes", 4, [8, 8, 8], 0, 16),
    ]
    with exercise("5.2", "preemption: choose victims, release blocks") as ex:
        for name, num_blocks, lengths, seq_id, num_tokens in cases:
            shared = "shared" in name

            def same(num_blocks=num_blocks, lengths=lengths, seq_id=seq_id, num_tokens=num_tokens, shared=shared):
                bm, ref_bm = _preempt_case(num_blocks, lengths, shared), _preempt_case(num_blocks, lengths, shared)
                running, ref_running = list(range(len(lengths))), list(range(len(lengths)))
                got = fn(bm, running, seq_id, num_tokens)
                expected = _preempt_ref(ref_bm, ref_running, seq_id, num_tokens)
                assert_equal(list(got), expected, what=f"victims (lengths {lengths}, seq {seq_id} grows to {num_tokens})")
                assert_equal(running, ref_running, what="`running` after preemption")
                assert_equal(sorted(bm.tables), sorted(ref_bm.tables), what="sequences still holding blocks")
                assert_equal(bm.num_free_blocks, ref_bm.num_free_blocks, what="free blocks after preemption")

            ex.check(name, same)


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

    from minillm.engine.runner import prepare_batch
    from minillm.engine.scheduler import SchedulerOutput

    seqs = [SimpleNamespace(seq_id=i, token_ids=t, num_computed_tokens=c, num_tokens=len(t))
            for i, (t, c) in enumerate(zip(token_ids, num_computed))]
    ids, pos, batch, _ = prepare_batch(SchedulerOutput(seqs, list(num_new)), _Tables(block_tables, block_size))
    return (ids[0].tolist(), pos[0].tolist(), batch.slot_mapping.tolist(), batch.cu_seqlens_q.tolist(),
            batch.context_lens.tolist())


def check_pack_batch(fn: Callable) -> None:
    """Exercise 5.3. `fn(token_ids, num_computed, num_new, block_tables, block_size) -> packed lists`.

    Sequence i has tokens `token_ids[i]`, of which the first `num_computed[i]` have K/V in the cache; this step
    computes the next `num_new[i]`. Return (input_ids, positions, slot_mapping, cu_seqlens_q, context_lens) as
    lists: the new tokens of all sequences end to end, their positions, their pool slots
    ``block_table[p // BS] * BS + p % BS``, the cumulative query lengths starting at 0, and each context length
    after this step (as ``minillm.engine.runner.prepare_batch``).
    """
    g = generator(160)
    cases = [
        ("one prompt from scratch", [list(range(10, 17))], [0], [7], [[3, 8]], 4),
        ("a prompt chunk and two decodes", [list(range(20, 40)), list(range(40, 46)), list(range(50, 59))],
         [8, 5, 8], [6, 1, 1], [[0, 4, 2, 9, 9], [7, 1], [5, 6, 11]], 4),
    ]
    for k in range(4):
        n = int(torch.randint(1, 6, (1,), generator=g))
        lens = torch.randint(1, 40, (n,), generator=g).tolist()
        computed = [int(torch.randint(0, L, (1,), generator=g)) for L in lens]
        new = [int(torch.randint(1, L - c + 1, (1,), generator=g)) for L, c in zip(lens, computed)]
        tables = [torch.randperm(40, generator=g)[: -(-L // 8)].tolist() for L in lens]
        tokens = [torch.randint(0, 1000, (L,), generator=g).tolist() for L in lens]
        cases.append((f"random batch {k}", tokens, computed, new, tables, 8))
    with exercise("5.3", "packing a mixed prefill/decode batch") as ex:
        for name, tokens, computed, new, tables, bs in cases:
            def same(tokens=tokens, computed=computed, new=new, tables=tables, bs=bs):
                got = fn(tokens, list(computed), list(new), tables, bs)
                expected = _pack_ref(tokens, computed, new, tables, bs)
                names = ["input_ids", "positions", "slot_mapping", "cu_seqlens_q", "context_lens"]
                assert_equal(len(got), 5, what="number of returned lists")
                for field_name, a, b in zip(names, got, expected):
                    assert_equal([int(x) for x in a], b, what=f"{field_name} (num_computed={computed}, num_new={new})")

            ex.check(name, same)
