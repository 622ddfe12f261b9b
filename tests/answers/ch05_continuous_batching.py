"""Chapter 05's graded checks against right answers and plausible wrong ones (collected by tests/test_grading.py).

A wrong answer is a mistake a learner would plausibly make, written as a small function with a comment saying what
is wrong; every check must reject each of its wrong answers and pass each right answer on every random seed.
"""

import pytest

from minillm import grading

RIGHT_ANSWERS = []
WRONG_ANSWERS = []


def schedule_step_right(running, waiting, max_num_batched_tokens, max_num_seqs):
    """running: tokens left per running sequence (oldest first); waiting: prompt lengths (FCFS)."""
    budget = max_num_batched_tokens
    running_tokens = [0] * len(running)
    for i, left in enumerate(running):  # decodes first: one token each
        if left == 1 and budget > 0:
            running_tokens[i], budget = 1, budget - 1
    for i, left in enumerate(running):  # then unfinished prompts, in chunks
        if left > 1 and budget > 0:
            running_tokens[i] = min(left, budget)
            budget -= running_tokens[i]
    admitted = []
    for prompt_len in waiting:  # then new prompts, first come first served
        if budget == 0 or len(running) + len(admitted) >= max_num_seqs:
            break
        admitted.append(min(prompt_len, budget))
        budget -= admitted[-1]
    return running_tokens, admitted


def preempt_right(bm, running, seq_id, num_tokens):
    """Preempt the newest running sequences until `seq_id` can grow to `num_tokens` tokens."""
    victims = []
    while not bm.can_allocate(bm.num_blocks_needed(seq_id, num_tokens)):
        victim = running.pop()  # the newest
        bm.free(victim)
        victims.append(victim)
        if victim == seq_id:  # it gave its own blocks up: it will be recomputed later
            break
    return victims


def pack_batch_right(token_ids, num_computed, num_new, block_tables, block_size):
    """-> (input_ids, positions, slot_mapping, cu_seqlens_q, context_lens), all lists."""
    input_ids, positions, slot_mapping, cu_seqlens_q, context_lens = [], [], [], [0], []
    for tokens, start, n, table in zip(token_ids, num_computed, num_new, block_tables):
        for p in range(start, start + n):
            input_ids.append(tokens[p])
            positions.append(p)
            slot_mapping.append(table[p // block_size] * block_size + p % block_size)
        cu_seqlens_q.append(cu_seqlens_q[-1] + n)
        context_lens.append(start + n)
    return input_ids, positions, slot_mapping, cu_seqlens_q, context_lens


def schedule_step_prefills_first(running, waiting, max_num_batched_tokens, max_num_seqs):
    budget, running_tokens = max_num_batched_tokens, []
    for left in running:  # in list order: a long prompt can eat the budget of the decodes after it
        running_tokens.append(min(left, budget))
        budget -= running_tokens[-1]
    admitted = []
    for prompt_len in waiting:
        if budget == 0 or len(running) + len(admitted) >= max_num_seqs:
            break
        admitted.append(min(prompt_len, budget))
        budget -= admitted[-1]
    return running_tokens, admitted


def schedule_step_no_chunking(running, waiting, max_num_batched_tokens, max_num_seqs):
    running_tokens, admitted = schedule_step_right(running, [], max_num_batched_tokens, max_num_seqs)
    budget = max_num_batched_tokens - sum(running_tokens)
    for prompt_len in waiting:  # a prompt that does not fit whole waits
        if prompt_len > budget or len(running) + len(admitted) >= max_num_seqs:
            break
        admitted.append(prompt_len)
        budget -= prompt_len
    return running_tokens, admitted


def preempt_oldest(bm, running, seq_id, num_tokens):
    victims = []
    while not bm.can_allocate(bm.num_blocks_needed(seq_id, num_tokens)) and seq_id not in victims:
        victims.append(running.pop(0))
        bm.free(victims[-1])
    return victims


def preempt_never_itself(bm, running, seq_id, num_tokens):
    victims = []
    while not bm.can_allocate(bm.num_blocks_needed(seq_id, num_tokens)):
        victims.append([s for s in running if s != seq_id][-1])  # spares the growing sequence: wrong when newest
        running.remove(victims[-1])
        bm.free(victims[-1])
    return victims


def pack_batch_positions_from_zero(token_ids, num_computed, num_new, block_tables, block_size):
    ids, pos, slots, cu, ctx = pack_batch_right(token_ids, num_computed, num_new, block_tables, block_size)
    pos = [p for n in num_new for p in range(n)]  # forgets the cached tokens before the chunk
    return ids, pos, slots, cu, ctx


def pack_batch_cu_without_zero(token_ids, num_computed, num_new, block_tables, block_size):
    ids, pos, slots, cu, ctx = pack_batch_right(token_ids, num_computed, num_new, block_tables, block_size)
    return ids, pos, slots, cu[1:], ctx


RIGHT_ANSWERS += [
    pytest.param(grading.check_schedule_step, schedule_step_right, id="5.1-schedule-step"),
    pytest.param(grading.check_preempt, preempt_right, id="5.2-preempt"),
    pytest.param(grading.check_pack_batch, pack_batch_right, id="5.3-pack-batch"),
]
WRONG_ANSWERS += [
    pytest.param(grading.check_schedule_step, schedule_step_prefills_first, id="5.1-prefills-before-decodes"),
    pytest.param(grading.check_schedule_step, schedule_step_no_chunking, id="5.1-no-chunking"),
    pytest.param(grading.check_preempt, preempt_oldest, id="5.2-oldest-first"),
    pytest.param(grading.check_preempt, preempt_never_itself, id="5.2-spares-itself"),
    pytest.param(grading.check_pack_batch, pack_batch_positions_from_zero, id="5.3-positions-from-zero"),
    pytest.param(grading.check_pack_batch, pack_batch_cu_without_zero, id="5.3-cu-without-zero"),
]
