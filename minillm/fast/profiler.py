"""Profile first: one engine step split into Python, kernels by family, and the gaps between kernels.

In doing so, you will learn about:
  * ``torch.profiler`` (https://pytorch.org/docs/stable/profiler.html): every operator (and on a GPU every kernel)
    with its start and duration, plus the named regions the engine loop marks (``minillm.schedule``,
    ``minillm.prepare``, ``minillm.forward``: ``engine/engine.py``);
  * reading a decode step the way an inference engineer does: how much is Python (scheduling, packing the batch,
    sampling), how much is kernels (matmuls, attention, the small elementwise ops), and how much is *gaps* -- time
    inside the forward when no kernel runs because the host is still deciding what to launch next
    (``fast/timeline.py``). At batch 1 the matmuls read every weight once; everything else is overhead to cut.

What a "kernel" is depends on the device. On a GPU it is what ran on the GPU (CUDA kernel events). On a CPU it is one
of minillm's Triton launches (``triton::add_rmsnorm``..., whatever the interpreter runs inside), or an
outermost ATen operator that moves data (``aten::linear``, ``aten::mul``...; views and other metadata-only ops
are left out) called from Python: its children (``aten::linear`` -> ``aten::mm``) are inside its time, and the gaps are
the Python and dispatcher time between such calls. A compiled forward's C++ kernels (``cpp_fused_*``) show up only
when inductor was told to record them (``torch._inductor.config.cpp.enable_kernel_profile = True`` before
compiling). Notebook 10 draws the timeline.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import pandas as pd
import torch
from torch.profiler import ProfilerActivity, profile, record_function

from minillm.engine.sampling import SamplingParams
from minillm.fast.timeline import kernel_gaps

# Kineto, the profiler's backend, logs every start and stop (with a timestamp and the process id) to stderr; quiet it
# before it first starts, or each notebook output would hold those lines.
os.environ.setdefault("KINETO_LOG_LEVEL", "6")

REGIONS = ("minillm.schedule", "minillm.prepare", "minillm.forward")
# Leaf operators that only change metadata (shape, strides, dtype bookkeeping): no memory is read, no kernel runs.
METADATA_OPS = {
    "aten::view", "aten::reshape", "aten::_reshape_alias", "aten::as_strided", "aten::transpose", "aten::t",
    "aten::expand", "aten::slice", "aten::select", "aten::unsqueeze", "aten::squeeze", "aten::permute",
    "aten::_unsafe_view", "aten::detach", "aten::alias", "aten::empty", "aten::empty_like", "aten::empty_strided",
    "aten::resolve_conj", "aten::resolve_neg", "aten::lift_fresh", "aten::split", "aten::chunk", "aten::unbind",
    "aten::narrow", "aten::result_type", "aten::is_nonzero", "aten::item", "aten::_local_scalar_dense",
    "aten::to", "aten::contiguous", "aten::promote_types", "aten::size", "aten::stride", "aten::dim",
}
# Kernel name fragments -> family, first match wins (CPU operator names and GPU kernel names alike).
FAMILIES = [
    ("matmul", ("aten::linear", "aten::mm", "aten::addmm", "aten::bmm", "gemm", "gemv", "cutlass", "matmul",
                "sm90_xmma")),
    ("attention", ("attention", "paged_decode", "flash", "softmax", "sdpa")),
    ("fused (Triton)", ("triton::", "add_rmsnorm", "rope_qk", "silu_mul")),
    ("fused (compiled)", ("cpp_fused", "triton_poi", "triton_red", "triton_per")),  # inductor's own kernels
    ("KV store / gather", ("index", "gather", "scatter", "store_kv", "masked")),
]


def family(name: str) -> str:
    lowered = name.lower()
    for fam, fragments in FAMILIES:
        if any(f in lowered for f in fragments):
            return fam
    return "elementwise / other"


@dataclass
class StepProfile:
    """What ``profile_decode_steps`` saw: kernels and regions of ``num_steps`` engine steps on ``device``.

    kernels: name, family, step, start_us, dur_us (from the first profiled step's start);
    regions: step, region ("step" or one of REGIONS), start_us, dur_us.
    """

    kernels: pd.DataFrame
    regions: pd.DataFrame
    num_steps: int
    device: str

    def summary(self) -> pd.DataFrame:
        """Mean milliseconds per step of each part, and its share of the step: the table notebook 10 prints."""
        r = self.regions.groupby("region")["dur_us"].sum() / self.num_steps / 1e3
        step, forward = r.get("step", 0.0), r.get("minillm.forward", 0.0)
        in_forward = self.kernels[self.kernels["in_forward"]]
        busy = {fam: d / self.num_steps / 1e3 for fam, d in in_forward.groupby("family")["dur_us"].sum().items()}
        gaps = self.forward_gaps()["gap_us"].sum() / self.num_steps / 1e3
        rows = [("Python: schedule", r.get("minillm.schedule", 0.0)), ("Python: prepare the batch",
                                                                      r.get("minillm.prepare", 0.0))]
        rows += [(f"forward: {fam}", ms) for fam, ms in sorted(busy.items(), key=lambda kv: -kv[1])]
        rows += [("forward: gaps between kernels", gaps),
                 ("forward: other (overlap, profiler)", forward - sum(busy.values()) - gaps),
                 ("Python: sample, commit, free", step - forward - r.get("minillm.schedule", 0.0)
                  - r.get("minillm.prepare", 0.0))]
        table = pd.DataFrame(rows, columns=["part", "ms_per_step"])
        table["share"] = table["ms_per_step"] / step
        return table

    def kernels_per_step(self) -> float:
        return int(self.kernels["in_forward"].sum()) / self.num_steps

    def forward_gaps(self) -> pd.DataFrame:
        """The idle time before each kernel of the forward, step by step (``timeline.kernel_gaps``)."""
        parts = [kernel_gaps(k) for _, k in self.kernels[self.kernels["in_forward"]].groupby("step") if len(k) > 1]
        return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["gap_us"])


def profile_decode_steps(llm, batch_size: int = 1, num_steps: int = 4, prompt_len: int = 16, warmup: int = 2,
                         seed: int = 0) -> StepProfile:
    """Run ``batch_size`` requests into steady decoding, then profile ``num_steps`` decode steps of ``llm``'s engine.

    The requests are random prompts of ``prompt_len`` tokens that ignore EOS; whatever is left of them is aborted
    at the end, so the engine is left empty.
    """
    if batch_size < 1 or num_steps < 1 or prompt_len < 1:
        raise ValueError(f"batch_size, num_steps and prompt_len must be >= 1, got {batch_size}, {num_steps}, "
                         f"{prompt_len}")
    rng = random.Random(seed)
    params = SamplingParams(max_tokens=warmup + num_steps + 2, ignore_eos=True)
    vocab = llm.config.vocab_size
    seqs = [s for _ in range(batch_size)
            for s in llm.add_request([rng.randrange(vocab) for _ in range(prompt_len)], params)]
    engine = llm.engine
    is_cuda = llm.device.type == "cuda"
    try:
        with llm._lock:
            while any(not s.output_token_ids for s in seqs):  # the prefills (chunked or not) until a first token
                engine.step()
            for _ in range(warmup):
                engine.step()
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if is_cuda else [])
            with profile(activities=activities) as prof:
                for _ in range(num_steps):
                    with record_function("minillm.step"):
                        engine.step()
                    if is_cuda:
                        torch.cuda.synchronize()
    finally:
        llm._abort_unfinished(seqs)
    return _tables(prof.events(), num_steps, "cuda" if is_cuda else "cpu")


def _is_cpu_kernel(event) -> bool:
    """A compiled kernel, one of our Triton launches, or an outermost data-moving ATen operator outside both."""
    if "cpp_fused" in event.name or event.name.startswith("triton::"):
        return True
    if not event.name.startswith("aten::") or event.name in METADATA_OPS:
        return False
    parent = event.cpu_parent
    while parent is not None:  # inside another operator, or inside a Triton launch (the interpreter's own ops)
        if parent.name.startswith(("aten::", "triton::")):
            return False
        parent = parent.cpu_parent
    return True


def _tables(events, num_steps: int, device: str) -> StepProfile:
    steps = sorted((e for e in events if e.name == "minillm.step"), key=lambda e: e.time_range.start)
    forwards = [e for e in events if e.name == "minillm.forward"]
    t0 = steps[0].time_range.start

    def step_of(start: float) -> int:
        return max(i for i, s in enumerate(steps) if s.time_range.start <= start) if start >= t0 else -1

    regions = [(step_of(e.time_range.start), "step" if e.name == "minillm.step" else e.name, e.time_range.start - t0,
                e.time_range.elapsed_us()) for e in events if e.name in REGIONS or e.name == "minillm.step"]
    if device == "cuda":
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    else:
        kernels = [e for e in events if _is_cpu_kernel(e)]
    rows = []
    for e in kernels:
        start = e.time_range.start
        in_forward = device == "cuda" or any(f.time_range.start <= start <= f.time_range.end for f in forwards)
        rows.append((e.name, family(e.name), step_of(start), start - t0, e.time_range.elapsed_us(), in_forward))
    kernel_table = pd.DataFrame(rows, columns=["name", "family", "step", "start_us", "dur_us", "in_forward"])
    region_table = pd.DataFrame(regions, columns=["step", "region", "start_us", "dur_us"])
    return StepProfile(kernel_table.sort_values("start_us", ignore_index=True), region_table, num_steps, device)
