"""Shared benchmark plumbing: one argument parser, a timer, the environment record, and the results files.

Timing follows the Triton tutorials: on a CUDA GPU, ``triton.testing.do_bench`` (CUDA events, the L2 cache flushed
between runs, the median); elsewhere, ``time.perf_counter`` around synchronized calls. Every result file carries the
environment it was measured in (device, versions, git commit, date), because a speed claim is a ratio against a peer
measured in the same run on a named device. No test times anything: numbers come from ``python -m minillm.bench``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from minillm._triton import HAS_TRITON, triton
from minillm.doctor import package_version

DEFAULT_OUT_DIR = "benchmarks/results"


def make_parser(topic: str, description: str | None = None) -> argparse.ArgumentParser:
    """The options every topic accepts (so `python -m minillm.bench all --out DIR` works); add your own to it."""
    parser = argparse.ArgumentParser(prog=f"python -m minillm.bench {topic}", description=description)
    parser.add_argument("--out", default=DEFAULT_OUT_DIR, help="folder for the JSON and PNG results")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    return parser


def device_name(device: torch.device | str | None = None) -> str:
    """Human-readable name of the device the benchmark runs on, e.g. "NVIDIA H100 80GB HBM3" or "cpu (2 cores)"."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"cpu ({threads} thread{'s' if threads > 1 else ''})"


def device_slug(device: torch.device | str | None = None) -> str:
    """File-name-safe device name: "nvidia-h100-80gb-hbm3", or "cpu" for any CPU."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def _git_commit() -> str | None:
    repo = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def environment_info(device: torch.device | str | None = None) -> dict[str, Any]:
    """Where and when a benchmark ran: device, library versions, git commit (if in a checkout), UTC date."""
    return {
        "device": device_name(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "transformers": package_version("transformers"),
        "git_commit": _git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def time_fn(
    fn: Callable[[], Any],
    warmup: int = 3,
    iters: int = 10,
    device: torch.device | str | None = None,
) -> float:
    """Median wall time of one call of `fn`, in milliseconds.

    On CUDA with Triton installed this delegates to ``triton.testing.do_bench``, which picks its own repetition
    count from a time budget and flushes the L2 cache between runs; `warmup` and `iters` (call counts) apply
    to the CUDA-events path without Triton and to the CPU path.
    """
    if warmup < 0 or iters < 1:
        raise ValueError(f"need warmup >= 0 and iters >= 1, got warmup={warmup}, iters={iters}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if HAS_TRITON:
            return float(triton.testing.do_bench(fn, return_mode="median"))
        for _ in range(warmup):
            fn()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        for start, end in zip(starts, ends):
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _to_json(value: Any) -> Any:
    # Tensors, numpy arrays and numpy scalars all have tolist(); torch.dtype and paths become strings.
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def write_results(
    topic: str,
    results: dict[str, Any],
    fig: Any = None,
    out_dir: str | Path = DEFAULT_OUT_DIR,
    device: torch.device | str | None = None,
) -> list[Path]:
    """Write `<out_dir>/<topic>-<device-slug>.json` (environment + results) and `.png` (when `fig` is a
    matplotlib Figure); return the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{topic}-{device_slug(device)}"
    record = {"topic": topic, "environment": environment_info(device), "results": results}
    json_path = stem.with_suffix(".json")
    json_path.write_text(json.dumps(record, indent=2, default=_to_json) + "\n")
    paths = [json_path]
    if fig is not None:
        png_path = stem.with_suffix(".png")
        fig.savefig(png_path, dpi=120, bbox_inches="tight")
        paths.append(png_path)
    return paths
