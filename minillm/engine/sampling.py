"""Turning logits into the next token: greedy, temperature, top-k, top-p, each request with its own seed.

In doing so, you will learn about:
  * temperature: divide logits by T before the softmax; T -> 0 is greedy (argmax), T = 1 the model's distribution;
  * top-k: keep only the k most likely tokens;
  * top-p / nucleus sampling (Holtzman et al., arXiv 1904.09751 §3.1): keep the smallest set of tokens whose
    probability mass reaches p;
  * reproducibility: one random generator per request, so a seeded request draws the same tokens whatever else
    shares its batch.
Notebook 01 samples from the real model with these; exercise 1.4 rebuilds top-p.

Shapes: B sequences in the batch, V vocab.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes 64-bit seeds; stay in the signed range


@dataclass
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means no top-k filtering
    top_p: float = 1.0  # 1.0 means no nucleus filtering
    seed: int | None = None  # None: a fresh random seed per request
    ignore_eos: bool = False  # keep going past end-of-sequence (benchmarks want fixed output lengths)
    stop: str | list[str] | None = None  # stop strings; the text is cut before them
    n: int = 1  # completions per prompt (parallel sampling)
    stop_token_ids: list[int] | None = None
    # Structured output (chapter 12, minillm/serve/structured.py): each is called as fn(output_token_ids, logits)
    # on the sequence's row of logits (V,) before sampling, and returns it with the forbidden tokens at -inf.
    logits_processors: list[Callable[[list[int], torch.Tensor], torch.Tensor]] | None = None

    def __post_init__(self):
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be in [0, 100] (0 = greedy), got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = disabled), got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 = disabled), got {self.top_p!r}")
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n must be an int >= 1, got {self.n!r}")
        if self.n > 1 and self.temperature == 0.0:
            raise ValueError("n > 1 needs temperature > 0: greedy decoding would give n identical completions")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED - self.n + 1):
            # Completion i of n draws with seed + i: every one of them must be a valid generator seed.
            raise ValueError(f"seed must be None or an int in [0, {MAX_SEED - self.n + 1}] (n={self.n}), got {self.seed!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is not None and not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a non-empty string or a list of them, got {self.stop!r}")
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.logits_processors = list(self.logits_processors or [])
        if not all(callable(f) for f in self.logits_processors):
            raise ValueError("logits_processors must be callables fn(output_token_ids, logits) -> logits")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Set all but the k largest logits of each row to -inf. logits (B, V); k = 0 keeps everything."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth_largest = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probabilities sum to >= p. logits (B, V)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of all strictly more likely tokens
    drop_sorted = mass_before >= p  # the top token always survives: its mass_before is 0
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator per request: the draw happens on CPU so a seed means the same tokens on any device."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    return torch.Generator(device="cpu").manual_seed(seed)


@torch.no_grad()
def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> list[int]:
    """One next token per row. logits (B, V) -> B token ids, row i drawn with params[i] and generators[i]."""
    if logits.dim() != 2 or logits.shape[0] != len(params) or len(params) != len(generators):
        raise ValueError(
            f"sample needs logits (B, V) with B == len(params) == len(generators); got {tuple(logits.shape)}, "
            f"{len(params)} params, {len(generators)} generators"
        )
    tokens = logits.argmax(dim=-1).tolist()  # greedy for every row; sampled rows are overwritten below
    for i, (p, gen) in enumerate(zip(params, generators)):
        if p.is_greedy:
            continue
        row = logits[i : i + 1].float() / p.temperature  # (1, V)
        row = apply_top_p(apply_top_k(row, p.top_k), p.top_p)
        probs = row.softmax(dim=-1).cpu()
        tokens[i] = int(torch.multinomial(probs, 1, generator=gen).item())
    return tokens


@torch.no_grad()
def sampling_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution ``sample`` draws from, for every row of one sequence's logits (R, V) -> (R, V) float32:
    tempered, top-k and top-p filtered, softmaxed. Speculative sampling (chapter 09) verifies guesses against it."""
    rows = apply_top_p(apply_top_k(logits.float() / params.temperature, params.top_k), params.top_p)
    return rows.softmax(dim=-1)
