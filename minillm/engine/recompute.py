"""The simplest engine: no KV cache, so every step runs each sequence's whole token list again.

This is how `model.generate` looks in a first tutorial, and it is the baseline the KV cache chapter (notebook 03)
measures against: step t costs a forward pass over t tokens, so generating n tokens costs O(n^2) token-passes. It is
the engine loop (``engine/engine.py``) with ``NoCacheAttention`` as its backend: the sequences share a batch with
*right* padding (the causal mask already stops real tokens from seeing the pads after them), and each row's logits
are read at its last real token. Batching is continuous for free: with nothing cached, any set of sequences can run
together at any step.
"""

from __future__ import annotations

from minillm.attention.backends import NoCacheAttention
from minillm.engine.engine import Engine
from minillm.engine.scheduler import whole_sequence_scheduler


class RecomputeEngine(Engine):
    def __init__(self, model, max_num_seqs: int, pad_token_id: int = 0, attention_backend: str = "reference",
                 max_model_len: int | None = None):
        device = next(model.parameters()).device
        scheduler = whole_sequence_scheduler(max_num_seqs, max_model_len or model.config.max_position_embeddings,
                                             policy="continuous")
        super().__init__(model, scheduler, NoCacheAttention(attention_backend, pad_token_id, device))
