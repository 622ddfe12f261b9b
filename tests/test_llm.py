"""The public LLM front end on the real model: parity with transformers, prompts, stopping, streaming, errors."""

import pytest
import torch

import minillm
from minillm import SamplingParams

PROMPTS = ["The capital of France is", "def add(a, b):"]


@pytest.fixture(scope="module")
def llm_none(smollm):
    model, tok = smollm
    return minillm.LLM(model, tokenizer=tok, kv_cache="none")


def hf_greedy(hf_model, tok, prompt, max_new_tokens):
    ids = tok(prompt, return_tensors="pt").input_ids
    out = hf_model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, ids.shape[1] :].tolist()


def test_greedy_matches_transformers_generate(llm_none, hf_smollm, smollm):
    outs = llm_none.generate(PROMPTS, SamplingParams(max_tokens=8, ignore_eos=True))
    for prompt, out in zip(PROMPTS, outs):
        assert out.token_ids == hf_greedy(hf_smollm, smollm[1], prompt, 8), prompt
        assert out.finish_reason == "length" and out.metrics["num_output_tokens"] == 8


def test_chat_messages_and_token_ids(llm_none, smollm):
    tok = smollm[1]
    chat = [{"role": "user", "content": "Hi"}]
    ids = llm_none.encode(chat)
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")
    a, b = llm_none.generate([chat, ids], SamplingParams(max_tokens=3))
    assert a.token_ids == b.token_ids


def test_stop_string_cuts_text(llm_none):
    out = llm_none.generate("Count: one, two, three, four,", SamplingParams(max_tokens=12, stop=","))[0]
    assert "," not in out.text and out.finish_reason == "stop"


def test_stream_yields_the_generated_text(llm_none):
    params = SamplingParams(max_tokens=6, temperature=0.7, seed=11)
    streamed = "".join(llm_none.stream("Once upon a time", params))
    assert streamed == llm_none.generate("Once upon a time", params)[0].text


def test_seeded_sampling_is_reproducible_and_n_gives_n(llm_none):
    params = SamplingParams(max_tokens=5, temperature=1.0, seed=5, n=2)
    a = llm_none.generate("Hello", params)[0]
    b = llm_none.generate("Hello", params)[0]
    assert len(a.outputs) == 2 and [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]


def test_bad_input_is_a_clear_error(llm_none):
    with pytest.raises(ValueError, match="context is"):
        llm_none.generate([list(range(5, 5 + llm_none.max_model_len))])
    with pytest.raises(TypeError, match="a prompt must be"):
        llm_none.generate([3.5])
    with pytest.raises(ValueError, match="token ids must be in"):
        llm_none.generate([[10**9]])
    with pytest.raises(ValueError, match="2 prompts but 1"):
        llm_none.generate(PROMPTS, [SamplingParams()])
    with pytest.raises(ValueError, match="unknown kv_cache"):
        minillm.LLM(kv_cache="ring")
    with pytest.raises(TypeError, match="SamplingParams"):
        llm_none.generate("x", {"max_tokens": 3})


def test_abort_finishes_request_as_aborted(llm_none):
    seqs = llm_none.add_request("Hello there", SamplingParams(max_tokens=50))
    llm_none.engine.step()
    assert llm_none.abort(seqs[0].request_id)
    assert seqs[0].finish_reason == "aborted" and not llm_none.engine.has_unfinished()
