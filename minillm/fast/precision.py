"""Mixed precision: how far a bf16 or fp16 copy of a model drifts from fp32, measured on logits and on greedy text.

In doing so, you will learn about:
  * the two 16-bit formats (Micikevicius et al., "Mixed Precision Training", arXiv 1710.03740; Kalamkar et al., "A
    Study of BFLOAT16 for Deep Learning Training", arXiv 1905.12322). fp16 keeps 5 exponent bits and 10 stored
    mantissa bits: 11 bits of precision (relative rounding error 2^-11 ~ 0.05%) but a range that ends at 65504 and
    turns subnormal below 6.1e-5. bf16 keeps fp32's 8 exponent bits (same range, ~3.4e38) and only 7 stored mantissa
    bits: 8 bits of precision (2^-8 ~ 0.4%). For the small activations of a healthy model (|x| << 65504) fp16 is
    the more precise one, about 8x (2^3) closer to fp32; bf16 wins only where fp16 would overflow. A logit is a
    value of magnitude 10-30 here, so bf16 alone rounds it to steps of 2^-4..2^-3 (0.06-0.125): two top logits closer
    than that can swap, and one swapped greedy token changes everything generated after it;
  * what minillm keeps in fp32 inside a 16-bit model, and why. ``model.RMSNorm`` upcasts, computes
    x * rsqrt(mean(x^2) + eps) in fp32 (a mean of squares of 16-bit values loses bits and x^2 overflows fp16 once
    |x| > 256), then casts back to the model's dtype *before* multiplying by its weight. The attention reference
    (``attention/reference.py: attention_ref``) upcasts q, k and v to fp32 and does all of q k^T * scale, the causal
    mask, the softmax and probs @ v in fp32, casting only the output back: the max-subtraction inside softmax and the
    sum of up to S exponentials are where 16 bits hurt most. RoPE's angles are computed in fp32 (``inv_freq`` stays
    fp32 by design), but cos/sin are cast to the model's dtype before the rotation. Every nn.Linear (and the
    lm_head, so the logits) runs and stores its result in the 16-bit dtype.

``precision_drift`` compares a deep copy of the model in each dtype with the fp32 model; the caller's model is
untouched. On CPU, fp16 matmuls work (torch 2.13) but are slow -- keep prompts short.
Notebook 10 (``10_fast_decoding``) shows the table for SmolLM2.

Shapes: B batch (always 1 here), T tokens, V vocab.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import pandas as pd
import torch


@torch.no_grad()
def greedy_no_cache(model: torch.nn.Module, input_ids: list[int], max_new_tokens: int) -> list[int]:
    """The argmax continuation of ``input_ids``, recomputing the whole sequence each step (no KV cache, no EOS stop):
    the simplest loop whose only numerical difference between two dtypes is the model's own arithmetic."""
    device = next(model.parameters()).device
    ids = torch.tensor([input_ids], device=device)  # (1, T)
    new = []
    for _ in range(max_new_tokens):
        last = torch.tensor([ids.shape[1] - 1], device=device)
        next_id = model(ids, logits_at=last)[0, -1].argmax()  # logits (1, 1, V) -> ()
        new.append(int(next_id))
        ids = torch.cat([ids, next_id.view(1, 1)], dim=1)  # (1, T + 1)
    return new


def _encode(tokenizer: Any, prompt: str | list[int], vocab_size: int) -> list[int]:
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError(f"prompt {prompt[:40]!r} is text but tokenizer is None; pass a tokenizer or token ids")
        ids = list(tokenizer(prompt).input_ids)
    elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
        ids = list(prompt)
    else:
        raise TypeError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")
    if not ids or min(ids) < 0 or max(ids) >= vocab_size:
        raise ValueError(f"prompt {prompt!r:.60} gives token ids {ids[:8]}...; need 1+ ids in [0, {vocab_size})")
    return ids


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@torch.no_grad()
def precision_drift(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str | list[int]],
    dtypes: Sequence[torch.dtype] = (torch.bfloat16, torch.float16),
    max_new_tokens: int = 16,
) -> pd.DataFrame:
    """How far a ``.to(dtype)`` copy of ``model`` drifts from fp32, one row per dtype.

    prompts: strings (encoded with ``tokenizer``) or lists of token ids; each runs alone as a (1, T) batch.
    Columns:
      ``max_abs_diff``, ``mean_abs_diff``: |logit - fp32 logit| over every prompt position and vocab entry of the
        prefill ``model(input_ids)`` (no cache), the max and the mean;
      ``top1_agreement``: the fraction of prompt positions whose argmax equals fp32's;
      ``tokens_until_divergence``: the length of the common prefix of the dtype's and fp32's greedy continuations
        (``max_new_tokens`` when they never differ), averaged over prompts;
      ``greedy_agreement``: the fraction of generated positions whose token equals fp32's at the same position.
    The reference is the model itself when it is fp32, else an fp32 copy; ``torch.float32`` in ``dtypes`` gives a
    zero-drift sanity row. The caller's model is never changed.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not prompts or isinstance(prompts, str):
        raise ValueError(f"prompts must be a non-empty list of prompts, got {prompts!r:.60}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    for dtype in dtypes:
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtypes must be floating torch dtypes (torch.bfloat16, torch.float16...), got {dtype!r}")
    reference = model if next(model.parameters()).dtype == torch.float32 else copy.deepcopy(model).float()
    device = next(model.parameters()).device
    encoded = [_encode(tokenizer, p, model.config.vocab_size) for p in prompts]
    ref_logits = [reference(torch.tensor([ids], device=device)).float() for ids in encoded]  # each (1, T, V)
    ref_greedy = [greedy_no_cache(reference, ids, max_new_tokens) for ids in encoded]

    rows = []
    for dtype in dtypes:
        low = copy.deepcopy(model).to(dtype)  # the caller's model keeps its dtype
        max_diff, diff_sum, num_logits, top1_equal, num_positions = 0.0, 0.0, 0, 0, 0
        prefix_lens, equal_tokens = [], 0
        for ids, ref, ref_new in zip(encoded, ref_logits, ref_greedy):
            logits = low(torch.tensor([ids], device=device)).float()  # (1, T, V)
            diff = (logits - ref).abs()
            max_diff = max(max_diff, diff.max().item())
            diff_sum, num_logits = diff_sum + diff.sum().item(), num_logits + diff.numel()
            top1_equal += (logits.argmax(-1) == ref.argmax(-1)).sum().item()
            num_positions += len(ids)
            new = greedy_no_cache(low, ids, max_new_tokens)
            prefix_lens.append(_common_prefix(new, ref_new))
            equal_tokens += sum(a == b for a, b in zip(new, ref_new))
        del low
        rows.append({
            "dtype": str(dtype).removeprefix("torch."),
            "max_abs_diff": max_diff,
            "mean_abs_diff": diff_sum / num_logits,
            "top1_agreement": top1_equal / num_positions,
            "tokens_until_divergence": sum(prefix_lens) / len(prefix_lens),
            "greedy_agreement": equal_tokens / (max_new_tokens * len(encoded)),
        })
    return pd.DataFrame(rows).set_index("dtype")
