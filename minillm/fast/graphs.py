"""CUDA graphs for decode: record a whole decode step once per batch-size bucket, then replay it with one launch.

In doing so, you will learn about:
  * why a small model's decode step is launch-bound: SmolLM2's step is ~400 kernels of a few microseconds each,
    and the CPU issuing them one by one (Python, the dispatcher, the driver) is slower than the GPU running them;
  * CUDA graphs (``torch.cuda.CUDAGraph``, https://pytorch.org/docs/stable/notes/cuda.html#cuda-graphs): the
    kernels of one step are recorded once with their arguments -- pointers included -- and replayed as one unit.
    Everything a replay reads must therefore live at the same address every step: token ids, positions, slot
    mapping, block tables and context lengths are *static buffers* the engine copies each step's values into;
  * buckets and padding (vLLM's ``cudagraph_capture_sizes``): a graph has fixed shapes, so one graph is captured
    per batch size in ``decode_buckets(max_num_seqs)`` (1, 2, 4, 8, 16, ...) and a batch of 5 is padded to the
    bucket of 8 with rows that write no K/V (slot -1) and attend to one key (``fast/buckets.py``);
  * what a graph cannot hold: a prefill chunk's shapes change every step, so prefills (and steps mixing them) run
    eagerly; only pure decode steps replay.

On a CPU there are no CUDA graphs; ``capture=False`` runs the very same padded, static-buffer step eagerly, which
is how the tests check the padding and the buffers without a GPU. Notebook 10 (``10_fast_decoding``) draws the
buckets and measures the replay.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from minillm.attention.backends import PagedMetadata, StepPlan
from minillm.fast.buckets import PAD_CONTEXT_LEN, PAD_POSITION, PAD_SLOT, PAD_TOKEN_ID, decode_buckets, pick_bucket


class DecodeGraphs:
    """A model forward (same signature as ``Transformer.forward``) that replays decode steps from per-bucket graphs.

    forward: what runs the model (the model, or ``fast.forward.PiecewiseForward``); attention: the engine's
    ``PagedAttention``; capture: record CUDA graphs (False: run the padded static-buffer step eagerly, e.g. on a CPU).
    """

    def __init__(self, forward, attention, max_num_seqs: int, max_model_len: int, capture: bool = True):
        cache = attention.cache
        device = cache.device
        if capture and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, the KV cache is on {device}; use capture=False")
        self.forward, self.attention, self.capture = forward, attention, capture
        self.buckets = decode_buckets(max_num_seqs)
        self.max_model_len = max_model_len
        self.max_blocks = math.ceil(max_model_len / cache.block_size)  # the widest block table a sequence can have
        B = self.buckets[-1]
        # The static buffers: every replay reads these addresses, each step copies its values in.
        self.input_ids = torch.full((1, B), PAD_TOKEN_ID, dtype=torch.long, device=device)
        self.positions = torch.full((1, B), PAD_POSITION, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((B,), PAD_SLOT, dtype=torch.long, device=device)
        self.context_lens = torch.full((B,), PAD_CONTEXT_LEN, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(B, self.max_blocks, dtype=torch.int32, device=device)
        self.graphs: dict[int, tuple[Any, torch.Tensor]] = {}  # bucket -> (CUDAGraph, its static logits (1, b, V))
        self.num_replays = self.num_eager = 0
        self.pool = torch.cuda.graph_pool_handle() if capture else None  # one memory pool shared by all buckets
        if capture:
            for bucket in reversed(self.buckets):  # largest first: smaller graphs reuse its memory
                self.graphs[bucket] = self._capture(bucket)

    def _metadata(self, bucket: int) -> PagedMetadata:
        """The bucket's metadata: views of the static buffers; max_context_len is the longest any context can be."""
        device = self.slot_mapping.device
        rows = torch.arange(bucket, device=device)
        return PagedMetadata(
            slot_mapping=self.slot_mapping[:bucket], cu_seqlens_q=torch.arange(bucket + 1, dtype=torch.int32,
                                                                               device=device),
            context_lens=self.context_lens[:bucket], block_tables=self.block_tables[:bucket], max_seqlen_q=1,
            max_context_len=self.max_model_len, query_lens_host=[1] * bucket,
            context_lens_host=[self.max_model_len] * bucket,
            plan=StepPlan(decode_rows=rows, decode_max_len=self.max_model_len))

    def _run(self, bucket: int) -> torch.Tensor:
        logits_at = torch.arange(bucket, device=self.input_ids.device)
        return self.forward(self.input_ids[:, :bucket], self.positions[:, :bucket], self.attention,
                            self._metadata(bucket), logits_at=logits_at)  # (1, bucket, V)

    def _capture(self, bucket: int):
        with torch.no_grad():
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm up outside the graph: Triton compiles, allocators settle
                self._run(bucket)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                logits = self._run(bucket)
        return graph, logits

    def can_replay(self, input_ids: torch.Tensor, metadata: Any, logits_at: torch.Tensor | None) -> bool:
        """A pure decode step (one token per sequence, logits for each) that fits the largest bucket."""
        if not isinstance(metadata, PagedMetadata) or metadata.plan is None:
            return False
        plan, n = metadata.plan, input_ids.shape[1]
        return (plan.prefill_tokens is None and plan.decode_tokens is None and metadata.num_seqs == n
                and n <= self.buckets[-1] and metadata.block_tables.shape[1] <= self.max_blocks
                and logits_at is not None and logits_at.shape[0] == n)

    def __call__(self, input_ids, positions=None, attention=None, metadata=None, logits_at=None) -> torch.Tensor:
        if attention is not self.attention or not self.can_replay(input_ids, metadata, logits_at):
            self.num_eager += 1
            return self.forward(input_ids, positions, attention, metadata, logits_at=logits_at)
        n = input_ids.shape[1]
        bucket = pick_bucket(n, self.buckets)
        width = metadata.block_tables.shape[1]
        # Copy this step into the static buffers; rows n..bucket keep the padding (slot -1 writes nothing).
        self.input_ids[:, :n] = input_ids
        self.positions[:, :n] = positions
        self.slot_mapping[:n] = metadata.slot_mapping
        self.slot_mapping[n:bucket] = PAD_SLOT
        self.context_lens[:n] = metadata.context_lens
        self.context_lens[n:bucket] = PAD_CONTEXT_LEN
        self.block_tables[:n, :width] = metadata.block_tables
        self.block_tables[:n, width:] = 0
        self.block_tables[n:bucket] = 0
        self.num_replays += 1
        if not self.capture:
            logits = self._run(bucket)
        else:
            graph, logits = self.graphs[bucket]
            graph.replay()
        return logits[:, :n]  # (1, n, V): the padded rows' logits are never read

    def stats(self) -> dict:
        return {"graph_buckets": list(self.buckets), "graph_replays": self.num_replays,
                "eager_steps": self.num_eager, "captured": bool(self.graphs)}
