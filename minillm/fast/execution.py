"""How an engine runs its model: eager, fused kernels, torch.compile, CUDA graphs -- chosen once, reported always.

``LLM(..., enforce_eager=None, compile=None)`` in vLLM's words:

    enforce_eager  None: True on a CPU, False on a GPU. False allows CUDA graphs for decode steps (GPU, paged cache)
    compile        None: True on a CPU when enforce_eager is False (the CPU's only speed-up here), else False.
                   True: torch.compile the pieces between attentions (``fast/forward.py``)

On a GPU whose attention runs in Triton, the pieces also use the fused Triton kernels (``fast/fused.py``) unless
they are compiled (inductor writes its own fused kernels). Nothing here crashes at construction: a compiler that
is missing or fails on its first (warm-up) call, fused or compiled logits that disagree with the eager model's on
that call, a model with quantized layers, CUDA graphs asked for on a CPU or failing to capture -- each falls back
to the eager path with a reason that ``LLM.stats()["execution"]`` shows, with the compile time and how many decode
steps replayed a graph.
"""

from __future__ import annotations

import shutil
import time

import torch

from minillm.fast.forward import PiecewiseForward, why_not_piecewise


def why_not_compile(device: torch.device) -> str | None:
    """Why torch.compile cannot run here (None: it can)."""
    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile (it needs torch >= 2.0)"
    if device.type == "cpu" and not any(shutil.which(cc) for cc in ("c++", "g++", "clang++")):
        return "torch.compile on a CPU needs a C++ compiler (inductor writes C++), and none is on PATH"
    return None


def _warm_up_and_check(forward: PiecewiseForward, model) -> str | None:
    """Compile now, not inside the first request (a decode shape, 1 token, and a prefill shape, 5), and check the
    result against the eager model on the way: None if they agree, else what differs. A kernel that compiled but
    computes wrong numbers on this machine must not serve requests."""
    device = next(model.parameters()).device
    ids = torch.arange(5, device=device)[None] * 7 + 1  # (1, 5) token ids
    with torch.no_grad():
        for num_tokens in (1, 5):
            got, expected = forward(ids[:, :num_tokens]).float(), model(ids[:, :num_tokens]).float()  # (1, T, V)
            error, scale = (got - expected).abs().max().item(), expected.abs().max().item()
            if not error <= 1e-3 + 2e-2 * scale:  # 16-bit rounding differs between fused and eager; a bug does not
                return f"its logits differ from the eager model's by {error:.3g} (largest logit {scale:.3g})"
    return None


def choose_execution(model, device: torch.device, kernel: str, kv_cache: str, enforce_eager: bool | None,
                     compile: bool | None) -> tuple[object, dict]:
    """-> (what the engine calls as its model, the report). CUDA graphs are added by ``wrap_with_graphs``."""
    for name, value in [("enforce_eager", enforce_eager), ("compile", compile)]:
        if value not in (None, True, False):
            raise ValueError(f"{name} must be None (derive it), True or False, got {value!r}")
    if enforce_eager is None:
        enforce_eager = device.type != "cuda"
    if compile is None:
        compile = device.type != "cuda" and not enforce_eager
    report = {"enforce_eager": enforce_eager, "compile": False, "ops": "eager", "cuda_graphs": False,
              "fallbacks": [], "compile_seconds": 0.0}
    # Fused kernels where Triton runs compiled; on a CPU the interpreter is a testing tool, far too slow for a model.
    ops = "compile" if compile else ("fused" if kernel == "triton" and device.type == "cuda" else "eager")
    if ops == "eager":
        return model, report
    reason = why_not_piecewise(model) or (why_not_compile(device) if ops == "compile" else None)
    if reason:
        report["fallbacks"].append(f"{ops}: {reason}; running eagerly")
        return model, report
    forward = PiecewiseForward(model, ops)
    start = time.perf_counter()
    try:
        reason = _warm_up_and_check(forward, model)
    except Exception as error:  # a broken toolchain shows up here, on the first compile or launch
        reason = f"it failed ({type(error).__name__}: {str(error)[:240]})"
    if reason:
        report["fallbacks"].append(f"{ops}: {reason}; running eagerly")
        return model, report
    if ops == "compile":
        report["compile_seconds"] = time.perf_counter() - start
    report.update(compile=ops == "compile", ops=ops)
    return forward, report


def wrap_with_graphs(forward, engine, report: dict, kv_cache: str, max_num_seqs: int, max_model_len: int):
    """Decode steps from CUDA graphs where allowed (not enforce_eager, a CUDA device, the paged cache)."""
    if report["enforce_eager"]:
        return forward
    device = engine.attention.cache.device if kv_cache == "paged" else None
    if kv_cache != "paged":
        report["fallbacks"].append(f"cuda_graphs: they need kv_cache='paged', got {kv_cache!r}")
        return forward
    if device.type != "cuda":
        report["fallbacks"].append(f"cuda_graphs: no CUDA device (the model is on {device})")
        return forward
    from minillm.fast.graphs import DecodeGraphs

    start = time.perf_counter()
    try:
        graphs = DecodeGraphs(forward, engine.attention, max_num_seqs, max_model_len, capture=True)
    except Exception as error:  # an operation that cannot be captured: serve eagerly, and say why
        report["fallbacks"].append(f"cuda_graphs: capture failed ({type(error).__name__}: {str(error)[:240]})")
        return forward
    report.update(cuda_graphs=True, capture_seconds=time.perf_counter() - start)
    return graphs
