"""Pruning on the real default model (SmolLM2-135M, fp32 CPU): Wanda beats magnitude; structured pruning still runs.

Small on purpose (about a minute on 2 cores): 1024 calibration tokens from the shipped calibration text, perplexity
on the first 1024 tokens of the shipped evaluation text in two 512-token windows.
"""

import copy

import pytest
import torch

from minillm.eval import load_eval_text, perplexity
from minillm.prune import (
    calibration_batch,
    count_parameters,
    is_nm_sparse,
    model_sparsity,
    prunable_linears,
    prune_heads,
    prune_mlp_channels,
    prune_model,
)

pytestmark = pytest.mark.slow  # the real model, about a minute: out of `make test-fast`

EVAL_TOKENS = 1024
CALIBRATION_TOKENS = 1024


def _perplexity(model, tok) -> float:
    return perplexity(model, tok, text=load_eval_text("offline"), max_tokens=EVAL_TOKENS, window=512, stride=512,
                      progress=False)


@pytest.fixture(scope="module")
def calibration(smollm):
    _, tok = smollm
    return calibration_batch(tok, None, num_tokens=CALIBRATION_TOKENS)


@pytest.fixture(scope="module")
def pruned_perplexities(smollm, calibration):
    """Perplexity of the dense model and of magnitude / Wanda at 50% unstructured and 2:4."""
    model, tok = smollm
    results = {"dense": _perplexity(model, tok)}
    for pattern in (None, "2:4"):
        for method in ("magnitude", "wanda"):
            pruned = prune_model(copy.deepcopy(model), method, 0.5, pattern, calibration=calibration)
            # 576- and 1536-wide rows: 50% is a whole number per row. The Q8_0 checkpoint already holds a few exact
            # zeros, which a row may keep beyond its quota, hence >= per row and a tiny excess overall.
            for lin in prunable_linears(pruned).values():
                assert ((lin.weight == 0).sum(dim=1) >= lin.in_features // 2).all()
            assert 0.5 <= model_sparsity(pruned) < 0.5 + 1e-4
            if pattern is not None:
                assert all(is_nm_sparse(lin.weight, 2, 4) for lin in prunable_linears(pruned).values())
            results[method, pattern] = _perplexity(pruned, tok)
            del pruned
    print(results)
    return results


@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_wanda_beats_magnitude(pruned_perplexities, pattern):
    dense = pruned_perplexities["dense"]
    magnitude, wanda = pruned_perplexities["magnitude", pattern], pruned_perplexities["wanda", pattern]
    assert dense < wanda < magnitude
    # The paper's gap is large (LLaMA-7B at 50%: 17.3 vs 7.3); require at least a 2x gap here too.
    assert magnitude > 2 * wanda


def test_prune_model_leaves_embeddings_alone(smollm):
    model, _ = smollm
    assert "embed_tokens" not in " ".join(prunable_linears(model))
    assert len(prunable_linears(model)) == 30 * 7


def _greedy(model, ids, steps):
    for _ in range(steps):
        next_id = model(ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_id], dim=1)
    return ids


@torch.no_grad()
def test_structured_pruning_still_generates(smollm, calibration, pruned_perplexities):
    model, tok = smollm
    pruned = copy.deepcopy(model)
    heads = prune_heads(pruned, 1 / 3, unit="query_head", calibration=calibration)  # 9 -> 6 query heads, Hkv = 3
    mlp = prune_mlp_channels(pruned, 0.25, calibration=calibration)  # 1536 -> 1152 channels
    C, D, L = 576, 64, 30
    assert heads.num_params_before - heads.num_params_after == L * 3 * 2 * D * C  # q_proj rows + o_proj columns
    assert mlp.num_params_before - mlp.num_params_after == L * 384 * 3 * C  # gate/up rows + down columns
    assert heads.num_params_before == count_parameters(model)
    assert mlp.num_params_after == count_parameters(pruned) == pruned.config.num_parameters
    assert (pruned.config.num_heads, pruned.config.num_kv_heads, pruned.config.intermediate_size) == (6, 3, 1152)

    prompt = tok("The capital of France is", return_tensors="pt").input_ids
    out = _greedy(pruned, prompt, 8)
    assert out.shape == (1, prompt.shape[1] + 8)
    assert isinstance(tok.decode(out[0, prompt.shape[1]:]), str)
    dense_ppl, pruned_ppl = pruned_perplexities["dense"], _perplexity(pruned, tok)
    print(f"structured: {count_parameters(model)} -> {count_parameters(pruned)} params, "
          f"perplexity {dense_ppl:.2f} -> {pruned_ppl:.2f}")
    assert dense_ppl < pruned_ppl < 50 * dense_ppl  # damaged, not destroyed
