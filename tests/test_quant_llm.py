"""`LLM(quantization=...)` serves a quantized model through the paged engine, token for token like the no-cache path."""

import copy

import pytest
import torch

from minillm import LLM, SamplingParams

pytestmark = pytest.mark.slow


def test_int8_paged_matches_recompute(smollm):
    model, tok = smollm
    llm = LLM(copy.deepcopy(model), tokenizer=tok, quantization="int8", kv_cache="paged")  # quantizes in place
    assert type(llm.model.layers[0].mlp.down_proj).__name__ == "Int8Linear"
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    prompt = "The capital of France is"
    paged = llm.generate(prompt, params)[0].token_ids
    # The same quantized weights with no cache at all (the previous stage): greedy tokens must agree.
    ref = LLM(llm.model, tokenizer=tok, kv_cache="none").generate(prompt, params)[0].token_ids
    assert len(paged) == 6
    assert paged == ref
    # The fixture's model was left untouched.
    assert isinstance(model.layers[0].mlp.down_proj, torch.nn.Linear)
