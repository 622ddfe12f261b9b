"""Chapter 05's graded checks against right answers and plausible wrong ones (collected by tests/test_grading.py).

A wrong answer is a mistake a learner would plausibly make, written as a small function with a comment saying what
is wrong; every check must reject each of its wrong answers and pass each right answer on every random seed.
The last test recomputes the worked example above each exercise in the solution notebook with the package's
reference and checks that the notebook's text shows that result.
"""

import heapq
import math
from pathlib import Path

import pytest

from minillm import grading
from minillm.bench.engine import static_bound
from minillm.course import exercise_header, read_notebook
from minillm.grading.ch05_continuous_batching import (
    _build_pool,
    _pack_ref,
    _preempt_ref,
    _schedule_step_ref,
)

SOLUTION = Path(__file__).resolve().parents[2] / "solutions" / "05_continuous_batching.ipynb"

RIGHT_ANSWERS = []
WRONG_ANSWERS = []


# ---- 5.1 one scheduling step ------------------------------------------------------------------------------------


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


def schedule_step_shortest_prefill_first(running, waiting, max_num_batched_tokens, max_num_seqs):
    running_tokens, _ = schedule_step_right([1 if left == 1 else 0 for left in running], [], max_num_batched_tokens,
                                            max_num_seqs)
    budget = max_num_batched_tokens - sum(running_tokens)
    # Unfinished prompts shortest first (to finish more of them): not FCFS, the oldest one can starve.
    for i in sorted((i for i, left in enumerate(running) if left > 1), key=lambda i: running[i]):
        running_tokens[i] = min(running[i], budget)
        budget -= running_tokens[i]
    _, admitted = schedule_step_right([], waiting, budget, max_num_seqs - len(running)) if budget else ([], [])
    return running_tokens, admitted


def schedule_step_cap_counts_only_decodes(running, waiting, max_num_batched_tokens, max_num_seqs):
    running_tokens, _ = schedule_step_right(running, [], max_num_batched_tokens, max_num_seqs)
    budget = max_num_batched_tokens - sum(running_tokens)
    num_decodes = sum(left == 1 for left in running)  # forgets that a prefilling sequence also holds a slot
    admitted = []
    for prompt_len in waiting:
        if budget == 0 or num_decodes + len(admitted) >= max_num_seqs:
            break
        admitted.append(min(prompt_len, budget))
        budget -= admitted[-1]
    return running_tokens, admitted


def schedule_step_cap_checked_after_admitting(running, waiting, max_num_batched_tokens, max_num_seqs):
    running_tokens, _ = schedule_step_right(running, [], max_num_batched_tokens, max_num_seqs)
    budget = max_num_batched_tokens - sum(running_tokens)
    admitted = []
    for prompt_len in waiting:
        if budget == 0:
            break
        admitted.append(min(prompt_len, budget))
        budget -= admitted[-1]
        if len(running) + len(admitted) >= max_num_seqs:  # checked after admitting: one too many when already full
            break
    return running_tokens, admitted


def schedule_step_skips_to_prompts_that_fit(running, waiting, max_num_batched_tokens, max_num_seqs):
    running_tokens, _ = schedule_step_right(running, [], max_num_batched_tokens, max_num_seqs)
    budget = max_num_batched_tokens - sum(running_tokens)
    admitted = []
    for j, prompt_len in enumerate(waiting):
        if budget == 0 or len(running) + len(admitted) >= max_num_seqs:
            break
        if prompt_len > budget and j + 1 < len(waiting) and waiting[j + 1] <= budget:
            # lets a later prompt that fits overtake one that would need chunking: not first come first served
            waiting[j], waiting[j + 1] = waiting[j + 1], waiting[j]
            prompt_len = waiting[j]
        admitted.append(min(prompt_len, budget))
        budget -= admitted[-1]
    return running_tokens, admitted


def schedule_step_strict_budget(running, waiting, max_num_batched_tokens, max_num_seqs):
    running_tokens, _ = schedule_step_right(running, [], max_num_batched_tokens, max_num_seqs)
    budget = max_num_batched_tokens - sum(running_tokens)
    admitted = []
    for prompt_len in waiting:
        if budget == 0 or len(running) + len(admitted) >= max_num_seqs:
            break
        if prompt_len < budget:  # `<` where `<=` is meant: a prompt exactly as long as the budget left is chunked
            admitted.append(prompt_len)
        else:
            admitted.append(budget - 1 if budget > 1 else 1)  # ... to "leave room", one token short
        budget -= admitted[-1]
    return running_tokens, admitted


# ---- 5.2 preemption -----------------------------------------------------------------------------------------------


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


def preempt_highest_id(bm, running, seq_id, num_tokens):
    victims = []
    while not bm.can_allocate(bm.num_blocks_needed(seq_id, num_tokens)) and seq_id not in victims:
        victims.append(max(running))  # "newest = highest id": wrong once a preempted sequence was re-admitted
        running.remove(victims[-1])
        bm.free(victims[-1])
    return victims


def preempt_needed_once(bm, running, seq_id, num_tokens):
    needed = bm.num_blocks_needed(seq_id, num_tokens)  # computed once: a victim sharing its blocks changes it
    victims = []
    while bm.num_free_blocks < needed and seq_id not in victims:
        victims.append(running.pop())
        bm.free(victims[-1])
    return victims


def preempt_counts_blocks_by_hand(bm, running, seq_id, num_tokens):
    victims = []
    while seq_id not in victims:
        # ceil(num_tokens / BS) minus the blocks it holds: forgets that a shared block it writes must be copied
        needed = max(0, math.ceil(num_tokens / bm.block_size) - len(bm.tables[seq_id]))
        if bm.can_allocate(needed):
            break
        victims.append(running.pop())
        bm.free(victims[-1])
    return victims


def preempt_free_list_only(bm, running, seq_id, num_tokens):
    victims = []
    # counts only never-used blocks: a victim's cached blocks are free too (evictable), so this over-preempts
    while len(bm.free_block_ids) < bm.num_blocks_needed(seq_id, num_tokens) and seq_id not in victims:
        victims.append(running.pop())
        bm.free(victims[-1])
    return victims


def preempt_keeps_going_after_itself(bm, running, seq_id, num_tokens):
    victims = []
    while running and not bm.can_allocate(bm.num_blocks_needed(seq_id, num_tokens)):
        victims.append(running.pop())  # no stop once seq_id itself is gone: preempts others for nothing
        bm.free(victims[-1])
    return victims


def preempt_rebinds_running(bm, running, seq_id, num_tokens):
    victims = []
    while not bm.can_allocate(bm.num_blocks_needed(seq_id, num_tokens)) and seq_id not in victims:
        victims.append(running[-1])
        running = running[:-1]  # a new list: the caller's `running` still lists the victims
        bm.free(victims[-1])
    return victims


# ---- 5.3 packing a batch ------------------------------------------------------------------------------------------


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


def pack_batch_positions_from_zero(token_ids, num_computed, num_new, block_tables, block_size):
    ids, pos, slots, cu, ctx = pack_batch_right(token_ids, num_computed, num_new, block_tables, block_size)
    pos = [p for n in num_new for p in range(n)]  # forgets the cached tokens before the chunk
    return ids, pos, slots, cu, ctx


def pack_batch_cu_without_zero(token_ids, num_computed, num_new, block_tables, block_size):
    ids, pos, slots, cu, ctx = pack_batch_right(token_ids, num_computed, num_new, block_tables, block_size)
    return ids, pos, slots, cu[1:], ctx


def pack_batch_context_is_all_tokens(token_ids, num_computed, num_new, block_tables, block_size):
    ids, pos, slots, cu, ctx = pack_batch_right(token_ids, num_computed, num_new, block_tables, block_size)
    return ids, pos, slots, cu, [len(t) for t in token_ids]  # the known tokens, not those in the cache after the step


def pack_batch_last_tokens(token_ids, num_computed, num_new, block_tables, block_size):
    ids, pos, slots, cu, ctx = pack_batch_right(token_ids, num_computed, num_new, block_tables, block_size)
    ids = [t for tokens, n in zip(token_ids, num_new) for t in tokens[-n:]]  # right for a decode, not for a chunk
    return ids, pos, slots, cu, ctx


def pack_batch_slots_from_chunk_start(token_ids, num_computed, num_new, block_tables, block_size):
    ids, pos, slots, cu, ctx = pack_batch_right(token_ids, num_computed, num_new, block_tables, block_size)
    slots = []
    for start, n, table in zip(num_computed, num_new, block_tables):
        first = start // block_size  # as if the chunk began at the start of a block: wrong when start % BS != 0
        slots += [table[first + j // block_size] * block_size + j % block_size for j in range(n)]
    return ids, pos, slots, cu, ctx


def pack_batch_block_index_rounded_up(token_ids, num_computed, num_new, block_tables, block_size):
    ids, pos, slots, cu, ctx = pack_batch_right(token_ids, num_computed, num_new, block_tables, block_size)
    slots = [table[max(0, math.ceil(p / block_size) - 1)] * block_size + p % block_size  # "blocks for p tokens, - 1"
             for start, n, table in zip(num_computed, num_new, block_tables) for p in range(start, start + n)]
    return ids, pos, slots, cu, ctx


# ---- 5.4 static vs continuous -------------------------------------------------------------------------------------


def static_bound_right(out_lens, max_num_seqs):
    static_steps = sum(max(out_lens[i : i + max_num_seqs]) for i in range(0, len(out_lens), max_num_seqs))
    slot_free_at = [0] * max_num_seqs
    for n in out_lens:
        heapq.heappush(slot_free_at, heapq.heappop(slot_free_at) + n)
    return static_steps / max(slot_free_at)


def static_bound_by_hand(out_lens, max_num_seqs):
    batches = [out_lens[i : i + max_num_seqs] for i in range(0, len(out_lens), max_num_seqs)]
    slots = [0] * max_num_seqs
    for n in out_lens:  # the slot that frees first takes the next request
        slots[slots.index(min(slots))] += n
    return sum(max(b) for b in batches) / max(slots)


def static_bound_perfect_packing(out_lens, max_num_seqs):
    static_steps = sum(max(out_lens[i : i + max_num_seqs]) for i in range(0, len(out_lens), max_num_seqs))
    # as if the tokens could be spread evenly over the slots: a request cannot be split, nor beat its own length
    return static_steps / math.ceil(sum(out_lens) / max_num_seqs)


def static_bound_round_robin(out_lens, max_num_seqs):
    static_steps = sum(max(out_lens[i : i + max_num_seqs]) for i in range(0, len(out_lens), max_num_seqs))
    slots = [0] * max_num_seqs
    for i, n in enumerate(out_lens):
        slots[i % max_num_seqs] += n  # request i waits for slot i % S even when another slot is free sooner
    return static_steps / max(slots)


def static_bound_whole_batches_only(out_lens, max_num_seqs):
    # len // S batches: a last batch shorter than max_num_seqs is forgotten
    static_steps = sum(max(out_lens[b * max_num_seqs : (b + 1) * max_num_seqs])
                       for b in range(len(out_lens) // max_num_seqs))
    slot_free_at = [0] * max_num_seqs
    for n in out_lens:
        heapq.heappush(slot_free_at, heapq.heappop(slot_free_at) + n)
    return static_steps / max(slot_free_at)


def static_bound_longest_first(out_lens, max_num_seqs):
    static_steps = sum(max(out_lens[i : i + max_num_seqs]) for i in range(0, len(out_lens), max_num_seqs))
    slot_free_at = [0] * max_num_seqs
    for n in sorted(out_lens, reverse=True):  # longest first packs better, but it is not first come first served
        heapq.heappush(slot_free_at, heapq.heappop(slot_free_at) + n)
    return static_steps / max(slot_free_at)


def static_bound_global_max(out_lens, max_num_seqs):
    # every static batch as long as the longest request of the whole workload, not of its own batch
    static_steps = math.ceil(len(out_lens) / max_num_seqs) * max(out_lens)
    slot_free_at = [0] * max_num_seqs
    for n in out_lens:
        heapq.heappush(slot_free_at, heapq.heappop(slot_free_at) + n)
    return static_steps / max(slot_free_at)


def static_bound_forgets_the_slot_time(out_lens, max_num_seqs):
    static_steps = sum(max(out_lens[i : i + max_num_seqs]) for i in range(0, len(out_lens), max_num_seqs))
    slot_free_at = [0] * max_num_seqs
    for n in out_lens:
        heapq.heappop(slot_free_at)
        heapq.heappush(slot_free_at, n)  # the request's length, not the step at which it ends (free_at + n)
    return static_steps / max(slot_free_at)


RIGHT_ANSWERS += [
    pytest.param(grading.check_schedule_step, schedule_step_right, id="5.1-schedule-step"),
    pytest.param(grading.check_preempt, preempt_right, id="5.2-preempt"),
    pytest.param(grading.check_pack_batch, pack_batch_right, id="5.3-pack-batch"),
    pytest.param(grading.check_static_bound, static_bound_right, id="5.4-static-bound"),
    pytest.param(grading.check_static_bound, static_bound_by_hand, id="5.4-static-bound-without-heap"),
    pytest.param(grading.check_static_bound, static_bound, id="5.4-reference"),
]
WRONG_ANSWERS += [
    pytest.param(grading.check_schedule_step, schedule_step_prefills_first, id="5.1-prefills-before-decodes"),
    pytest.param(grading.check_schedule_step, schedule_step_no_chunking, id="5.1-no-chunking"),
    pytest.param(grading.check_schedule_step, schedule_step_shortest_prefill_first, id="5.1-shortest-prefill-first"),
    pytest.param(grading.check_schedule_step, schedule_step_cap_counts_only_decodes, id="5.1-cap-counts-only-decodes"),
    pytest.param(grading.check_schedule_step, schedule_step_cap_checked_after_admitting,
                 id="5.1-cap-checked-after-admitting"),
    pytest.param(grading.check_schedule_step, schedule_step_skips_to_prompts_that_fit, id="5.1-not-fcfs"),
    pytest.param(grading.check_schedule_step, schedule_step_strict_budget, id="5.1-budget-off-by-one"),
    pytest.param(grading.check_preempt, preempt_oldest, id="5.2-oldest-first"),
    pytest.param(grading.check_preempt, preempt_never_itself, id="5.2-spares-itself"),
    pytest.param(grading.check_preempt, preempt_highest_id, id="5.2-highest-id-first"),
    pytest.param(grading.check_preempt, preempt_needed_once, id="5.2-blocks-needed-computed-once"),
    pytest.param(grading.check_preempt, preempt_counts_blocks_by_hand, id="5.2-forgets-copy-on-write"),
    pytest.param(grading.check_preempt, preempt_free_list_only, id="5.2-cached-blocks-not-free"),
    pytest.param(grading.check_preempt, preempt_keeps_going_after_itself, id="5.2-no-stop-after-itself"),
    pytest.param(grading.check_preempt, preempt_rebinds_running, id="5.2-running-not-changed-in-place"),
    pytest.param(grading.check_pack_batch, pack_batch_positions_from_zero, id="5.3-positions-from-zero"),
    pytest.param(grading.check_pack_batch, pack_batch_cu_without_zero, id="5.3-cu-without-zero"),
    pytest.param(grading.check_pack_batch, pack_batch_context_is_all_tokens, id="5.3-context-lens-all-tokens"),
    pytest.param(grading.check_pack_batch, pack_batch_last_tokens, id="5.3-input-ids-from-the-end"),
    pytest.param(grading.check_pack_batch, pack_batch_slots_from_chunk_start, id="5.3-slots-from-chunk-start"),
    pytest.param(grading.check_pack_batch, pack_batch_block_index_rounded_up, id="5.3-block-index-rounded-up"),
    pytest.param(grading.check_static_bound, static_bound_perfect_packing, id="5.4-perfect-packing"),
    pytest.param(grading.check_static_bound, static_bound_round_robin, id="5.4-round-robin-slots"),
    pytest.param(grading.check_static_bound, static_bound_whole_batches_only, id="5.4-drops-partial-batch"),
    pytest.param(grading.check_static_bound, static_bound_longest_first, id="5.4-longest-first"),
    pytest.param(grading.check_static_bound, static_bound_global_max, id="5.4-global-max"),
    pytest.param(grading.check_static_bound, static_bound_forgets_the_slot_time, id="5.4-forgets-slot-time"),
]


# ---- the worked examples in the notebook ------------------------------------------------------------------------


def worked_examples() -> dict[str, list[str]]:
    """Exercise number -> text its worked example must contain, every result computed with the package's reference."""
    example_51 = []
    for running, waiting, budget, max_seqs in [([1, 5, 1], [3, 6, 4], 12, 8), ([1, 5, 1], [3, 6, 4], 12, 4)]:
        result = _schedule_step_ref(running, waiting, budget, max_seqs)
        example_51.append(f"`schedule_step({running}, {waiting}, {budget}, {max_seqs})` returns `{result}`")

    example_52 = []
    for seq_id, num_tokens in [(0, 9), (2, 8), (2, 9)]:
        bm, running = _build_pool(6, 4, [[10] * 8, [11] * 8, [12] * 7], prefix_caching=False), [0, 1, 2]
        assert bm.num_free_blocks == 0 and [len(bm.tables[i]) for i in running] == [2, 2, 2]  # "all in use, 2 each"
        victims = _preempt_ref(bm, running, seq_id, num_tokens)
        example_52.append(f"`preempt(bm, [0, 1, 2], {seq_id}, {num_tokens})` returns `{victims}`")
        if (seq_id, num_tokens) == (0, 9):
            example_52.append(f"gives its {bm.num_free_blocks} blocks back, and `running` becomes `{running}`")

    args = ([[10, 11, 12, 13, 14], [20, 21, 22]], [2, 2], [3, 1], [[5, 1], [7]], 4)
    packed = _pack_ref(*args)
    assert packed[1][2] == 4  # the third packed token sits at position 4: block 4 // 4 = 1, offset 0
    example_53 = [f"`pack_batch({', '.join(map(str, args))})` returns `{packed}`",
                  f"slot `1 * 4 + 0 = {packed[2][2]}`"]

    out_lens, max_num_seqs = [6, 2, 3, 3, 1], 2
    ratio = static_bound(out_lens, max_num_seqs)
    batches = [out_lens[i : i + max_num_seqs] for i in range(0, len(out_lens), max_num_seqs)]
    static_steps = sum(max(b) for b in batches)
    continuous_steps = round(static_steps / ratio)
    assert static_steps / continuous_steps == ratio
    example_54 = [f"`static_bound({out_lens}, {max_num_seqs})` returns `{ratio}`",
                  f"take {' + '.join(str(max(b)) for b in batches)} = {static_steps} steps",
                  f"{continuous_steps} steps in all. {static_steps} / {continuous_steps} = {ratio}"]
    return {"5.1": example_51, "5.2": example_52, "5.3": example_53, "5.4": example_54}


def test_worked_examples_match_the_reference():
    cells = read_notebook(SOLUTION).cells
    above = {}  # exercise number -> the markdown cell just above its exercise cell, whitespace collapsed
    for i, cell in enumerate(cells):
        header = exercise_header(cell.source) if cell.cell_type == "code" else None
        if header:
            above[header[0]] = " ".join(next(c.source for c in reversed(cells[:i]) if c.cell_type == "markdown").split())
    assert sorted(above) == ["5.1", "5.2", "5.3", "5.4"], sorted(above)
    for number, lines in worked_examples().items():
        assert "**Worked example.**" in above[number], f"Exercise {number} has no worked example above it"
        for line in lines:
            assert line in above[number], f"Exercise {number}'s worked example lacks (or contradicts) this text:\n{line}"
