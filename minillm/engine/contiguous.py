"""Static batching over a contiguous KV cache: one batched prefill, then one token per row per step.

How ``model.generate`` works in transformers and in gpt-fast (with a preallocated "static" cache). A batch takes up to
``max_num_seqs`` waiting sequences and reserves a contiguous cache for them (``minillm.kvcache.contiguous``):
``B`` rows of ``P + max_steps - 1`` columns, where P is the longest prompt and max_steps the most tokens any row
may still generate. Then
  * prefill: the prompts, LEFT-padded to P, go through the model in one forward pass that fills columns [0, P).
    Left padding makes every row's last prompt token sit in column P - 1, so the next tokens of all rows line up
    in one column (P, then P + 1, ...): one write offset for the batch, one bottom-right causal mask, and a key
    padding mask that hides each row's pads. Position ids count real tokens only (column - pads), so a padded
    row computes exactly what it would alone;
  * decode: every step feeds each row its last token (B, 1) and writes one new column.
A row that finishes stops being sampled but keeps its place (it is fed a pad token that nobody reads) until the
whole batch has finished; only then does the next batch start. That idle work, and the cache columns reserved for
tokens that are never generated, are what continuous batching and paging remove (chapters 04-05); ``stats()``
counts both.

It is the engine loop (``engine/engine.py``) with the scheduler's static policy (a new batch only once the last one
has finished) and ``ContiguousAttention`` as its backend, which owns the slab and the rows.
Explained in notebooks/03_kv_cache.ipynb.
"""

from __future__ import annotations

from minillm.attention.backends import ContiguousAttention
from minillm.engine.engine import Engine
from minillm.engine.scheduler import whole_sequence_scheduler


class ContiguousEngine(Engine):
    def __init__(self, model, max_num_seqs: int, pad_token_id: int = 0, attention_backend: str = "reference",
                 max_model_len: int | None = None):
        param = next(model.parameters())
        scheduler = whole_sequence_scheduler(max_num_seqs, max_model_len or model.config.max_position_embeddings,
                                             policy="static")
        attention = ContiguousAttention(None, attention_backend, model.config, param.dtype, param.device, pad_token_id)
        super().__init__(model, scheduler, attention)
