"""Triton, in one place: whether it is here, how its kernels run on this machine, and which kernels really ran.

Triton compiles GPU kernels from Python. It is optional: on a laptop without it (macOS, Windows, a CPU-only wheel)
the package still imports and every kernel has a PyTorch reference to fall back to. Without a GPU, Triton kernels
can still run in Triton's CPU interpreter (``TRITON_INTERPRET=1``): slow, but the same kernel code, which is how
the tests and the CPU notebooks check them. The variable must be set before a kernel is *defined* (Triton reads it
at ``@triton.jit``), so minillm sets it here, on import, before any of its kernel modules load: a learner on a CPU
needs no extra knowledge for "the kernel matches the reference" to mean the kernel ran. Set
``TRITON_INTERPRET=0`` yourself to opt out; the kernels then fall back to torch, and ``minillm.doctor()`` says so.

Because several launchers still fall back to the reference where a kernel cannot run, a cell that claims a kernel
ran proves it with ``count_kernel_launches``:

    with minillm.count_kernel_launches() as launched:
        out = flash_attention(q, k, v)
    assert launched["flash_attention"] == 1
"""

import contextlib
import importlib.util
import os
from collections import Counter
from collections.abc import Iterator

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None


def _decide_mode() -> str:
    """'compiled' (CUDA), 'interpreter' (CPU), 'off' (CPU, user opted out) or 'absent' (no triton)."""
    if not HAS_TRITON:
        return "absent"
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return "compiled"
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before any @triton.jit below runs
    return "interpreter" if os.environ["TRITON_INTERPRET"] == "1" else "off"


MODE = _decide_mode()
if HAS_TRITON:
    import triton
    import triton.language as tl
else:  # pragma: no cover - exercised by tests/test_no_triton.py in a subprocess
    triton = None
    tl = None

# How many times each kernel was launched in this process, by name; launchers call `record_launch`.
_LAUNCHES: Counter[str] = Counter()
# Calls that ran the torch path where a kernel was expected (on a GPU, or where a Triton kernel was asked for), by
# "what: why". Deliberate fallbacks only -- a kernel asked for explicitly that cannot run raises instead.
_FALLBACKS: Counter[str] = Counter()


def is_interpreter() -> bool:
    """True when Triton kernels run in the CPU interpreter rather than compiled for a GPU."""
    return MODE == "interpreter"


def triton_available(device: torch.device | str) -> bool:
    """Can a Triton kernel run on tensors living on `device`?"""
    if torch.device(device).type == "cuda":
        return MODE in ("compiled", "interpreter")
    return MODE == "interpreter"


def require_triton(device: torch.device | str, kernel: str) -> None:
    """Raise a clear error where `kernel` cannot run, instead of quietly running something else."""
    if not triton_available(device):
        raise RuntimeError(
            f"the Triton kernel {kernel} cannot run on {torch.device(device)} (Triton mode: {MODE}); run it on a CUDA "
            "GPU, or on CPU with TRITON_INTERPRET=1 set before minillm is imported, or call its _ref twin"
        )


def record_launch(kernel: str) -> None:
    """Count one launch of `kernel` (called by every launcher right before ``kernel[grid](...)``)."""
    _LAUNCHES[kernel] += 1


def record_fallback(what: str, why: str) -> None:
    """Count one call that ran the torch path instead of a kernel (``llm.stats()["kernel_fallbacks"]`` shows them)."""
    _FALLBACKS[f"{what}: {why}"] += 1


def fallback_counts() -> Counter[str]:
    """A copy of the process-wide fallback counts: diff two copies to count the fallbacks in between."""
    return _FALLBACKS.copy()


@contextlib.contextmanager
def count_kernel_launches() -> Iterator[Counter[str]]:
    """Yield a Counter that, after the block, holds how many times each Triton kernel was launched inside it."""
    before = _LAUNCHES.copy()
    launched: Counter[str] = Counter()
    try:
        yield launched
    finally:
        launched.update(_LAUNCHES - before)


# Shared memory one program (thread block) may use, by CUDA compute capability: the opt-in maximum per block from
# the CUDA C++ Programming Guide, "Technical Specifications per Compute Capability". Launchers size their tiles to fit.
MAX_SHARED_MEMORY = {75: 64 * 1024, 80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024}


def device_arch(device: torch.device | str) -> int | None:
    """The compute capability of `device` as an int (75 for a T4, 80 for an A100, 90 for an H100), or None where
    kernels run in the CPU interpreter: the launchers choose their tiles from it."""
    device = torch.device(device)
    if device.type != "cuda" or MODE != "compiled":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def max_shared_memory(arch: int) -> int:
    """Bytes of shared memory one program may use on compute capability `arch` (99 KiB, the smallest since sm80, for
    an arch not in MAX_SHARED_MEMORY)."""
    return MAX_SHARED_MEMORY.get(arch, 99 * 1024)
