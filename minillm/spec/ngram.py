"""Prompt lookup: guess the next tokens by finding the last few tokens earlier in the sequence, with no model at all.

In doing so, you will learn about:
  * n-gram speculation (Saxena, "Prompt Lookup Decoding", 2023; vLLM's ``ngram`` method): when a model edits code,
    summarizes a document or answers from a retrieved passage, its output copies long runs of its input. If the
    last n tokens appeared before, the tokens that followed them then are a good guess for what follows now;
  * why the longest match is tried first: a match of 3 tokens is far more specific than a match of 1 (which almost
    any common token has), so its continuation is more often right;
  * why a wrong guess costs little: the target model verifies all k guesses in one forward pass (``verify.py``), and
    a rejected guess only wastes that pass's extra query tokens.

Notebook 09 (``09_speculative_decoding``) colors the accepted and rejected guesses as they stream.
"""

from __future__ import annotations


def propose_ngram(token_ids: list[int], num_speculative_tokens: int, max_n: int = 3, min_n: int = 1) -> list[int]:
    """Up to `num_speculative_tokens` guesses for the tokens after `token_ids`, or [] if nothing matches.

    For n from `max_n` down to `min_n`: find the latest earlier occurrence of the last n tokens (not the suffix
    itself) and propose the tokens that followed it, as many as exist up to the end of the sequence. The latest
    occurrence is the most relevant one in a text that is being rewritten as it goes.

    Example: token_ids [5, 6, 7, 9, 5, 6] with max_n 2: the suffix [5, 6] occurred at position 0 and was followed by
    [7, 9, 5, 6], so with 3 speculative tokens the proposal is [7, 9, 5].
    """
    if num_speculative_tokens < 1:
        raise ValueError(f"num_speculative_tokens must be >= 1, got {num_speculative_tokens}")
    if not 1 <= min_n <= max_n:
        raise ValueError(f"need 1 <= min_n <= max_n, got min_n={min_n}, max_n={max_n}")
    length = len(token_ids)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        suffix = token_ids[length - n :]
        # Latest start first; a match must end before the suffix starts being itself (start <= length - n - 1).
        for start in range(length - n - 1, -1, -1):
            if token_ids[start : start + n] == suffix:
                follow = token_ids[start + n : start + n + num_speculative_tokens]
                return list(follow)
    return []
