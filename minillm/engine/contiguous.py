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
Explained in notebooks/03_kv_cache.ipynb.
"""

from __future__ import annotations

from collections import deque

import torch

from minillm.attention.backends import ContiguousAttention
from minillm.engine.request import Sequence, Status, sample_and_append
from minillm.kvcache.contiguous import ContiguousBatch, ContiguousKVCache, left_pad


class ContiguousEngine:
    def __init__(self, model, max_num_seqs: int, pad_token_id: int = 0, attention_backend: str = "reference"):
        self.model = model
        self.max_num_seqs = max_num_seqs
        self.pad_token_id = pad_token_id
        self.attention_backend = attention_backend
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # the current batch, finished rows included (they keep their row)
        self.cache: ContiguousKVCache | None = None
        self.attention: ContiguousAttention | None = None  # the backend over `cache`
        self.num_attention_fallbacks = 0  # layer calls of padded batches that took the reference (see backends.py)
        self.batch: ContiguousBatch | None = None  # the last step's batch; None before a prefill
        self.num_steps = 0
        self.batch_sizes: list[int] = []  # rows computed per step, idle rows included
        self.num_idle_row_steps = 0  # rows fed only to keep the batch rectangular
        self.reserved_tokens = 0  # cache columns reserved, summed over batches
        self.used_tokens = 0  # columns that ended up holding a real token

    def add(self, seq: Sequence, parent: Sequence | None = None) -> None:
        self.waiting.append(seq)  # every completion (parent or not) gets its own row: nothing is shared here

    def has_unfinished(self) -> bool:
        return bool(self.waiting) or any(not s.is_finished for s in self.running)

    def abort(self, request_id: str) -> list[Sequence]:
        aborted = [s for s in [*self.waiting, *self.running] if s.request_id == request_id and not s.is_finished]
        for seq in aborted:
            seq.finish("aborted")
        self.waiting = deque(s for s in self.waiting if not s.is_finished)
        return aborted

    @torch.no_grad()
    def step(self) -> list[Sequence]:
        """One prefill or decode step. If it raises (an error, Ctrl-C), the batch's unfinished sequences go back to
        the front of the queue with their tokens so far (recomputed by the next prefill) before the error
        propagates: half-written cache columns are never read."""
        try:
            return self._step()
        except BaseException:
            unfinished = [s for s in self.running if not s.is_finished]
            for seq in reversed(unfinished):
                seq.status = Status.PREEMPTED
                seq.num_preemptions += 1
                self.waiting.appendleft(seq)
            self.running, self.batch = [], None
            raise

    def _step(self) -> list[Sequence]:
        if not any(not s.is_finished for s in self.running):
            self._finish_batch()
            if not self.waiting:
                return []
            return self._prefill()
        return self._decode()

    def _finish_batch(self) -> None:
        if self.running:
            self.used_tokens += sum(s.num_tokens - 1 for s in self.running)  # the last token is never fed back
        self.running, self.batch = [], None

    def _prefill(self) -> list[Sequence]:
        seqs = [self.waiting.popleft() for _ in range(min(self.max_num_seqs, len(self.waiting)))]
        for seq in seqs:
            seq.status = Status.RUNNING
        self.running = seqs  # from here on a failure requeues them (see step)
        device = next(self.model.parameters()).device
        dtype = next(self.model.parameters()).dtype
        input_ids, batch = left_pad([s.token_ids for s in seqs], self.pad_token_id, device)  # (B, P)
        B, P = input_ids.shape
        # The most tokens a row may still produce; the last one is sampled but never written to the cache.
        max_steps = max(min(s.params.max_tokens - len(s.output_token_ids), s.max_model_len - s.num_tokens) for s in seqs)
        max_len = P + max(max_steps, 1) - 1
        config = self.model.config
        if self.cache is None or self.cache.max_batch_size < B or self.cache.max_len < max_len:
            self.cache = self.attention = None  # free the old slab before reserving a bigger one
            self.cache = ContiguousKVCache.for_model(config, B, max_len, dtype, device)
        else:
            self.cache.reset()
        self.attention = ContiguousAttention(self.cache, self.attention_backend)
        self.reserved_tokens += B * max_len
        # Left padding: every row's last prompt token is in column P - 1, the only one whose logits we need.
        last = torch.tensor([P - 1], device=input_ids.device)
        logits = self.model(input_ids, batch.positions, self.attention, batch, logits_at=last)  # (B, 1, V)
        self.batch = batch
        return self._sample(logits[:, -1])

    def _decode(self) -> list[Sequence]:
        seqs = self.running
        batch = self.batch.next_decode()
        last = [s.token_ids[-1] if not s.is_finished else self.pad_token_id for s in seqs]
        input_ids = torch.tensor(last, device=batch.positions.device)[:, None]  # (B, 1)
        logits = self.model(input_ids, batch.positions, self.attention, batch)  # (B, 1, V)
        self.batch = batch
        self.num_idle_row_steps += sum(s.is_finished for s in seqs)
        return self._sample(logits[:, -1])

    def _sample(self, logits: torch.Tensor) -> list[Sequence]:
        """Sample the rows still running from logits (B, V); finished rows are skipped."""
        rows = [i for i, s in enumerate(self.running) if not s.is_finished]
        active = [self.running[i] for i in rows]
        sample_and_append(active, logits[rows])
        self.num_steps += 1
        self.batch_sizes.append(len(self.running))
        self.num_attention_fallbacks += self.attention.num_fallbacks
        self.attention.num_fallbacks = 0
        if not any(not s.is_finished for s in self.running):
            self._finish_batch()
        return active

    def stats(self) -> dict:
        waste = 1.0 - self.used_tokens / self.reserved_tokens if self.reserved_tokens else 0.0
        return {
            "num_steps": self.num_steps,
            "batch_sizes": list(self.batch_sizes),
            "num_preemptions": 0,
            "num_idle_row_steps": self.num_idle_row_steps,
            "kv_reserved_tokens": self.reserved_tokens,
            "kv_used_tokens": self.used_tokens,
            "kv_waste": waste,
            "kv_reserved_bytes": self.cache.nbytes if self.cache is not None else 0,
            "attention_fallbacks": self.num_attention_fallbacks,
        }
