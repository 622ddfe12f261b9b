"""The request lifecycle cannot leak: errors, Ctrl-C, dropped and interleaved streams, threads.

Every test runs the tiny random model with token-id prompts, and compares with each request's greedy tokens alone
(which preemption and recomputation must not change). The last one is a hypothesis state machine: random
interleavings of submit / step / abort / stream / failing step never lose or duplicate a token, and end with the
engine empty and every KV block free.
"""

import threading

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import minillm
from minillm import SamplingParams
from minillm.config import ModelConfig
from minillm.model import Transformer

KV_CACHES = ["none", "contiguous", "paged"]
GREEDY = SamplingParams(max_tokens=6, ignore_eos=True)


class FakeTokenizer:
    """Token-id prompts only; decode shows the ids, so text and tokens can be compared one to one."""

    eos_token_id, pad_token_id = 2, 0

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f"<{i}>" for i in ids)


def text_of(token_ids):
    return FakeTokenizer().decode(token_ids)


def prompts(num, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (int(n),), generator=g).tolist() for n in torch.randint(1, 20, (num,), generator=g)]


def make_model():
    torch.manual_seed(0)
    return Transformer(ModelConfig.tiny()).eval()


MODEL = make_model()


def make_llm(kv_cache="paged", **kw):
    return minillm.LLM(MODEL, tokenizer=FakeTokenizer(), kv_cache=kv_cache, **kw)


@pytest.fixture(scope="module")
def alone():
    """Each prompt's greedy tokens when it runs alone, without a cache."""
    llm = make_llm("none")
    return {tuple(p): llm.generate([p], GREEDY)[0].token_ids for p in prompts(12)}


class FailingStep:
    """Make the model raise `error` on its `after`-th call from now (a kernel error, or Ctrl-C mid-step)."""

    def __init__(self, model, after=1, error=RuntimeError("injected failure")):
        self.calls, self.after, self.error = 0, after, error
        self.handle = model.register_forward_pre_hook(self.hook)

    def hook(self, module, args):
        self.calls += 1
        if self.calls == self.after:
            raise self.error

    def remove(self):
        self.handle.remove()


def assert_clean(llm):
    assert not llm.engine.has_unfinished()
    if llm.kv_cache == "paged":
        assert llm.engine.block_manager.num_used_blocks == 0


@pytest.mark.parametrize("kv_cache", KV_CACHES)
@pytest.mark.parametrize("error", [RuntimeError("kernel failed"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
def test_a_failing_generate_leaves_nothing_behind(kv_cache, error, alone):
    llm = make_llm(kv_cache, max_num_seqs=4)
    batch = prompts(12)[:6]
    failing = FailingStep(MODEL, after=3, error=error)
    try:
        with pytest.raises(type(error)):
            llm.generate(batch, GREEDY)
    finally:
        failing.remove()
    assert_clean(llm)
    outs = llm.generate(batch[:1], GREEDY)  # the next call runs only its own request, as fast as it should
    assert outs[0].token_ids == alone[tuple(batch[0])]
    assert llm.stats()["num_steps"] == GREEDY.max_tokens  # stats describe the last run: this call alone
    assert_clean(llm)


@pytest.mark.parametrize("kv_cache", KV_CACHES)
def test_a_failing_step_does_not_hurt_the_other_callers_requests(kv_cache, alone):
    """A stream survives a step that fails inside another caller's `generate`, and still gets every token."""
    llm = make_llm(kv_cache, max_num_seqs=4)
    p, q = prompts(12)[:2]
    stream = llm.stream(p, GREEDY)
    first = next(stream)
    failing = FailingStep(MODEL, after=1)
    try:
        with pytest.raises(RuntimeError, match="injected"):
            llm.generate([q], GREEDY)
    finally:
        failing.remove()
    assert first + "".join(stream) == text_of(alone[tuple(p)])
    assert_clean(llm)


def test_a_late_invalid_seed_is_refused_before_anything_is_queued():
    with pytest.raises(ValueError, match="seed must be None or an int in"):
        SamplingParams(temperature=1.0, n=2, seed=2**63 - 1)
    llm = make_llm("paged", block_size=4, num_kv_blocks=8)
    with pytest.raises(ValueError, match="could never run"):
        llm.generate([[5] * 3, [7] * 30], SamplingParams(max_tokens=8))
    assert_clean(llm)


@pytest.mark.parametrize("kv_cache", KV_CACHES)
def test_interleaved_streams_and_generate_lose_no_text(kv_cache, alone):
    llm = make_llm(kv_cache, max_num_seqs=4)
    a, b, c = prompts(12)[:3]
    stream_a, stream_b = llm.stream(a, GREEDY), llm.stream(b, GREEDY)
    text_a, text_b = next(stream_a), next(stream_b)
    text_a += next(stream_a)
    assert llm.generate([c], GREEDY)[0].token_ids == alone[tuple(c)]  # steps a and b too
    text_b += "".join(stream_b)
    text_a += "".join(stream_a)
    assert (text_a, text_b) == (text_of(alone[tuple(a)]), text_of(alone[tuple(b)]))
    assert_clean(llm)


def test_closing_a_stream_or_streaming_n_completions_aborts_the_rest():
    llm = make_llm("paged")
    stream = llm.stream(prompts(1)[0], SamplingParams(max_tokens=20, ignore_eos=True))
    next(stream)
    stream.close()  # the caller stopped reading (a dropped connection): its request is aborted
    assert_clean(llm)
    text = "".join(llm.stream(prompts(1)[0], SamplingParams(max_tokens=5, temperature=1.0, seed=3, n=3)))
    assert text.count("<") == 5  # the first completion, whole
    assert_clean(llm)  # and the other two did not stay behind to run inside a later call


@pytest.mark.parametrize("kv_cache", KV_CACHES)
def test_threads_share_one_llm(kv_cache, alone):
    llm = make_llm(kv_cache, max_num_seqs=3)
    work = prompts(12)
    results, errors = {}, []

    def worker(i):
        try:
            mine = work[3 * i : 3 * i + 3]
            results[i] = [o.token_ids for o in llm.generate(mine, GREEDY)]
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    for i in range(4):
        assert results[i] == [alone[tuple(p)] for p in work[3 * i : 3 * i + 3]]
    assert_clean(llm)
    assert llm.generate(work[:1], GREEDY)[0].token_ids == alone[tuple(work[0])]  # and it still works after


class LifecycleMachine(RuleBasedStateMachine):
    """Random interleavings of the front end's operations on a small, preempting paged engine."""

    def __init__(self):
        super().__init__()
        self.llm = make_llm("paged", block_size=4, num_kv_blocks=14, max_num_seqs=3, max_num_batched_tokens=12)
        self.requests = []  # (prompt, sequences)
        self.streams = []  # (prompt, generator, text so far)
        self.pool = prompts(12)

    @rule(i=st.integers(0, 11))
    def submit(self, i):
        self.requests.append((self.pool[i], self.llm.add_request(self.pool[i], GREEDY)))

    @rule()
    def step(self):
        if self.llm.engine.has_unfinished():
            self.llm.engine.step()

    @rule(after=st.integers(1, 2))
    def failing_step(self, after):
        failing = FailingStep(MODEL, after=after)
        try:
            for _ in range(after):
                if self.llm.engine.has_unfinished():
                    self.llm.engine.step()
        except RuntimeError:
            pass
        finally:
            failing.remove()

    @rule(j=st.integers(0, 20))
    def abort(self, j):
        if self.requests:
            self.llm.abort(self.requests[j % len(self.requests)][1][0].request_id)

    @rule(i=st.integers(0, 11))
    def open_stream(self, i):
        self.streams.append([self.pool[i], self.llm.stream(self.pool[i], GREEDY), ""])

    @rule(j=st.integers(0, 20))
    def read_stream(self, j):
        if self.streams:
            entry = self.streams[j % len(self.streams)]
            entry[2] += next(entry[1], "")

    @invariant()
    def blocks_are_accounted_for(self):
        bm = self.llm.engine.block_manager
        held = {b for table in bm.tables.values() for b in table}
        assert len(held) == bm.num_used_blocks

    def teardown(self):
        for entry in self.streams:
            entry[2] += "".join(entry[1])
        while self.llm.engine.has_unfinished():
            self.llm.engine.step()
        for prompt, seqs in self.requests:
            (seq,) = seqs
            expected = ALONE[tuple(prompt)]
            if seq.finish_reason == "aborted":
                assert seq.output_token_ids == expected[: len(seq.output_token_ids)]
            else:
                assert seq.output_token_ids == expected, "a token was lost or duplicated"
        for prompt, _, text in self.streams:
            assert text == text_of(ALONE[tuple(prompt)])
        assert self.llm.engine.block_manager.num_used_blocks == 0


ALONE: dict = {}


def test_random_interleavings_never_lose_a_token(alone):
    ALONE.update(alone)
    LifecycleMachine.TestCase.settings = settings(
        max_examples=25, stateful_step_count=25, deadline=None, suppress_health_check=list(HealthCheck)
    )
    LifecycleMachine.TestCase().runTest()
