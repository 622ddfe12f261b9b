"""Optional Triton import, in one place.

Triton compiles GPU kernels from Python. It is optional: on a laptop without it (macOS, or a CPU-only wheel) the
package still imports and every kernel has a PyTorch reference to fall back to. On CPU, Triton kernels can still run
under its interpreter (``TRITON_INTERPRET=1``, set before ``triton`` is imported), which is how the tests check them.
"""

import importlib.util
import os

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
if HAS_TRITON:
    import triton
    import triton.language as tl
else:  # pragma: no cover - exercised on machines without triton
    triton = None
    tl = None


def is_interpreter() -> bool:
    """True when Triton kernels run in the CPU interpreter rather than compiled for a GPU."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available(device: torch.device | str) -> bool:
    """Can a Triton kernel run on tensors living on `device`?"""
    if not HAS_TRITON:
        return False
    if torch.device(device).type == "cuda":
        return True
    return is_interpreter()
