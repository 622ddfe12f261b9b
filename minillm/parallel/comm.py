"""The collectives tensor parallelism needs, counted, and what they cost per token.

Two operations cover a Megatron-style transformer (arXiv 1909.08053):
  * **all-reduce** (sum): after a row-parallel linear (``o_proj``, ``down_proj``) every rank holds a partial sum of
    the full output; after the reduce every rank holds the sum. Also after the vocabulary-parallel embedding, where
    each rank looked up only the ids in its slice of the vocabulary (zeros elsewhere).
  * **all-gather**: the LM head splits the vocabulary, so each rank computes a slice of the logits; sampling needs
    them all, so the slices are concatenated. (An all-reduce would work too, on zero-padded full-width logits, but
    it moves world_size times more data.)

Every call here goes through ``torch.distributed`` (gloo on a CPU, NCCL on GPUs) and is counted in ``COUNTERS``:
calls, bytes handed to the collective, and seconds spent in it, which is how notebook 11 compares the measured
traffic with ``allreduce_bytes_per_token``'s prediction and the time spent talking with the time spent computing.
With no process group (``group=None``, one process) the collectives do nothing: a single shard is the whole model.
The seconds are wall time around each call: exact with gloo, whose collectives return when done; NCCL's return
once queued on the GPU, so on GPUs they count only the launch (read a profile for the kernels' time).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from minillm.config import ModelConfig


@dataclass
class CommCounters:
    all_reduce_calls: int = 0
    all_reduce_bytes: int = 0
    all_gather_calls: int = 0
    all_gather_bytes: int = 0
    seconds: float = 0.0

    def reset(self) -> None:
        self.__init__()

    def as_dict(self) -> dict:
        return dict(self.__dict__)


COUNTERS = CommCounters()  # this process's collectives since the last reset


def world_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    """Sum `x` over the ranks of `group`, in place; returns x."""
    if world_size(group) == 1:
        return x
    start = time.perf_counter()
    dist.all_reduce(x, group=group)
    COUNTERS.seconds += time.perf_counter() - start
    COUNTERS.all_reduce_calls += 1
    COUNTERS.all_reduce_bytes += x.numel() * x.element_size()
    return x


def all_gather_last_dim(x: torch.Tensor, group) -> torch.Tensor:
    """(..., n) on every rank -> (..., world_size * n), the ranks' slices side by side in rank order."""
    if world_size(group) == 1:
        return x
    start = time.perf_counter()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    COUNTERS.seconds += time.perf_counter() - start
    COUNTERS.all_gather_calls += 1
    COUNTERS.all_gather_bytes += x.numel() * x.element_size()
    return torch.cat(parts, dim=-1)


# ---------------------------------------------------------------------------------------------------------------
# Predictions (exercise 11.4 rebuilds the first one)


def allreduce_bytes_per_token(config: ModelConfig, dtype_bytes: int, world_size: int) -> int:
    """Bytes each rank hands to all-reduces for one token's forward pass: two per layer (after attention, after
    the MLP) plus one after the embedding, each a (hidden_size,) vector. Zero on one rank: nothing to reduce."""
    if world_size == 1:
        return 0
    return (2 * config.num_layers + 1) * config.hidden_size * dtype_bytes


def ring_wire_bytes(payload_bytes: int, world_size: int) -> float:
    """Bytes each rank sends in a ring all-reduce of `payload_bytes`: 2 (W - 1) / W of it (reduce-scatter, then
    all-gather, each moving (W - 1) chunks of payload / W)."""
    return 2 * (world_size - 1) / world_size * payload_bytes


def weight_bytes_per_rank(shard_model: torch.nn.Module) -> int:
    """Bytes of the weights one rank reads per decode step (a tied embedding and LM head once: ``parameters()``
    yields a shared parameter once)."""
    return sum(p.numel() * p.element_size() for p in shard_model.parameters())
