"""Speculative decoding in the paged engine: greedy output identical to plain decoding, alone and in mixed batches,
under preemption and with prefix caching; seeded sampling that does not depend on the batch; every block returned.

A tiny random model decodes into loops quickly, so prompt lookup gets guesses accepted and rejected alike.
"""

import pytest
import torch

import minillm
from minillm import SamplingParams
from minillm.engine.request import Sequence
from minillm.spec.proposers import NgramProposer, Proposer


class FakeTokenizer:
    eos_token_id, pad_token_id = 2, 0

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f"<{i}>" for i in ids)


def prompts(num, seed=0):
    """Half repetitive (a short pattern repeated: prompt lookup shines), half random."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(num):
        if i % 2 == 0:
            pattern = torch.randint(3, 256, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
            out.append((pattern * 8)[: int(torch.randint(6, 30, (1,), generator=g))])
        else:
            out.append(torch.randint(3, 256, (int(torch.randint(1, 30, (1,), generator=g)),), generator=g).tolist())
    return out


def spec(k=4, **extra):
    """Prompt lookup that always speculates (min_expected_tokens 0), so every path runs on every step."""
    return {"method": "ngram", "num_speculative_tokens": k, "min_expected_tokens": 0, **extra}


def token_ids(llm, ps, params):
    return [o.token_ids for o in llm.generate(ps, params, use_tqdm=False)]


GREEDY = SamplingParams(max_tokens=24, ignore_eos=True)


@pytest.mark.parametrize("k", [1, 3, 6])
def test_greedy_speculation_gives_exactly_the_plain_tokens(varied_model, k):
    ps = prompts(8)
    plain = token_ids(minillm.LLM(varied_model, tokenizer=FakeTokenizer()), ps, GREEDY)
    llm = minillm.LLM(varied_model, tokenizer=FakeTokenizer(), speculative_config=spec(k), max_num_seqs=8)
    assert token_ids(llm, ps, GREEDY) == plain
    stats = llm.stats()
    s = stats["speculative"]
    assert 0 < s["accepted"] <= s["proposed"], s
    assert k == 1 or s["accepted"] < s["proposed"], s  # longer guesses also get rejected: both paths ran
    assert stats["num_steps"] < 24 + 1  # fewer steps than one token at a time
    assert stats["kv_blocks_used"] == 0  # every block returned, guesses' blocks included
    for p in ps[:3]:  # alone too
        assert token_ids(llm, [p], GREEDY) == [plain[ps.index(p)]]


def test_greedy_speculation_under_preemption_and_prefix_caching(varied_model):
    ps = prompts(8, seed=1)
    ps += [ps[0][:], ps[2] + ps[2]]  # shared prefixes for the prefix cache
    plain = token_ids(minillm.LLM(varied_model, tokenizer=FakeTokenizer(), kv_cache="none"), ps, GREEDY)
    llm = minillm.LLM(varied_model, tokenizer=FakeTokenizer(), speculative_config=spec(5), block_size=4,
                      num_kv_blocks=24, max_num_batched_tokens=32, max_num_seqs=8)
    assert token_ids(llm, ps, GREEDY) == plain
    stats = llm.stats()
    assert stats["num_preemptions"] > 0 and stats["prefix_cache_hit_rate"] > 0, stats
    assert stats["kv_blocks_used"] == 0
    bm = llm.engine.block_manager
    assert all(r == 0 for r in bm.ref_counts) and bm.num_free_blocks == bm.num_blocks


def test_stop_conditions_inside_accepted_guesses(varied_model):
    """A sequence that hits max_tokens or a stop token among its accepted guesses stops exactly there."""
    ps = prompts(6, seed=2)
    base = minillm.LLM(varied_model, tokenizer=FakeTokenizer())
    llm = minillm.LLM(varied_model, tokenizer=FakeTokenizer(), speculative_config=spec(6))
    for max_tokens in [1, 2, 5, 9]:
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        assert token_ids(llm, ps, params) == token_ids(base, ps, params)
    plain = token_ids(base, ps, GREEDY)
    stop = [SamplingParams(max_tokens=24, ignore_eos=True, stop_token_ids=[toks[5]]) for toks in plain]
    assert token_ids(llm, ps, stop) == token_ids(base, ps, stop)


def test_seeded_sampling_does_not_depend_on_the_batch(varied_model):
    ps = prompts(6, seed=3)
    params = [SamplingParams(max_tokens=16, temperature=0.8, top_k=20, seed=100 + i, ignore_eos=True)
              for i in range(len(ps))]
    llm = minillm.LLM(varied_model, tokenizer=FakeTokenizer(), speculative_config=spec(4))
    together = token_ids(llm, ps, params)
    alone = [token_ids(llm, [p], [sp])[0] for p, sp in zip(ps, params)]
    assert together == alone
    assert token_ids(llm, ps, params) == together  # and reproducible
    assert llm.stats()["kv_blocks_used"] == 0


def test_bad_speculative_configs_are_refused(varied_model):
    tok = FakeTokenizer()
    with pytest.raises(ValueError, match="kv_cache='paged'"):
        minillm.LLM(varied_model, tokenizer=tok, kv_cache="contiguous", speculative_config=spec())
    with pytest.raises(ValueError, match="unknown speculative method"):
        minillm.LLM(varied_model, tokenizer=tok, speculative_config={"method": "medusa", "num_speculative_tokens": 2})
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        minillm.LLM(varied_model, tokenizer=tok, speculative_config=spec(0))
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        minillm.LLM(varied_model, tokenizer=tok, speculative_config={"method": "ngram"})
    with pytest.raises(ValueError, match="unknown speculative_config keys"):
        minillm.LLM(varied_model, tokenizer=tok, speculative_config=spec(2, draft="x"))
    with pytest.raises(ValueError, match="cannot fit"):
        minillm.LLM(varied_model, tokenizer=tok, max_model_len=8, speculative_config=spec(8))
    with pytest.raises(ValueError, match="min_expected_tokens"):
        minillm.LLM(varied_model, tokenizer=tok, speculative_config=spec(2, min_expected_tokens=4))
    with pytest.raises(ValueError, match="prompt_lookup"):
        minillm.LLM(varied_model, tokenizer=tok, speculative_config=spec(2, prompt_lookup_min=3, prompt_lookup_max=2))
    llm = minillm.LLM(varied_model, tokenizer=tok, speculative_config=spec(2))
    with pytest.raises(ValueError, match="n=2"):
        llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4, n=2, temperature=1.0))
    assert llm.stats()["kv_blocks_used"] == 0


class ConstantProposer(Proposer):
    """Always guesses the same token: on random text its guesses fail, on that token repeated they all hold."""

    def guess(self, seqs, budgets):
        return [([3] * k, None) for k in budgets]


def test_speculation_turns_itself_down_when_guesses_fail(varied_model):
    """Guesses that keep failing: after a verification or two a sequence decodes plainly, probing after 8, 16, 32,
    64 plain steps; guesses that hold keep it speculating. The output is the plain one either way."""
    ps, params = prompts(4, seed=5), SamplingParams(max_tokens=64, ignore_eos=True)
    plain = token_ids(minillm.LLM(varied_model, tokenizer=FakeTokenizer()), ps, params)
    llm = minillm.LLM(varied_model, tokenizer=FakeTokenizer(), speculative_config=spec(4))
    llm.engine.proposer = ConstantProposer(4, min_expected_tokens=1.5)
    assert token_ids(llm, ps, params) == plain
    s = llm.stats()["speculative"]
    assert s["acceptance_rate"] < 0.1, s
    # Per sequence: the first verification (no evidence yet), then probes after 8, 16 and 32 plain steps.
    assert s["verification_steps"] <= 4 * 4, s

    proposer = ConstantProposer(4, min_expected_tokens=1.5)
    seq = Sequence(0, "r", [5, 6], SamplingParams(max_tokens=200), eos_token_ids=[2], max_model_len=1024)
    proposer.evidence.clear()
    verified_at = []
    for step in range(130):
        proposer.step = step  # the engine step (propose counts them)
        if proposer.worth_speculating(seq):
            verified_at.append(step)
            proposer.observe(seq, 4, 0)
    assert verified_at == [0, 8, 24, 56, 120], verified_at  # every guess fails: probes 8, 16, 32, 64 steps apart
    proposer.evidence.clear()
    verified_at = []
    for step in range(3, 40):  # a sequence that starts at step 3: its probes still fall on every eighth step
        proposer.step = step
        if proposer.worth_speculating(seq):
            verified_at.append(step)
            proposer.observe(seq, 4, 0)
    assert verified_at == [3, 16, 32], verified_at
    for _ in range(3):  # guesses that start to hold: speculation resumes at the next probe and stays on
        proposer.observe(seq, 4, 4)
    assert proposer.acceptance_estimate(0) > 0.8 and proposer.worth_speculating(seq)


def test_a_batch_speculates_only_when_its_guesses_pay_for_everyone():
    """One sequence that guesses well among seven turned-down ones: its extra tokens do not pay for the slower step
    of all eight, so nobody speculates (until a probe); alone, or with enough good company, it does."""

    def seqs(n):
        return [Sequence(i, str(i), [5, 6], SamplingParams(max_tokens=100), eos_token_ids=[2], max_model_len=1024)
                for i in range(n)]

    def speculating(proposer, batch):
        proposer.step = 0  # propose counts this one as step 1: not a probing step
        proposer.propose(batch)
        return [s.seq_id for s in batch if s.spec_token_ids]

    proposer = ConstantProposer(4, min_expected_tokens=2.0)
    batch = seqs(8)
    proposer.observe(batch[0], 4, 4)  # alpha 1: 5 tokens per step expected, 4 extra
    for seq in batch[1:]:
        proposer.observe(seq, 4, 0)  # alpha 0: turned down
    assert speculating(proposer, batch) == []  # 4 extra tokens < (2 - 1) * 8
    assert speculating(proposer, batch[:1]) == [0]  # alone: 4 >= 1
    for seq in batch[1:3]:
        for _ in range(3):
            proposer.observe(seq, 4, 4)  # three good verifications outweigh the failed one
    assert speculating(proposer, batch) == [0, 1, 2]  # about 3 x 3.7 extra tokens >= 8


def test_prompt_lookup_keeps_its_estimate_up_to_date_in_the_shadow():
    """A turned-down sequence whose text starts copying: prompt lookup still guesses one token per step for free,
    scores it against the token that came, and speculation resumes after two hits, long before a probe (step 8)."""
    proposer = NgramProposer(4, min_expected_tokens=2.0)
    pattern = [7, 8, 9, 10]
    seq = Sequence(0, "r", pattern * 3, SamplingParams(max_tokens=100), eos_token_ids=[2], max_model_len=1024)
    proposer.observe(seq, 4, 0)
    proposer.observe(seq, 4, 0)  # two failed verifications: turned down
    for step in range(1, 8):
        proposer.propose([seq])  # step `step`
        if seq.spec_token_ids:
            break
        seq.append_token(pattern[seq.num_tokens % 4])  # the target copies the pattern, as the shadow guess said
    assert step == 3 and seq.spec_token_ids == (pattern * 2)[seq.num_tokens % 4 :][:4], (step, seq.spec_token_ids)
