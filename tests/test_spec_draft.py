"""Speculative decoding with a draft model, and the guarantees of both proposers that need many runs: greedy output
identical to plain decoding; a sampled output distributed exactly as the target's (a statistical test with a stated
false-alarm rate, which two plausible wrong samplers fail); block pools consistent after random acceptances.
"""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_spec_engine import GREEDY, FakeTokenizer, prompts, spec, token_ids

import minillm
import minillm.spec.verify as verify
from minillm import SamplingParams
from minillm.spec.draft import DraftModelProposer, self_draft


def draft_spec(model, k=3, **extra):
    return {"method": "draft_model", "num_speculative_tokens": k, "model": model, "min_expected_tokens": 0, **extra}


def test_self_draft_shares_every_weight(varied_model):
    draft = self_draft(varied_model, 1)
    assert draft.config.num_layers == 1 and draft.layers[0] is varied_model.layers[0]
    assert draft.lm_head.weight is varied_model.lm_head.weight and draft.norm is varied_model.norm
    ids = torch.tensor([[5, 9, 11, 4]])
    x = varied_model.norm(varied_model.layers[0](varied_model.embed_tokens(ids), *rope(varied_model, ids)))
    torch.testing.assert_close(draft(ids), varied_model.lm_head(x))
    with pytest.raises(ValueError, match="keeps 1 to 1"):
        self_draft(varied_model, 2)


def rope(model, ids):
    from minillm.model import rope_cos_sin

    return rope_cos_sin(torch.arange(ids.shape[1])[None], model.inv_freq, torch.float32)


@pytest.mark.parametrize("which", ["target", "self_draft"])
def test_greedy_with_a_draft_model_gives_exactly_the_plain_tokens(varied_model, which):
    """The target as its own draft (every guess right: the bonus token and long accepted runs) and a 1-layer
    self-draft (mostly wrong: rollbacks), in mixed batches, under preemption and with prefix caching."""
    draft = varied_model if which == "target" else self_draft(varied_model, 1)
    ps = prompts(8, seed=1)
    ps += [ps[0][:], ps[2] + ps[2]]
    plain = token_ids(minillm.LLM(varied_model, tokenizer=FakeTokenizer(), kv_cache="none"), ps, GREEDY)
    llm = minillm.LLM(varied_model, tokenizer=FakeTokenizer(), speculative_config=draft_spec(draft, 3), block_size=4,
                      num_kv_blocks=24, max_num_batched_tokens=32, max_num_seqs=8)
    assert token_ids(llm, ps, GREEDY) == plain
    stats = llm.stats()
    s = stats["speculative"]
    assert stats["num_preemptions"] > 0 and stats["prefix_cache_hit_rate"] > 0, stats
    if which == "target":
        assert s["acceptance_rate"] == 1.0, s
    else:
        assert s["accepted"] < s["proposed"], s
    for bm in (llm.engine.block_manager, llm.engine.proposer.block_manager):  # both pools: every block back
        assert all(r == 0 for r in bm.ref_counts) and bm.num_free_blocks == bm.num_blocks
    assert not llm.engine.proposer.fed
    assert token_ids(llm, [ps[3]], GREEDY) == [plain[3]]  # alone


def test_a_draft_with_another_vocabulary_or_device_is_refused(varied_model):
    from minillm.config import ModelConfig
    from minillm.model import Transformer

    other = Transformer(ModelConfig.tiny(vocab_size=300))
    with pytest.raises(ValueError, match="vocabulary"):
        minillm.LLM(varied_model, tokenizer=FakeTokenizer(), speculative_config=draft_spec(other))
    with pytest.raises(ValueError, match="needs speculative_config\\['model'\\]"):
        minillm.LLM(varied_model, tokenizer=FakeTokenizer(),
                    speculative_config={"method": "draft_model", "num_speculative_tokens": 2})
    with pytest.raises(ValueError, match="unknown speculative_config keys"):
        minillm.LLM(varied_model, tokenizer=FakeTokenizer(),
                    speculative_config=draft_spec(varied_model, prompt_lookup_max=2))


# ---- the output distribution ----------------------------------------------------------------------------------
TOP_K, NUM_SAMPLES, FALSE_ALARM = 3, 2000, 1e-6


def exact_distribution(model, prompt, params, length):
    """P(first `length` tokens) under plain sampling with `params`, over every sequence of top-k choices."""
    from minillm.engine.sampling import sampling_probs

    dist = {(): 1.0}
    for _ in range(length):
        grown = {}
        for prefix, prob in dist.items():
            with torch.no_grad():
                logits = model(torch.tensor([prompt + list(prefix)]))[0, -1:]  # (1, V)
            p = sampling_probs(logits, params)[0]
            for token in torch.nonzero(p).flatten().tolist():
                grown[prefix + (token,)] = prob * float(p[token])
        dist = grown
    return dist


def largest_deviation(model, speculative_config, prompt, length=3):
    """max over outcomes |empirical - exact| for the first `length` sampled tokens, NUM_SAMPLES seeded requests."""
    params = [SamplingParams(max_tokens=length, temperature=1.0, top_k=TOP_K, seed=s, ignore_eos=True)
              for s in range(NUM_SAMPLES)]
    llm = minillm.LLM(model, tokenizer=FakeTokenizer(), speculative_config=speculative_config, max_num_seqs=512)
    counts = {}
    for out in token_ids(llm, [prompt] * NUM_SAMPLES, params):
        counts[tuple(out)] = counts.get(tuple(out), 0) + 1
    assert llm.stats()["speculative"]["verification_steps"] > 0
    exact = exact_distribution(model, prompt, params[0], length)  # outcomes missing here have probability 0
    deviation = max(abs(counts.get(x, 0) / NUM_SAMPLES - exact.get(x, 0.0)) for x in {*exact, *counts})
    return deviation, len(exact)


def hoeffding_bound(num_outcomes):
    """|empirical - p| for one outcome exceeds t with probability <= 2 exp(-2 N t^2); a union bound over the
    outcomes makes FALSE_ALARM the chance that a correct sampler fails this test."""
    return math.sqrt(math.log(2 * num_outcomes / FALSE_ALARM) / (2 * NUM_SAMPLES))


def accept_always(proposed, target_probs, draft_probs, generator):
    """Wrong: keeps every guess, so the output is the draft's distribution."""
    return [*proposed, int(torch.multinomial(target_probs[-1].double().cpu(), 1, generator=generator))]


def resample_from_p(proposed, target_probs, draft_probs, generator):
    """Wrong: the right acceptance test, but a rejected guess is replaced by a draw from p, not the residual."""
    p_all = target_probs.double().cpu()
    emitted = []
    for i, x in enumerate(proposed):
        q = draft_probs[i].double().cpu() if draft_probs is not None else torch.nn.functional.one_hot(
            torch.tensor(x), p_all.shape[1]).double()
        if torch.rand((), dtype=torch.float64, generator=generator) < min(1.0, float(p_all[i, x] / q[x])):
            emitted.append(x)
            continue
        return [*emitted, int(torch.multinomial(p_all[i], 1, generator=generator))]
    return [*emitted, int(torch.multinomial(p_all[-1], 1, generator=generator))]


@pytest.mark.slow
@pytest.mark.parametrize("proposer", ["draft_model", "ngram"])
def test_speculative_sampling_is_distributed_exactly_as_plain_sampling(varied_model, proposer, monkeypatch):
    """2,000 seeded requests, top-3 sampling, the first 3 tokens (27 outcomes): every outcome's frequency lies
    within the Hoeffding bound of its exact probability (false alarm 1e-6); two plausible wrong samplers do not."""
    prompt = [28, 117] * 3 + [28]  # prompt lookup guesses 117, 28, ..., right about half the time
    config = draft_spec(self_draft(varied_model, 1), 2) if proposer == "draft_model" else spec(2)
    deviation, outcomes = largest_deviation(varied_model, config, prompt)
    bound = hoeffding_bound(outcomes)
    assert deviation < bound, (deviation, bound)
    for wrong in (accept_always, resample_from_p):
        monkeypatch.setattr(verify, "rejection_sample", wrong)
        wrong_deviation, _ = largest_deviation(varied_model, config, prompt)
        assert wrong_deviation > bound, (wrong.__name__, wrong_deviation, bound)


# ---- block pools after random acceptances ----------------------------------------------------------------------
class CorruptedDraft(DraftModelProposer):
    """The target as its own draft, with guesses corrupted at random positions: random acceptance lengths."""

    def __init__(self, *args, seed, **kwargs):
        super().__init__(*args, **kwargs)
        self.rng = torch.Generator().manual_seed(seed)

    def guess(self, seqs, budgets):
        out = []
        for tokens, probs in super().guess(seqs, budgets):
            cut = int(torch.randint(0, len(tokens) + 1, (1,), generator=self.rng)) if tokens else 0
            out.append((tokens[:cut] + [3] * (len(tokens) - cut), probs))
        return out


def check_pool(bm, live_ids):
    """Every block is free, evictable or held; ref counts equal the number of tables holding each block."""
    held = [0] * bm.num_blocks
    for seq_id, table in bm.tables.items():
        assert seq_id in live_ids, f"sequence {seq_id} still holds blocks after it stopped"
        for block_id in table:
            held[block_id] += 1
    assert held == bm.ref_counts
    free = list(bm.free_block_ids)
    assert len(set(free)) == len(free) and not set(free) & set(bm.evictable)
    assert all(bm.ref_counts[b] == 0 for b in [*free, *bm.evictable])
    assert len(free) + len(bm.evictable) + sum(1 for r in bm.ref_counts if r > 0) == bm.num_blocks


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10_000), k=st.integers(1, 5), num_kv_blocks=st.integers(14, 40))
def test_block_pools_stay_consistent_after_random_acceptances(varied_model, seed, k, num_kv_blocks):
    ps = prompts(6, seed=seed)
    llm = minillm.LLM(varied_model, tokenizer=FakeTokenizer(), speculative_config=spec(k), block_size=4,
                      num_kv_blocks=num_kv_blocks, max_num_batched_tokens=24, max_num_seqs=6)
    engine = llm.engine
    engine.proposer = CorruptedDraft(varied_model, varied_model.config, k, num_kv_blocks + 6, 4, min_expected_tokens=0,
                                     seed=seed)
    original = engine._step

    def checked_step():  # the pools after every step, both of them
        out = original()
        live = {s.seq_id for s in engine.scheduler.running}
        check_pool(engine.block_manager, live)
        check_pool(engine.proposer.block_manager, live)
        return out

    engine._step = checked_step
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    plain = token_ids(minillm.LLM(varied_model, tokenizer=FakeTokenizer(), kv_cache="none"), ps, params)
    assert token_ids(llm, ps, params) == plain
    assert llm.stats()["speculative"]["verification_steps"] > 0
    for bm in (engine.block_manager, engine.proposer.block_manager):
        assert all(r == 0 for r in bm.ref_counts) and bm.num_free_blocks == bm.num_blocks


def test_a_dropped_stream_or_a_failing_step_leaves_both_pools_clean(varied_model):
    """Closing a stream early aborts only its request; an exception inside a step preempts everyone. Either way the
    target's and the draft's blocks all come back, and the engine serves the next request exactly."""
    llm = minillm.LLM(varied_model, tokenizer=FakeTokenizer(), speculative_config=draft_spec(varied_model, 3))
    other = llm.add_request(prompts(2)[1], GREEDY)[0]
    stream = llm.stream(prompts(1)[0], GREEDY)
    for _, _ in zip(range(3), stream):
        pass
    stream.close()
    assert not other.is_finished  # the other request goes on
    while llm.engine.has_unfinished():
        llm.engine.step()
    engine, draft_pool = llm.engine, llm.engine.proposer.block_manager

    def boom(*args, **kwargs):
        raise RuntimeError("a kernel failed")

    llm.add_request(prompts(1)[0], GREEDY)
    llm.engine.step()  # prefill
    engine.model.forward = boom  # the draft is the same model: the failure comes in the proposer or the target
    with pytest.raises(RuntimeError, match="a kernel failed"):
        engine.step()
    del engine.model.forward
    while engine.has_unfinished():  # the preempted request is recomputed and finishes
        engine.step()
    for bm in (engine.block_manager, draft_pool):
        assert all(r == 0 for r in bm.ref_counts) and bm.num_free_blocks == bm.num_blocks
    plain = token_ids(minillm.LLM(varied_model, tokenizer=FakeTokenizer()), prompts(3), GREEDY)
    assert token_ids(llm, prompts(3), GREEDY) == plain
