"""Layer sensitivity: how much perplexity rises when only one part of one layer is pruned.

In doing so, you will learn about:
- that layers are not equally prunable: in LLMs the first and last decoder layers usually hurt most, which is why
  non-uniform schemes give them less sparsity (OWL, Yin et al., arXiv 2310.05175; the per-layer scans of
  SparseGPT, Frantar & Alistarh, arXiv 2301.00774, section 4);
- a one-at-a-time scan: prune one group of linears (``self_attn`` or ``mlp`` of layer i) with everything else dense,
  measure perplexity, restore the weights, move on. Cost: one perplexity evaluation per (layer, group).

Wanda needs the input norms of the pruned layer; with every other layer dense they are exactly the norms of the
dense model, so one calibration pass serves the whole scan. Notebook 07 (``07_pruning``) draws it as a heatmap.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from minillm.eval import calibration_batch, load_eval_text, perplexity
from minillm.prune.magnitude import magnitude_score
from minillm.prune.pruning import check_prune_args, mask_function, prunable_linears
from minillm.prune.wanda import (
    DEFAULT_CALIBRATION_SEQ_LEN,
    DEFAULT_CALIBRATION_TOKENS,
    InputNormCollector,
    apply_mask,
    wanda_score,
)

DEFAULT_GROUPS = ("self_attn", "mlp")


@torch.no_grad()
def sensitivity_scan(
    model: torch.nn.Module,
    tokenizer: Any,
    method: str = "magnitude",
    sparsity: float = 0.5,
    pattern: str | None = None,
    groups: tuple[str, ...] = DEFAULT_GROUPS,
    layers: list[int] | None = None,
    text: str | None = None,
    max_tokens: int = 512,
    window: int = 512,
    calibration: torch.Tensor | str | None = None,
    num_calibration_tokens: int = DEFAULT_CALIBRATION_TOKENS,
    progress: bool = True,
) -> pd.DataFrame:
    """Perplexity with one (layer, group) pruned at a time; the model is left unchanged.

    groups: prefixes of linear names inside a layer: "self_attn", "mlp", or single linears like "mlp.down_proj".
    layers: the layer indices to scan (default all). text/max_tokens/window: passed to ``minillm.eval.perplexity``
    (text=None: the offline evaluation text, so the scan never downloads).
    Returns a DataFrame with columns layer, group, perplexity, delta (perplexity minus the dense model's);
    ``df.pivot(index="layer", columns="group", values="delta")`` gives the heatmap.
    """
    check_prune_args(model, method, sparsity, pattern)
    make_mask = mask_function(sparsity, pattern)
    if text is None:
        text = load_eval_text("offline")
    linears = prunable_linears(model)
    layers = list(range(len(model.layers))) if layers is None else list(layers)
    targets = []  # (layer, group, names of the linears pruned together)
    for i in layers:
        for group in groups:
            names = [n for n in linears if n.startswith(f"layers.{i}.{group}")]
            if not names:
                raise ValueError(f"group {group!r} matches no linear in layer {i}; try 'self_attn' or 'mlp'")
            targets.append((i, group, names))
    norms = {}
    if method == "wanda":
        if not isinstance(calibration, torch.Tensor):
            calibration = calibration_batch(tokenizer, calibration, num_calibration_tokens, DEFAULT_CALIBRATION_SEQ_LEN)
        device = next(model.parameters()).device
        with InputNormCollector(linears) as collector:
            for ids in calibration.to(device).split(8):
                model(ids)
        norms = collector.norms()

    def ppl() -> float:
        return perplexity(model, tokenizer, text=text, max_tokens=max_tokens, window=window, progress=False)

    dense = ppl()
    rows = []
    for i, group, names in tqdm(targets, desc="sensitivity", disable=not progress):
        saved = {n: linears[n].weight.detach().clone() for n in names}
        for n in names:
            weight = linears[n].weight
            score = wanda_score(weight, norms[n]) if method == "wanda" else magnitude_score(weight)
            apply_mask(linears[n], make_mask(score))
        value = ppl()
        for n in names:
            linears[n].weight.copy_(saved[n])
        rows.append(dict(layer=i, group=group, perplexity=value, delta=value - dense))
    return pd.DataFrame(rows)
