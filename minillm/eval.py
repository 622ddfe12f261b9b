"""Perplexity: how surprised a model is by a text, the yardstick for every lossy change to a model.

In doing so, you will learn about:
  * perplexity = exp(mean negative log-likelihood per predicted token), i.e. the model is as uncertain as if it
    chose uniformly among that many tokens at each step (Jelinek et al., 1977; the metric of every quantization
    paper: GPTQ arXiv 2210.17323 §5, AWQ arXiv 2306.00978 §5 report WikiText-2 perplexity);
  * evaluating a text longer than the context with sliding windows: each window of `window` tokens advances by
    `stride` and only its last `stride` tokens are scored, so every scored token sees at least
    `window - stride` tokens of context (the Hugging Face "perplexity of fixed-length models" recipe);
  * reproducible evaluation offline: ``minillm/data/`` ships an English text, so tests and CI never download.
The numbers are only comparable for the same tokenizer, text, max_tokens, window and stride.
Notebook 06 (``06_quantization``) compares every quantization scheme with it.

Shapes: B batch, T tokens, V vocab.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

DATA_DIR = Path(__file__).parent / "data"
EVAL_SOURCES = ("offline", "wikitext2")


def load_eval_text(source: str = "offline") -> str:
    """The evaluation text: "offline" is the English text shipped in minillm/data (see its README);
    "wikitext2" is the WikiText-2 raw test split through the `datasets` package (downloads; never used by tests).
    """
    if source == "offline":
        return (DATA_DIR / "eval_text.txt").read_text(encoding="utf-8")
    if source == "wikitext2":
        try:
            import datasets
        except ImportError as exc:
            raise ImportError("load_eval_text('wikitext2') needs `pip install datasets` and a network") from exc
        test = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
        return "\n\n".join(test["text"])
    raise ValueError(f"unknown eval text source {source!r}; choose one of {EVAL_SOURCES}")


def load_calibration_text() -> str:
    """A separate English text shipped in minillm/data for calibrating quantization (AWQ) without a network."""
    return (DATA_DIR / "calibration_text.txt").read_text(encoding="utf-8")


def calibration_batch(
    tokenizer: Any,
    text: str | None = None,
    num_tokens: int = 2048,
    seq_len: int = 128,
) -> torch.Tensor:
    """Tokenize calibration text into a (B, seq_len) batch of ``num_tokens // seq_len`` full sequences.

    `text=None` uses the calibration text shipped with minillm (``load_calibration_text``, distinct from the evaluation
    text, so perplexity is not measured on the tokens quantization or pruning saw). Raises ValueError if the text is
    too short. The one calibration rule of the package: AWQ (``minillm.quant``) and Wanda (``minillm.prune``) both
    call it.
    """
    if num_tokens < seq_len or seq_len <= 0:
        raise ValueError(f"need num_tokens >= seq_len > 0, got num_tokens={num_tokens}, seq_len={seq_len}")
    if text is None:
        text = load_calibration_text()
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    num_seqs = num_tokens // seq_len
    if ids.numel() < num_seqs * seq_len:
        raise ValueError(
            f"calibration text has {ids.numel()} tokens, fewer than the {num_seqs * seq_len} requested "
            f"({num_seqs} x {seq_len})"
        )
    return ids[: num_seqs * seq_len].reshape(num_seqs, seq_len)  # (B, T)


def _default_text() -> str:
    """WikiText-2 when `datasets` is installed and the download works, else the offline text."""
    try:
        return load_eval_text("wikitext2")
    except (ImportError, OSError, ConnectionError) as exc:
        print(f"WikiText-2 unavailable ({type(exc).__name__}); using the offline text shipped with minillm")
        return load_eval_text("offline")


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    tokenizer,
    text: str | None = None,
    max_tokens: int = 4096,
    window: int = 512,
    stride: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> float:
    """Perplexity of `model` on the first `max_tokens` tokens of `text`.

    model(input_ids (1, T)) -> logits (1, T, V). text=None tries WikiText-2 (download), else the offline text.
    Windows of `window` tokens advance by `stride` (default window // 2); the first window scores all its tokens
    but the first, later ones only their last `stride`, so no token is scored twice. With stride == window the
    first token of each window has no context inside it and is not scored.
    """
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens, got {window}")
    stride = window // 2 if stride is None else stride
    if not 1 <= stride <= window:
        raise ValueError(f"stride must be in [1, window={window}], got {stride}")
    if max_tokens < 2:
        raise ValueError(f"max_tokens must be at least 2, got {max_tokens}")
    if text is None:
        text = _default_text()
    if device is None:
        device = next(model.parameters(), next(model.buffers(), torch.empty(0))).device
    ids = tokenizer(text, return_tensors="pt").input_ids[0, :max_tokens].to(device)  # (T_total,)
    if ids.numel() < 2:
        raise ValueError(f"the text gives {ids.numel()} tokens; perplexity needs at least 2")
    nll_sum, num_scored, prev_end = 0.0, 0, 0
    num_windows = 1 + math.ceil(max(ids.numel() - window, 0) / stride)
    for start in tqdm(range(0, num_windows * stride, stride), desc="perplexity", disable=not progress):
        end = min(start + window, ids.numel())
        chunk = ids[start:end][None]  # (1, T)
        logits = model(chunk).float()  # (1, T, V)
        # Token t is predicted by position t - 1; score only targets not scored by an earlier window.
        first_target = max(prev_end, start + 1)
        targets = ids[first_target:end]
        preds = logits[0, first_target - start - 1 : end - start - 1]  # (n, V)
        nll_sum += F.cross_entropy(preds, targets, reduction="sum").item()
        num_scored += targets.numel()
        prev_end = end
    return math.exp(nll_sum / num_scored)
