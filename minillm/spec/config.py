"""``speculative_config``, in vLLM's words, turned into a proposer, with every bad value refused up front.

    {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": n, "prompt_lookup_min": m}
    {"method": "draft_model", "num_speculative_tokens": k, "model": <a name, a path or a Transformer>}

Both take ``min_expected_tokens`` (the turn-down rule, ``proposers.py``; 0 always speculates). Speculation verifies
guesses in the paged engine only.
"""

from __future__ import annotations

import torch

from minillm.spec.proposers import NgramProposer, default_min_expected_tokens

KEYS = {
    "ngram": {"method", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min", "min_expected_tokens"},
    "draft_model": {"method", "num_speculative_tokens", "model", "min_expected_tokens"},
}


def make_proposer(config: dict, target: torch.nn.Module, kv_cache: str, max_model_len: int, *,
                  num_kv_blocks: int = 0, block_size: int = 16, max_num_seqs: int = 1, kernel: str = "reference"):
    """The proposer `config` asks for, for `target`. A draft model gets a KV pool of the target's `num_kv_blocks`
    plus room for every sequence's guesses."""
    if not isinstance(config, dict):
        raise ValueError(f"speculative_config must be a dict, got {type(config).__name__}")
    if kv_cache != "paged":
        raise ValueError(f"speculative decoding needs kv_cache='paged', got kv_cache={kv_cache!r}")
    method = config.get("method")
    if method not in KEYS:
        raise ValueError(f"unknown speculative method {method!r}; available: {sorted(KEYS)}")
    unknown = sorted(set(config) - KEYS[method])
    if unknown:
        raise ValueError(f"unknown speculative_config keys {unknown} for method {method!r}; allowed: "
                         f"{sorted(KEYS[method])}")
    k = config.get("num_speculative_tokens")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError("speculative_config needs num_speculative_tokens, an int >= 1 (how many tokens to guess "
                         f"per step), got {k!r}")
    if k >= max_model_len:
        raise ValueError(f"num_speculative_tokens={k} cannot fit: the context holds only max_model_len="
                         f"{max_model_len} tokens")
    device = next(target.parameters()).device
    min_expected = config.get("min_expected_tokens", default_min_expected_tokens(device.type))
    if method == "ngram":
        return NgramProposer(k, config.get("prompt_lookup_max", 3), config.get("prompt_lookup_min", 1), min_expected)

    from minillm.spec.draft import DraftModelProposer

    draft = config.get("model")
    if draft is None:
        raise ValueError("method 'draft_model' needs speculative_config['model']: a model name, a path, or a "
                         "Transformer such as minillm.spec.self_draft(target, num_layers)")
    if not isinstance(draft, torch.nn.Module):
        from minillm.loading import load_model

        draft, _ = load_model(draft, device=device, dtype=next(target.parameters()).dtype)
    if next(draft.parameters()).device != device:
        raise ValueError(f"the draft model is on {next(draft.parameters()).device}, the target on {device}: "
                         "put both on the same device")
    guess_blocks = max_num_seqs * -(-k // block_size)
    return DraftModelProposer(draft, target.config, k, num_kv_blocks + guess_blocks, block_size, kernel, min_expected)
