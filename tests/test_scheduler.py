"""Scheduler: unit tests for each rule, and hypothesis runs under random arrivals with a FAKE model.

The fake model keeps a fake KV pool (slot -> (token, position)) written through the real packing code
(`prepare_batch`); before "attending" it checks that every position of every scheduled sequence's context holds that
sequence's token, so block tables, copy-on-write, prefix caching and preemption are all checked without a model.
Its next token is a function of the tokens so far, so a correct engine gives the same output whatever the schedule.
"""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minillm.engine.request import Sequence, Status
from minillm.attention.backends import prepare_batch
from minillm.engine.sampling import SamplingParams
from minillm.engine.scheduler import Scheduler
from minillm.kvcache.blocks import BlockManager


def make_seq(seq_id, prompt, max_tokens=4, request_id=None, n=1, seed=None):
    prompt = list(range(3, 3 + prompt)) if isinstance(prompt, int) else prompt
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, n=n, temperature=1.0 if n > 1 else 0.0)
    return Sequence(seq_id=seq_id, request_id=str(seq_id if request_id is None else request_id),
                    prompt_token_ids=prompt, params=params, eos_token_ids=[2], max_model_len=10_000, seed=seed)


def next_token(token_ids):
    return (sum(token_ids) * 31 + len(token_ids)) % 97 + 3


def expected_output(prompt, max_tokens):
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(next_token(tokens))
    return tokens[len(prompt):]


class FakeModel:
    """Writes (token, position) into a fake pool and checks every context it would attend to."""

    def __init__(self, bm: BlockManager):
        self.bm, self.pool = bm, {}

    def step(self, sched: Scheduler):
        out = sched.schedule()
        bs = self.bm.block_size
        for src, dst in out.copies:
            for o in range(bs):
                if src * bs + o in self.pool:
                    self.pool[dst * bs + o] = self.pool[src * bs + o]
        if not out.seqs:
            return out, []
        ids, pos, batch, rows = prepare_batch(out, self.bm)
        for slot, t, p in zip(batch.slot_mapping.tolist(), ids[0].tolist(), pos[0].tolist()):
            self.pool[slot] = (t, p)
        for i, seq in enumerate(out.seqs):
            table = batch.block_tables[i].tolist()
            for p in range(batch.context_lens[i].item()):
                assert self.pool.get(table[p // bs] * bs + p % bs) == (seq.token_ids[p], p), (seq.seq_id, p)
        sampled = [s for i, s in enumerate(out.seqs) if out.is_last_chunk(i)]
        assert len(rows) == len(sampled) and rows == sorted(rows)
        sampled += [child for _, child in sched.commit(out)]
        for seq in sampled:
            seq.append_token(next_token(seq.token_ids))
        sched.free_finished()
        return out, sampled


def drain(sched, model, max_steps=5000):
    steps = 0
    while sched.has_unfinished():
        model.step(sched)
        steps += 1
        assert steps < max_steps, "the scheduler stopped making progress"
    return steps


def test_decodes_first_then_chunked_prefill_under_the_budget():
    bm = BlockManager(64, 4)
    sched, model = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=8), FakeModel(bm)
    a, b = make_seq(0, 3, max_tokens=10), make_seq(1, 2, max_tokens=10)
    sched.add(a), sched.add(b)
    out, _ = model.step(sched)
    assert out.num_new_tokens == [3, 2]
    long = make_seq(2, 20)
    sched.add(long)
    out, sampled = model.step(sched)
    assert out.seqs == [a, b, long] and out.num_new_tokens == [1, 1, 6] and long not in sampled
    out, _ = model.step(sched)
    assert out.num_new_tokens == [1, 1, 6]  # the long prompt keeps going in chunks; decodes never wait
    out, sampled = model.step(sched)
    assert out.num_new_tokens == [1, 1, 6]
    out, sampled = model.step(sched)
    assert out.num_new_tokens == [1, 1, 2] and long in sampled
    drain(sched, model)
    assert long.output_token_ids == expected_output(long.prompt_token_ids, 4)


def test_without_chunking_a_prompt_waits_for_room():
    bm = BlockManager(64, 4)
    sched, model = Scheduler(bm, 3, 11, enable_chunked_prefill=False), FakeModel(bm)
    sched.add(make_seq(0, 4, max_tokens=3)), sched.add(make_seq(1, [60] * 4, max_tokens=3))
    model.step(sched)
    sched.add(make_seq(2, [50] * 10, max_tokens=1))
    out, _ = model.step(sched)
    assert out.num_new_tokens == [1, 1]  # 10 > 11 - 2 left: the whole prompt must wait
    out, _ = model.step(sched)
    assert out.num_new_tokens == [1, 1]
    out, _ = model.step(sched)
    assert out.num_new_tokens == [10]
    with pytest.raises(ValueError, match="without chunked prefill"):
        sched.add(make_seq(3, 10, max_tokens=4))


def test_preemption_frees_the_newest_and_recomputes_it():
    bm = BlockManager(4, 2)  # 8 slots
    sched, model = Scheduler(bm, 4, 16), FakeModel(bm)
    old, new = make_seq(0, 3, max_tokens=4), make_seq(1, 3, max_tokens=4)
    sched.add(old), sched.add(new)
    model.step(sched)  # both hold 2 blocks: the pool is full
    model.step(sched)  # position 3 still fits each one's second block
    out, _ = model.step(sched)  # position 4 needs a third block: the newest gives its blocks up
    assert out.preempted == [new] and new.status == Status.PREEMPTED and new.num_computed_tokens == 0
    assert sched.waiting[0] is new and sched.num_preemptions == 1 and new.num_preemptions == 1
    assert bm.num_used_blocks == 3
    drain(sched, model)
    for seq in (old, new):
        assert seq.output_token_ids == expected_output(seq.prompt_token_ids, 4)
    assert bm.num_used_blocks == 0


def test_a_request_that_can_never_fit_is_refused_at_add():
    sched = Scheduler(BlockManager(4, 4), 4, 64)
    with pytest.raises(ValueError, match="could never run"):
        sched.add(make_seq(0, 10, max_tokens=7))  # 17 tokens > 16 slots
    sched.add(make_seq(1, 10, max_tokens=6))
    with pytest.raises(ValueError, match="must be >= 1"):
        Scheduler(BlockManager(4, 4), 8, 0)
    assert Scheduler(BlockManager(4, 4), 8, 4).max_num_seqs == 4  # one decode token each: the budget caps them
    with pytest.raises(ValueError, match="unknown scheduler policy"):
        Scheduler(BlockManager(4, 4), policy="fifo")


def test_static_policy_waits_for_the_whole_batch():
    bm = BlockManager(64, 4)
    sched, model = Scheduler(bm, 2, 64, policy="static"), FakeModel(bm)
    short, long, late = make_seq(0, 2, max_tokens=1), make_seq(1, 2, max_tokens=5), make_seq(2, 2, max_tokens=1)
    for s in (short, long, late):
        sched.add(s)
    sizes = [len(model.step(sched)[0].seqs) for _ in range(6)]
    assert sizes == [2, 1, 1, 1, 1, 1] and late.is_finished  # the hole left by `short` stays empty
    cont = Scheduler(BlockManager(64, 4), 2, 64)
    cmodel = FakeModel(cont.block_manager)
    for s in (make_seq(0, 2, max_tokens=1), make_seq(1, 2, max_tokens=5), make_seq(2, 2, max_tokens=1)):
        cont.add(s)
    assert [len(cmodel.step(cont)[0].seqs) for _ in range(2)] == [2, 2]  # continuous fills it at once


def test_abort_frees_blocks_and_pending_children():
    bm = BlockManager(16, 4)
    sched, model = Scheduler(bm, 4, 64), FakeModel(bm)
    a = make_seq(0, 9, max_tokens=8)
    kids = [make_seq(i, 5, max_tokens=3, request_id="r", n=2, seed=i) for i in (1, 2)]
    sched.add(a), sched.add(kids[0]), sched.add(kids[1], parent=kids[0])
    model.step(sched)
    assert bm.num_used_blocks > 0
    assert sched.abort("0") == [a] and sched.abort("r") == kids
    assert all(s.finish_reason == "aborted" for s in [a, *kids]) and not sched.has_unfinished()
    assert bm.num_used_blocks == 0


def test_parallel_sampling_forks_after_the_prompt_and_copies_on_write():
    bm = BlockManager(16, 4)
    sched, model = Scheduler(bm, 4, 64), FakeModel(bm)
    seqs = [make_seq(i, 6, max_tokens=3, request_id="r", n=3, seed=i) for i in range(3)]
    for s in seqs:
        sched.add(s, parent=seqs[0] if s is not seqs[0] else None)
    assert list(sched.waiting) == seqs[:1]  # the others wait to be forked
    out, sampled = model.step(sched)
    assert out.num_batched_tokens == 6 and sampled == seqs  # one prefill, three first tokens
    assert bm.num_used_blocks == 2 and bm.ref_counts[bm.block_table(0)[1]] == 3
    out, _ = model.step(sched)
    assert len(out.copies) == 2  # the shared, half-full block is un-shared by two of the three writers
    drain(sched, model)
    assert all(s.output_token_ids == expected_output(s.prompt_token_ids, 3) for s in seqs)
    assert bm.num_used_blocks == 0 and not any(bm.ref_counts)


requests = st.lists(
    st.tuples(st.integers(0, 12), st.integers(1, 30), st.integers(1, 12), st.integers(0, 2), st.integers(1, 3)),
    min_size=1, max_size=14,
)  # (arrival step, prompt length, max_tokens, shared-prefix family, n)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    requests=requests,
    num_blocks=st.integers(12, 40),
    block_size=st.sampled_from([1, 2, 4, 8]),
    max_num_seqs=st.integers(1, 6),
    extra_budget=st.integers(0, 40),
    policy=st.sampled_from(["continuous", "static"]),
    chunked=st.booleans(),
    prefix_caching=st.booleans(),
)
def test_invariants_under_random_arrivals(
    requests, num_blocks, block_size, max_num_seqs, extra_budget, policy, chunked, prefix_caching
):
    bm = BlockManager(num_blocks, block_size, prefix_caching)
    budget = max(1, max_num_seqs + extra_budget - 3)
    sched, model = Scheduler(bm, max_num_seqs, budget, policy, chunked), FakeModel(bm)
    families = [[5 + f] * 40 for f in range(3)]
    pending, seqs, seq_id = sorted(enumerate(requests), key=lambda r: r[1][0]), [], 0
    step = 0
    while pending or sched.has_unfinished():
        while pending and pending[0][1][0] <= step:
            rid, (_, prompt_len, max_tokens, family, n) = pending.pop(0)
            n = min(n, sched.max_num_seqs)
            group = [make_seq(seq_id + i, families[family][:prompt_len - 1] + [rid + 3], max_tokens, rid, n, seed=i)
                     for i in range(n)]
            seq_id += n
            try:
                for s in group:
                    sched.add(s, parent=group[0] if s is not group[0] else None)
                seqs += group
            except ValueError:  # refused up front: too big for the pool or, unchunked, for the budget
                assert -(-(prompt_len + max_tokens) // block_size) > num_blocks or not chunked
                sched.abort(str(rid))
        out, _ = model.step(sched)
        step += 1
        assert out.num_batched_tokens <= budget and len(sched.running) <= min(max_num_seqs, budget)
        assert all(n >= 1 for n in out.num_new_tokens) and len({s.seq_id for s in out.seqs}) == len(out.seqs)
        assert all(s.status == Status.RUNNING for s in sched.running)
        assert all(s.status in (Status.WAITING, Status.PREEMPTED) for s in sched.waiting)
        held = [b for s in sched.running for b in bm.tables[s.seq_id]]
        assert all(bm.ref_counts[b] == held.count(b) for b in set(held))
        assert bm.num_used_blocks == len(set(held))  # no block held by a finished or waiting sequence
        assert step < 5000, "the scheduler stopped making progress: a sequence starves"
    for s in seqs:  # every request finished, with the tokens it would get alone
        assert s.is_finished and s.finish_reason == "length"
        assert s.output_token_ids == expected_output(s.prompt_token_ids, s.params.max_tokens)
    assert bm.num_used_blocks == 0 and not any(bm.ref_counts) and not bm.tables
