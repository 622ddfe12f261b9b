"""The simplest engine: no KV cache, so every step runs each sequence's whole token list again.

This is how `model.generate` looks in a first tutorial, and it is the baseline the KV cache chapter (notebook 03)
measures against: step t costs a forward pass over t tokens, so generating n tokens costs O(n^2) token-passes.
Sequences of different lengths share a batch with *right* padding: the causal mask already stops real tokens from
seeing the pad tokens after them, so no extra mask is needed; we read each row's logits at its last real token.
Batching is continuous for free: with nothing cached, any set of sequences can run together at any step.
"""

from __future__ import annotations

from collections import deque

import torch

from minillm.attention.backends import NoCacheAttention
from minillm.engine.request import Sequence, Status, sample_and_append


class RecomputeEngine:
    def __init__(self, model, max_num_seqs: int, pad_token_id: int = 0, attention_backend: str = "reference"):
        self.model = model
        self.attention = NoCacheAttention(attention_backend)
        self.max_num_seqs = max_num_seqs
        self.pad_token_id = pad_token_id
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_steps = 0
        self.batch_sizes: list[int] = []

    def add(self, seq: Sequence, parent: Sequence | None = None) -> None:
        self.waiting.append(seq)  # nothing is cached, so a completion shares nothing with its `parent`

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, request_id: str) -> list[Sequence]:
        aborted = [s for s in [*self.waiting, *self.running] if s.request_id == request_id]
        for seq in aborted:
            seq.finish("aborted")
        self.waiting = deque(s for s in self.waiting if not s.is_finished)
        self.running = [s for s in self.running if not s.is_finished]
        return aborted

    @torch.no_grad()
    def step(self) -> list[Sequence]:
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
        if not self.running:
            return []
        seqs = self.running
        lengths = [s.num_tokens for s in seqs]
        device = next(self.model.parameters()).device
        input_ids = torch.full((len(seqs), max(lengths)), self.pad_token_id, dtype=torch.long)  # (B, T)
        for row, seq in enumerate(seqs):
            input_ids[row, : lengths[row]] = torch.tensor(seq.token_ids)
        logits = self.model(input_ids.to(device), attention=self.attention)  # (B, T, V)
        last = logits[torch.arange(len(seqs)), torch.tensor(lengths) - 1]  # (B, V)
        sample_and_append(seqs, last)
        self.running = [s for s in seqs if not s.is_finished]
        self.num_steps += 1
        self.batch_sizes.append(len(seqs))
        return seqs

    def stats(self) -> dict:
        return {"num_steps": self.num_steps, "batch_sizes": list(self.batch_sizes), "num_preemptions": 0}
