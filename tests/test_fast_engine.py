"""Chapter 10 in the engine: the piecewise forward, padded decode graphs and torch.compile give the eager tokens.

CUDA graphs cannot be captured without a GPU; ``DecodeGraphs(capture=False)`` runs the same padded static-buffer
step eagerly, which checks the buckets, the padding and the buffer copies. The capture itself runs in the GPU tests
(``@pytest.mark.gpu``) and in ``make gpu-check``.
"""

import random

import pytest
import torch

import minillm
from minillm import SamplingParams
from minillm.engine.paged import PagedEngine
from minillm.engine.request import Sequence
from minillm.fast.execution import choose_execution
from minillm.fast.forward import PiecewiseForward, why_not_piecewise
from minillm.fast.graphs import DecodeGraphs


class FakeTokenizer:
    eos_token_id, pad_token_id = 2, 0

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f"<{i}>" for i in ids)


GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 250) for _ in range(rng.randrange(1, 19))] for _ in range(n)]


def token_ids(llm, ps, params=GREEDY):
    return [o.token_ids for o in llm.generate(ps, params, use_tqdm=False)]


@pytest.mark.parametrize("B,T", [(1, 1), (2, 7), (3, 13)])
def test_piecewise_eager_equals_the_model(varied_model, B, T):
    ids = torch.randint(0, varied_model.config.vocab_size, (B, T))
    expected = varied_model(ids)
    got = PiecewiseForward(varied_model, "eager")(ids)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    cols = torch.tensor([T - 1, 0])
    torch.testing.assert_close(PiecewiseForward(varied_model)(ids, logits_at=cols), expected[:, cols], rtol=1e-5,
                               atol=1e-5)


def test_piecewise_fused_kernels_equal_the_model(varied_model):
    """The fused Triton kernels (in the interpreter here) in every layer, against the eager model."""
    ids = torch.randint(0, varied_model.config.vocab_size, (2, 5))
    with minillm.count_kernel_launches() as launched:
        got = PiecewiseForward(varied_model, "fused")(ids)
    torch.testing.assert_close(got, varied_model(ids), rtol=1e-4, atol=1e-4)
    L = varied_model.config.num_layers
    assert launched["add_rmsnorm"] == 2 * L + 1 and launched["rope_qk"] == L and launched["silu_mul"] == L


def test_engine_with_piecewise_forward_gives_the_same_tokens(varied_model):
    ps = prompts(5)
    plain = token_ids(minillm.LLM(varied_model, tokenizer=FakeTokenizer()), ps)
    llm = minillm.LLM(varied_model, tokenizer=FakeTokenizer())
    llm.engine.model = PiecewiseForward(varied_model, "eager")
    assert token_ids(llm, ps) == plain


@pytest.mark.parametrize("max_num_seqs", [1, 5, 9])
def test_padded_decode_graphs_give_the_same_tokens(varied_model, max_num_seqs):
    """Decode steps padded to buckets of (1, 2, 4, 8, 9) replay the static buffers; prefills run eagerly."""
    ps = prompts(7, seed=max_num_seqs)
    options = dict(tokenizer=FakeTokenizer(), max_num_seqs=max_num_seqs, block_size=4, max_model_len=64)
    plain = token_ids(minillm.LLM(varied_model, **options), ps)
    llm = minillm.LLM(varied_model, **options)
    graphs = DecodeGraphs(llm.engine.model, llm.engine.attention, max_num_seqs, 64, capture=False)
    llm.engine.model = graphs
    assert token_ids(llm, ps) == plain
    stats = llm.stats()["execution"]
    assert stats["graph_replays"] > 0 and stats["eager_steps"] > 0, stats  # decodes replayed, prefills eager
    assert llm.engine.block_manager.num_used_blocks == 0


def test_padded_rows_write_no_kv(varied_model):
    """Three sequences decoding in a bucket of 4: only their three slots change in the pool, in every layer."""
    engine = PagedEngine(varied_model, block_size=4, num_kv_blocks=16, max_num_seqs=4, max_model_len=32)
    graphs = engine.model = DecodeGraphs(engine.model, engine.attention, 4, 32, capture=False)
    for i, prompt in enumerate([[5, 6, 7], [8, 9], [10, 11, 12, 13, 14]]):
        engine.add(Sequence(i, f"r{i}", prompt, SamplingParams(max_tokens=4, ignore_eos=True), [2], 32))
    engine.step()  # the prefills, eagerly
    before = engine.kv_cache.k_cache.clone()
    engine.step()  # one decode step of 3 sequences, padded to the bucket of 4
    assert graphs.num_replays == 1 and graphs.buckets == [1, 2, 4]
    changed = (engine.kv_cache.k_cache != before).any(dim=(0, 3, 4)).nonzero().tolist()  # (block, offset) pairs
    assert len(changed) == 3, changed


def test_choose_execution_defaults_and_fallbacks(varied_model, monkeypatch):
    cpu = torch.device("cpu")
    forward, report = choose_execution(varied_model, cpu, "reference", "paged", None, None)
    assert forward is varied_model and report["enforce_eager"] and not report["compile"], report
    monkeypatch.setattr("shutil.which", lambda name: None)  # no C++ compiler: eager, and the reason
    forward, report = choose_execution(varied_model, cpu, "reference", "paged", False, True)
    assert forward is varied_model and not report["compile"]
    assert "C++ compiler" in report["fallbacks"][0], report
    with pytest.raises(ValueError, match="enforce_eager must be None"):
        choose_execution(varied_model, cpu, "reference", "paged", "yes", None)


def test_llm_reports_cuda_graphs_unavailable_on_cpu(varied_model, monkeypatch):
    monkeypatch.setattr("minillm.fast.execution.why_not_compile", lambda device: "no compiler in this test")
    llm = minillm.LLM(varied_model, tokenizer=FakeTokenizer(), enforce_eager=False)
    execution = llm.stats()["execution"]
    assert not execution["cuda_graphs"] and not execution["compile"]
    assert any("no CUDA device" in f for f in execution["fallbacks"]), execution
    assert any("no compiler in this test" in f for f in execution["fallbacks"]), execution
    assert token_ids(llm, prompts(2)) == token_ids(minillm.LLM(varied_model, tokenizer=FakeTokenizer()), prompts(2))


def test_quantized_model_runs_eagerly_with_a_reason(varied_model):
    import copy

    from minillm.quant import quantize_model

    model = copy.deepcopy(varied_model)
    quantize_model(model, "int8")
    assert "not a dense nn.Linear" in why_not_piecewise(model)
    _, report = choose_execution(model, torch.device("cpu"), "reference", "paged", False, True)
    assert not report["compile"] and "nn.Linear" in report["fallbacks"][0]


@pytest.mark.slow
def test_compiled_engine_gives_the_eager_tokens(varied_model):
    """torch.compile (inductor's C++ backend on this CPU) of the pieces: the eager tokens, compile time reported."""
    ps = prompts(4)
    plain = token_ids(minillm.LLM(varied_model, tokenizer=FakeTokenizer()), ps)
    llm = minillm.LLM(varied_model, tokenizer=FakeTokenizer(), compile=True)
    execution = llm.stats()["execution"]
    assert execution["compile"] and execution["ops"] == "compile", execution
    assert execution["compile_seconds"] > 0
    assert token_ids(llm, ps) == plain


@pytest.mark.gpu
def test_cuda_graphs_give_the_eager_tokens(varied_model):
    model = varied_model.cuda()
    ps = prompts(6)
    plain = token_ids(minillm.LLM(model, tokenizer=FakeTokenizer(), enforce_eager=True), ps)
    llm = minillm.LLM(model, tokenizer=FakeTokenizer(), enforce_eager=False, max_num_seqs=8, max_model_len=256)
    execution = llm.stats()["execution"]
    assert execution["cuda_graphs"] and execution["ops"] == "fused", execution
    assert token_ids(llm, ps) == plain
    assert llm.stats()["execution"]["graph_replays"] > 0


def test_a_fast_path_that_disagrees_with_the_eager_model_is_not_used(varied_model, monkeypatch):
    """A kernel that runs but computes wrong numbers must not serve: the warm-up compares logits and falls back."""
    monkeypatch.setattr("minillm.fast.fused.silu_mul_ref", lambda gate, up: gate * up)  # a plausible bug: no SiLU
    monkeypatch.setattr("minillm.fast.execution.why_not_compile", lambda device: None)
    monkeypatch.setattr("torch.compile", lambda fn, dynamic=None: fn)  # "compile" = the (buggy) eager pieces
    forward, report = choose_execution(varied_model, torch.device("cpu"), "reference", "paged", False, True)
    assert forward is varied_model and not report["compile"], report
    assert "logits differ from the eager model" in report["fallbacks"][0], report
