"""The public LLM front end on the real model: parity with transformers, prompts, stopping, streaming, errors."""

import pytest

import minillm
from minillm import SamplingParams

PROMPTS = ["The capital of France is", "def add(a, b):"]


@pytest.fixture(scope="module")
def llm(smollm):
    """The default engine (paged KV cache, continuous batching): the front-end tests run on it because it is fast."""
    model, tok = smollm
    return minillm.LLM(model, tokenizer=tok)


def hf_greedy(hf_model, tok, prompt, max_new_tokens):
    ids = tok(prompt, return_tensors="pt").input_ids
    out = hf_model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, ids.shape[1] :].tolist()


GREEDY_PROMPTS = PROMPTS + ["Once upon a time, in a land far away, there lived"]


@pytest.mark.parametrize(
    "kv_cache, options",
    [("none", {}), ("contiguous", {}), ("paged", {"block_size": 4, "max_num_batched_tokens": 8})],  # paged: chunked
    ids=["none", "contiguous", "paged"],
)
def test_greedy_matches_transformers_generate(kv_cache, options, hf_smollm, smollm):
    """Every KV cache mode gives transformers' greedy tokens on the real model (prompts of different lengths)."""
    model, tok = smollm
    outs = minillm.LLM(model, tokenizer=tok, kv_cache=kv_cache, **options).generate(
        GREEDY_PROMPTS, SamplingParams(max_tokens=8, ignore_eos=True)
    )
    for prompt, out in zip(GREEDY_PROMPTS, outs):
        assert out.token_ids == hf_greedy(hf_smollm, tok, prompt, 8), (kv_cache, prompt)
        assert out.finish_reason == "length" and out.metrics["num_output_tokens"] == 8


def test_chat_messages_and_token_ids(llm, smollm):
    tok = smollm[1]
    chat = [{"role": "user", "content": "Hi"}]
    ids = llm.encode(chat)
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")
    a, b = llm.generate([chat, ids], SamplingParams(max_tokens=3))
    assert a.token_ids == b.token_ids


def test_stop_string_cuts_text(llm):
    out = llm.generate("Count: one, two, three, four,", SamplingParams(max_tokens=12, stop=","))[0]
    assert "," not in out.text and out.finish_reason == "stop"


def test_stream_yields_the_generated_text(llm):
    params = SamplingParams(max_tokens=6, temperature=0.7, seed=11)
    streamed = "".join(llm.stream("Once upon a time", params))
    assert streamed == llm.generate("Once upon a time", params)[0].text


def test_seeded_sampling_is_reproducible_and_n_gives_n(llm):
    params = SamplingParams(max_tokens=5, temperature=1.0, seed=5, n=2)
    a = llm.generate("Hello", params)[0]
    b = llm.generate("Hello", params)[0]
    assert len(a.outputs) == 2 and [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]


def test_bad_input_is_a_clear_error(llm):
    with pytest.raises(ValueError, match="context is"):
        llm.generate([list(range(5, 5 + llm.max_model_len))])
    with pytest.raises(TypeError, match="a prompt must be"):
        llm.generate([3.5])
    with pytest.raises(ValueError, match="token ids must be in"):
        llm.generate([[10**9]])
    with pytest.raises(ValueError, match="2 prompts but 1"):
        llm.generate(PROMPTS, [SamplingParams()])
    with pytest.raises(ValueError, match="unknown kv_cache"):
        minillm.LLM(kv_cache="ring")
    with pytest.raises(TypeError, match="SamplingParams"):
        llm.generate("x", {"max_tokens": 3})


def test_abort_finishes_request_as_aborted(llm):
    seqs = llm.add_request("Hello there", SamplingParams(max_tokens=50))
    llm.engine.step()
    assert llm.abort(seqs[0].request_id)
    assert seqs[0].finish_reason == "aborted" and not llm.engine.has_unfinished()


def test_a_refused_prompt_leaves_nothing_queued(llm):
    with pytest.raises(ValueError):
        llm.generate(["fine", list(range(5, 5 + llm.max_model_len))])
    with pytest.raises(TypeError):
        llm.generate(["fine", "also fine"], [SamplingParams(), "not params"])
    assert not llm.engine.has_unfinished()


def test_incremental_detokenizer_equals_decoding_everything(smollm):
    """Decoding a window per token gives the text of decoding all tokens at once, multi-byte characters included."""
    import random

    from minillm.engine.request import Detokenizer

    _, tok = smollm
    text = "Héllo wörld! 日本語のテキスト, emoji 🙂🚀 and code: def f(x):\n    return x ** 2  # ok"
    rng = random.Random(0)
    for ids in [tok(text).input_ids, [rng.randrange(tok.vocab_size) for _ in range(200)]]:
        d = Detokenizer(tok)
        pieces = [d.update(ids[: i + 1]) for i in range(len(ids))]
        full = tok.decode(ids, skip_special_tokens=True)
        assert "".join(pieces) == d.text
        assert full.startswith(d.text) and len(full) - len(d.text) <= 1, (full[-10:], d.text[-10:])  # held-back U+FFFD
