"""Weight-only int8/int4 matmul vs the fp16/bf16 torch.matmul at decode shapes (batch 1-16).

Decoding multiplies a few token rows by each weight matrix, so the time is bounded by reading the weights:
    achieved bandwidth (GB/s) = bytes of the weight as stored (codes + scales + zero-points) / time.
The peer, measured in the same run on the same device, is `x @ W.T` with W in fp16 (or bf16). On a GPU the int8/int4
layers run the Triton dequant kernels of ``minillm/quant/kernels.py`` (GEMV path for M <= 16); on a CPU they run the
PyTorch reference (dequantize, then matmul), so CPU numbers are informational only: that path reads *more* bytes.
Notebook 06 (``06_quantization``) discusses the results. Run: ``python -m minillm.bench quant [--sizes 4096x4096]``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from minillm.bench.common import device_name, make_parser, time_fn, write_results
from minillm.quant import Int4Linear, Int8Linear

GPU_SIZES = "4096x4096,14336x4096,4096x14336"  # N x K: Llama-style attention and MLP up/down widths
CPU_SIZES = "1024x1024,2048x2048"


def parse_sizes(text: str) -> list[tuple[int, int]]:
    sizes = []
    for item in text.split(","):
        n, _, k = item.partition("x")
        if not (n.isdigit() and k.isdigit()):
            raise ValueError(f"--sizes wants NxK pairs like 4096x4096, got {item!r}")
        sizes.append((int(n), int(k)))
    return sizes


@torch.no_grad()
def bench_shape(N: int, K: int, batches: list[int], dtype: torch.dtype, device: torch.device, group_size: int) -> list[dict]:
    """Time the peer and both quantized layers at every batch size for one (N, K) weight."""
    torch.manual_seed(0)
    dense = nn.Linear(K, N, bias=False, device=device, dtype=dtype)
    layers = {"int8": Int8Linear.from_linear(dense), f"int4-g{group_size}": Int4Linear.from_linear(dense, group_size)}
    weight_bytes = {"fp": dense.weight.numel() * dense.weight.element_size()}
    weight_bytes.update({name: layer.nbytes() for name, layer in layers.items()})
    rows = []
    for M in batches:
        x = torch.randn(M, K, device=device, dtype=dtype)
        w = dense.weight
        peer_ms = time_fn(lambda: torch.matmul(x, w.t()), device=device)
        row = {"N": N, "K": K, "M": M, "peer_ms": peer_ms, "peer_GBps": weight_bytes["fp"] / peer_ms / 1e6}
        for name, layer in layers.items():
            ms = time_fn(lambda layer=layer: layer(x), device=device)
            row[f"{name}_ms"] = ms
            row[f"{name}_speedup"] = peer_ms / ms
            row[f"{name}_GBps"] = weight_bytes[name] / ms / 1e6
        rows.append(row)
        print(
            f"N={N:>6} K={K:>6} M={M:>3}  peer {peer_ms:8.3f} ms  "
            + "  ".join(f"{n} {row[f'{n}_ms']:8.3f} ms ({row[f'{n}_speedup']:.2f}x)" for n in layers),
            flush=True,
        )
    return rows


def plot(rows: list[dict], names: list[str], title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({(r["N"], r["K"]) for r in rows})
    fig, axes = plt.subplots(1, len(shapes), figsize=(4.5 * len(shapes), 3.6), squeeze=False)
    for ax, (N, K) in zip(axes[0], shapes):
        sub = [r for r in rows if (r["N"], r["K"]) == (N, K)]
        for name in names:
            ax.plot([r["M"] for r in sub], [r[f"{name}_speedup"] for r in sub], marker="o", label=name)
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set(xscale="log", xlabel="batch rows M", ylabel="speedup vs fp matmul", title=f"N={N}, K={K}")
        ax.legend()
    fig.suptitle(title)
    return fig


def main(argv: list[str] | None = None) -> None:
    parser = make_parser("quant", __doc__.splitlines()[0])
    parser.add_argument("--sizes", default=None, help=f"NxK weights (default GPU {GPU_SIZES}; CPU {CPU_SIZES})")
    parser.add_argument("--batches", default="1,2,4,8,16", help="rows M of x (tokens per step)")
    parser.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"],
                        help="activation/peer dtype (default fp16 on GPU, fp32 on CPU)")
    parser.add_argument("--group-size", type=int, default=128)
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    sizes = parse_sizes(args.sizes or (GPU_SIZES if device.type == "cuda" else CPU_SIZES))
    batches = [int(b) for b in args.batches.split(",")]
    rows = [row for N, K in sizes for row in bench_shape(N, K, batches, dtype, device, args.group_size)]
    names = ["int8", f"int4-g{args.group_size}"]
    path = "Triton dequant kernels" if device.type == "cuda" else "PyTorch reference (dequantize + matmul)"
    results = {"dtype": str(dtype), "quantized_path": path, "group_size": args.group_size, "rows": rows}
    fig = plot(rows, names, f"weight-only matmul vs {dtype} torch.matmul on {device_name(device)} ({path})")
    for p in write_results("quant", results, fig, args.out, device):
        print(f"wrote {p}")
