"""A model-free run of the real scheduler: who sits in which batch slot at every step.

The scheduler is pure bookkeeping, so it can run without a model: this is the real engine loop (``Engine``, with the
same `Scheduler` and `BlockManager` as `PagedEngine`) around a stand-in model whose every "token" is 0 and a
stand-in attention backend that holds no tensors. It runs in milliseconds, so notebook 05 (``05_continuous_batching``) can
draw timelines of static vs continuous batching (Orca, OSDI 2022), show preemption under a small pool, and put the
arrival rate and the pool size under ipywidgets sliders. Time is counted in steps (one model forward pass each).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from minillm.attention.backends import AttentionBackend, StepInputs
from minillm.engine.engine import Engine
from minillm.engine.request import Sequence
from minillm.engine.sampling import SamplingParams
from minillm.engine.scheduler import Scheduler
from minillm.kvcache.blocks import BlockManager


@dataclass
class Request:
    arrival_step: int
    prompt_len: int
    output_len: int


@dataclass
class Timeline:
    """What happened at every step. ``slots[t][j]`` is the request in batch slot j at step t (None: a hole)."""

    policy: str
    slots: list[list[int | None]] = field(default_factory=list)
    tokens_per_step: list[int] = field(default_factory=list)
    blocks_used: list[int] = field(default_factory=list)
    preemptions: list[int] = field(default_factory=list)  # preemptions at each step
    first_token_step: dict[int, int] = field(default_factory=dict)
    finish_step: dict[int, int] = field(default_factory=dict)

    @property
    def num_steps(self) -> int:
        return len(self.slots)

    def latency(self, requests: list[Request]) -> list[int]:
        """Steps from arrival to the last token, per request."""
        return [self.finish_step[i] - r.arrival_step + 1 for i, r in enumerate(requests)]


def random_requests(num: int, rate: float, min_len: int, max_len: int, seed: int = 0) -> list[Request]:
    """Poisson arrivals at `rate` requests per step (rate <= 0: all at step 0), lengths uniform in [min, max]."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(min_len, max_len + 1, (num, 2), generator=g).tolist()
    gaps = torch.empty(num).exponential_(1.0, generator=g) / rate if rate > 0 else torch.zeros(num)
    arrivals = gaps.cumsum(0).floor().long().tolist()
    return [Request(a, p, o) for a, (p, o) in zip(arrivals, lens)]


class StandInAttention(AttentionBackend):
    """An attention backend with no pool: a step's only input is which packed rows are sampled.

    ``forks_share_kv=True`` stands in for the paged backend's parallel sampling (children share the parent's blocks).
    """

    def __init__(self, forks_share_kv: bool = False):
        self.forks_share_kv = forks_share_kv

    def prepare(self, out) -> StepInputs:
        rows = torch.tensor([i for i in range(len(out.seqs)) if out.is_last_chunk(i)], dtype=torch.long)
        return StepInputs(None, None, None, rows, torch.zeros_like(rows), torch.arange(len(rows)))


def stand_in_model(input_ids, positions, attention, metadata, logits_at):
    """One logit per sampled row (1, K, V=1): every sequence "samples" token 0."""
    return torch.zeros(1, len(logits_at), 1)


def simulate(
    requests: list[Request],
    num_blocks: int = 256,
    block_size: int = 16,
    max_num_seqs: int = 8,
    max_num_batched_tokens: int = 256,
    policy: str = "continuous",
    enable_chunked_prefill: bool = True,
    max_steps: int = 100_000,
) -> Timeline:
    """Serve `requests` with the real engine loop and a stand-in model; returns the step-by-step `Timeline`."""
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching=False)
    sched = Scheduler(bm, max_num_seqs, max_num_batched_tokens, policy, enable_chunked_prefill)
    engine = Engine(stand_in_model, sched, StandInAttention())
    order = sorted(range(len(requests)), key=lambda i: requests[i].arrival_step)
    timeline, slot_of, slots = Timeline(policy), {}, [None] * sched.max_num_seqs
    while order or engine.has_unfinished():
        step = timeline.num_steps
        while order and requests[order[0]].arrival_step <= step:
            i = order.pop(0)
            r = requests[i]
            engine.add(Sequence(seq_id=i, request_id=str(i), prompt_token_ids=[3 + i % 200] * r.prompt_len,
                                params=SamplingParams(max_tokens=r.output_len, ignore_eos=True), eos_token_ids=[],
                                max_model_len=10**9))
        sampled = engine.step()
        out = engine.last_step
        for seq in out.preempted:
            slots[slot_of.pop(seq.seq_id)] = None
        for seq in out.seqs:
            if seq.seq_id not in slot_of:
                slot_of[seq.seq_id] = slots.index(None)
                slots[slot_of[seq.seq_id]] = seq.seq_id
        for seq in sampled:
            timeline.first_token_step.setdefault(seq.seq_id, step)
            if seq.is_finished:
                timeline.finish_step[seq.seq_id] = step
        timeline.slots.append(list(slots))
        timeline.tokens_per_step.append(out.num_batched_tokens)
        # Blocks in use once the step's K/V is written, before finished sequences give theirs back.
        timeline.blocks_used.append(engine.kv_blocks_used_history[-1] if out.seqs else bm.num_used_blocks)
        timeline.preemptions.append(len(out.preempted))
        for seq in sampled:
            if seq.is_finished:
                slots[slot_of.pop(seq.seq_id)] = None
        if timeline.num_steps >= max_steps:
            raise RuntimeError(f"simulation did not finish in {max_steps} steps")
    return timeline
