"""Benchmark: causal attention forward, minillm's kernels against PyTorch SDPA, measured in the same run.

``python -m minillm.bench attention`` times, for each sequence length T (T == S) and head dim D:
- ``flash``: minillm's Triton FlashAttention-2 kernel (`minillm.attention.flash_attention`), on a GPU;
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)``, the peer (on an H100
  it dispatches to FlashAttention-2 or cuDNN kernels);
- ``reference``: the materialized-scores oracle (`attention_ref`), where its T x T matrix fits (CPU, and GPU up to 4k);
- ``online``: the tiled online-softmax torch loop (CPU only: it is a teaching loop, not a fast path).
It reports TFLOP/s and the ratio to SDPA. The GPU default is bf16, T = 512..16k, D = 64 and 128 (the target:
flash >= 0.9x SDPA at T >= 4k on an H100); the CPU default is small fp32 shapes and is informational only.
Notebook 02_attention shows the plot.
"""

import torch
import torch.nn.functional as F

from minillm._triton import triton_available
from minillm.attention import attention_ref, flash_attention, online_attention
from minillm.bench.common import environment_info, make_parser, time_fn, write_results

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def causal_flops(B: int, H: int, T: int, D: int) -> float:
    """Forward FLOPs of causal attention with T == S.

    Two matmuls (scores = q kᵀ, then probs @ v), each 2 * B * H * T * S * D multiply-adds counted as FLOPs,
    so 4 * B * H * T * S * D; the causal mask leaves half of the (T, S) pairs, so divide by 2. Softmax is ignored.
    """
    return 4 * B * H * T * T * D / 2


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])


def run(
    device: torch.device,
    dtype: torch.dtype,
    seq_lens: list[int],
    head_dims: list[int],
    tokens_per_batch: int,
    num_heads: int,
) -> list[dict]:
    """Time every implementation at every (D, T); one row per (D, T, implementation)."""
    on_gpu = device.type == "cuda"
    impls = {"sdpa": sdpa}
    if triton_available(device) and on_gpu:  # the CPU interpreter is far too slow to time
        impls["flash"] = lambda q, k, v: flash_attention(q, k, v)
    if not on_gpu:
        impls["online"] = lambda q, k, v: online_attention(q, k, v, block_m=64, block_n=64)
    rows = []
    for D in head_dims:
        for T in seq_lens:
            B = max(1, tokens_per_batch // T)  # about the same tokens per step at every T
            g = torch.Generator(device=device).manual_seed(0)
            q, k, v = (torch.randn(B, num_heads, T, D, device=device, dtype=dtype, generator=g) for _ in range(3))
            todo = dict(impls)
            if B * num_heads * T * T * 4 <= (2 << 30):  # the fp32 score matrix must fit in 2 GiB
                todo["reference"] = lambda q, k, v: attention_ref(q, k, v)
            flops = causal_flops(B, num_heads, T, D)
            times = {name: time_fn(lambda fn=fn: fn(q, k, v), device=device) for name, fn in todo.items()}
            for name, ms in times.items():
                rows.append(dict(
                    impl=name, D=D, T=T, B=B, H=num_heads, dtype=str(dtype).removeprefix("torch."),
                    ms=round(ms, 4), tflops=round(flops / (ms * 1e-3) / 1e12, 4),
                    ratio_to_sdpa=round(times["sdpa"] / ms, 3),
                ))
            print(f"D={D:4d} T={T:6d} B={B:3d} " + "  ".join(
                f"{r['impl']}: {r['tflops']:.3g} TFLOP/s ({r['ratio_to_sdpa']:.2f}x sdpa)"
                for r in rows[-len(times):]
            ))
            del q, k, v
    return rows


def plot(rows: list[dict], title: str):
    import matplotlib.pyplot as plt

    head_dims = sorted({r["D"] for r in rows})
    fig, axes = plt.subplots(1, len(head_dims), figsize=(5.5 * len(head_dims), 4), squeeze=False)
    for ax, D in zip(axes[0], head_dims):
        for impl in sorted({r["impl"] for r in rows}):
            pts = [(r["T"], r["tflops"]) for r in rows if r["D"] == D and r["impl"] == impl]
            ax.plot(*zip(*pts), marker="o", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length T (= S)")
        ax.set_ylabel("TFLOP/s (causal forward)")
        ax.set_title(f"D = {D}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> None:
    parser = make_parser("attention", "causal attention forward: minillm flash kernel vs torch SDPA")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=None)
    parser.add_argument("--head-dims", type=int, nargs="+", default=None)
    parser.add_argument("--num-heads", type=int, default=None)
    parser.add_argument("--tokens-per-batch", type=int, default=None, help="B = max(1, this // T)")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    dtype = DTYPES[args.dtype or ("bf16" if on_gpu else "fp32")]
    seq_lens = args.seq_lens or ([512, 1024, 2048, 4096, 8192, 16384] if on_gpu else [64, 128, 256, 512])
    head_dims = args.head_dims or ([64, 128] if on_gpu else [64])
    num_heads = args.num_heads or (16 if on_gpu else 4)
    tokens = args.tokens_per_batch or (16384 if on_gpu else 512)

    env = environment_info(device)
    print(f"attention benchmark on {env['device']}, {dtype}, H={num_heads}, about {tokens} tokens per batch")
    rows = run(device, dtype, seq_lens, head_dims, tokens, num_heads)
    results = dict(
        dtype=str(dtype), num_heads=num_heads, tokens_per_batch=tokens,
        flops_formula="4 * B * H * T * S * D / 2 (causal forward, T == S)", rows=rows,
    )
    fig = None if args.no_plot else plot(rows, f"causal attention forward, {dtype}, {env['device']}")
    for path in write_results("attention", results, fig=fig, out_dir=args.out, device=device):
        print(f"wrote {path}")
