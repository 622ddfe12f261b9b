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


# Triton reads TRITON_INTERPRET when a kernel is *defined* (at import), not when it runs: setting it later does not
# turn kernels already defined into interpreted ones. So the import-time value is the one that counts.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def is_interpreter() -> bool:
    """True when Triton kernels run in the CPU interpreter rather than compiled for a GPU."""
    return _INTERPRETED


def triton_available(device: torch.device | str) -> bool:
    """Can a Triton kernel run on tensors living on `device`?"""
    if not HAS_TRITON:
        return False
    if torch.device(device).type == "cuda":
        return True
    return is_interpreter()
