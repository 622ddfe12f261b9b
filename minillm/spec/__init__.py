"""Speculative decoding (notebook 09): guess several tokens cheaply, verify them in one pass of the target.

``ngram.propose_ngram`` guesses by prompt lookup; ``verify.greedy_accept`` and ``verify.rejection_sample`` keep
the guesses so that the output is exactly what decoding without speculation would give (greedy) or is distributed
exactly like it (sampling).
"""

from minillm.spec.ngram import propose_ngram
from minillm.spec.verify import expected_tokens_per_step, greedy_accept, rejection_sample

__all__ = ["expected_tokens_per_step", "greedy_accept", "propose_ngram", "rejection_sample"]
