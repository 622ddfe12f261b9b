"""Proposers: where the guesses of speculative decoding come from, behind one small interface.

A proposer has ``num_speculative_tokens`` (k) and ``propose(seq) -> list[int]``: at most k guesses for the tokens
after ``seq.token_ids``. The engine (``engine/engine.py``) asks it before each step for every decoding sequence, the
scheduler lets the guesses ride along when they fit, and the verification (``verify.py``) keeps the ones the target
agrees with. Never more guesses than the request may still emit: the last token of a step is always the target's own.
Notebook 09 (``09_speculative_decoding``) compares the proposers.
"""

from __future__ import annotations

from minillm.engine.request import Sequence
from minillm.spec.ngram import propose_ngram


def guess_budget(seq: Sequence, k: int) -> int:
    """How many guesses `seq` can use: k, but leaving room for the target's own token within max_tokens and the
    context length."""
    left = min(seq.params.max_tokens - len(seq.output_token_ids), seq.max_model_len - seq.num_tokens)
    return max(0, min(k, left - 1))


class NgramProposer:
    """Prompt lookup (``ngram.propose_ngram``): no model, guesses copied from earlier in the sequence."""

    def __init__(self, num_speculative_tokens: int, prompt_lookup_max: int = 3, prompt_lookup_min: int = 1):
        if not isinstance(num_speculative_tokens, int) or num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be an int >= 1, got {num_speculative_tokens!r}")
        if not (isinstance(prompt_lookup_min, int) and isinstance(prompt_lookup_max, int)
                and 1 <= prompt_lookup_min <= prompt_lookup_max):
            raise ValueError(f"need ints 1 <= prompt_lookup_min <= prompt_lookup_max, got {prompt_lookup_min!r} and "
                             f"{prompt_lookup_max!r}")
        self.num_speculative_tokens = num_speculative_tokens
        self.max_n, self.min_n = prompt_lookup_max, prompt_lookup_min

    def propose(self, seq: Sequence) -> list[int]:
        k = guess_budget(seq, self.num_speculative_tokens)
        return propose_ngram(seq.token_ids, k, self.max_n, self.min_n) if k else []
