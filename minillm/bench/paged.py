"""Benchmark: paged decode attention against contiguous SDPA decode over the same K/V, measured in the same run.

``python -m minillm.bench paged`` builds, for each context length S, one batch of B sequences whose K/V exist twice
with identical contents: contiguous ``(B, Hkv, S, D)`` tensors and a paged pool ``(NB, BS, Hkv, D)`` whose blocks are
shuffled (block tables point all over the pool, as after hours of serving). It times one decode step (one query token
per sequence) with:
- ``paged``: minillm's Triton kernel (`minillm.attention.paged.paged_decode_attention`, split-K picked by the
  launcher), and ``paged_nosplit`` (one program per sequence and KV head) to show what split-K buys, on a GPU;
- ``paged_ref``: the gather-then-attend torch reference (`paged_decode_attention_ref`), where it fits;
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` on the contiguous tensors (with ``enable_gqa``),
  the peer: what a contiguous cache would cost.
Decode attention is memory-bound, so it reports achieved bandwidth, GB/s = bytes of K and V read / time, with
bytes = 2 (K and V) * B * S * Hkv * D * bytes per element (q and o are B * H * D each: negligible), the ratio to SDPA,
and on a GPU the fraction of the device's peak bandwidth (datasheet, `minillm.bench.roofline.peak_specs`, else a
measured copy). The target on an H100: at long contexts >= 80% of peak and <= 1.1x SDPA's time.
Notebook 04_paged_attention shows the plot.
"""

import torch
import torch.nn.functional as F

from minillm._triton import triton_available
from minillm.attention.paged import paged_decode_attention, paged_decode_attention_ref
from minillm.bench.common import environment_info, make_parser, time_fn, write_results
from minillm.bench.roofline import measure_copy_bandwidth, peak_specs

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def kv_bytes(B: int, S: int, Hkv: int, D: int, dtype: torch.dtype) -> int:
    """Bytes of K and V a decode step reads: 2 * B * S * Hkv * D * element size."""
    return 2 * B * S * Hkv * D * torch.empty((), dtype=dtype).element_size()


def make_inputs(B: int, S: int, H: int, Hkv: int, D: int, BS: int, dtype: torch.dtype, device: torch.device):
    """q (B, H, D); contiguous k, v (B, Hkv, S, D); the same K/V in a shuffled paged pool with its block tables."""
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(B, H, D, device=device, dtype=dtype, generator=g)
    k, v = (torch.randn(B, Hkv, S, D, device=device, dtype=dtype, generator=g) for _ in range(2))
    num_blocks = -(-S // BS)
    pad = num_blocks * BS - S
    perm = torch.randperm(B * num_blocks, device=device, generator=g)
    block_tables = perm.view(B, num_blocks).to(torch.int32)  # sequence b's j-th block lives at perm[b * nb + j]

    def to_pool(x):  # (B, Hkv, S, D) -> (NB, BS, Hkv, D) with blocks placed by perm
        x = F.pad(x, (0, 0, 0, pad)).view(B, Hkv, num_blocks, BS, D).permute(0, 2, 3, 1, 4)
        pool = torch.empty(B * num_blocks, BS, Hkv, D, device=device, dtype=dtype)
        pool[perm] = x.reshape(B * num_blocks, BS, Hkv, D)
        return pool

    context_lens = torch.full((B,), S, device=device, dtype=torch.int32)
    return q, k, v, to_pool(k), to_pool(v), block_tables, context_lens


def run(device, dtype, context_lens, batch, H, Hkv, D, BS, max_bytes) -> list[dict]:
    on_gpu = device.type == "cuda"
    rows = []
    for S in context_lens:
        B = max(1, min(batch, max_bytes // kv_bytes(1, S, Hkv, D, dtype)))  # keep K + V under max_bytes
        q, k, v, k_cache, v_cache, tables, lens = make_inputs(B, S, H, Hkv, D, BS, dtype, device)
        sdpa_out = F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=H != Hkv)[:, :, 0]
        impls = {"sdpa": lambda: F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=H != Hkv)}
        if on_gpu and triton_available(device):  # the CPU interpreter is far too slow to time
            impls["paged"] = lambda: paged_decode_attention(q, k_cache, v_cache, tables, lens, max_context_len=S)
            impls["paged_nosplit"] = lambda: paged_decode_attention(
                q, k_cache, v_cache, tables, lens, max_context_len=S, num_splits=1
            )
        if kv_bytes(B, S, H, D, torch.float32) <= (1 << 30):  # the reference's fp32 GQA copies must fit in 1 GiB
            impls["paged_ref"] = lambda: paged_decode_attention_ref(q, k_cache, v_cache, tables, lens)
        nbytes = kv_bytes(B, S, Hkv, D, dtype)
        times = {}
        for name, fn in impls.items():
            if name != "sdpa":  # same K/V, same answer: a benchmark of a wrong kernel is worthless
                torch.testing.assert_close(fn(), sdpa_out, atol=2e-2, rtol=2e-2)
            times[name] = time_fn(fn, device=device)
        for name, ms in times.items():
            rows.append(dict(
                impl=name, S=S, B=B, H=H, Hkv=Hkv, D=D, BS=BS, ms=round(ms, 5),
                gbps=round(nbytes / (ms * 1e-3) / 1e9, 2), time_ratio_to_sdpa=round(ms / times["sdpa"], 3),
            ))
        print(f"S={S:6d} B={B:3d} " + "  ".join(
            f"{r['impl']}: {r['ms']:.4g} ms {r['gbps']:.4g} GB/s ({r['time_ratio_to_sdpa']:.2f}x sdpa time)"
            for r in rows[-len(times):]
        ))
        del q, k, v, k_cache, v_cache
    return rows


def plot(rows: list[dict], peak_gbps: float | None, title: str):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for impl in sorted({r["impl"] for r in rows}):
        pts = [(r["S"], r["gbps"]) for r in rows if r["impl"] == impl]
        ax.plot(*zip(*pts), marker="o", label=impl)
    if peak_gbps:
        ax.axhline(peak_gbps, color="gray", linestyle="--", label=f"peak {peak_gbps:.0f} GB/s")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length S (tokens per sequence)")
    ax.set_ylabel("K+V read, GB/s")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> None:
    parser = make_parser("paged", "paged decode attention (Triton) vs contiguous SDPA decode, same K/V")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--context-lens", type=int, nargs="+", default=None)
    parser.add_argument("--batch", type=int, default=None, help="sequences per decode step (capped by --max-gb)")
    parser.add_argument("--heads", type=int, nargs=2, default=None, metavar=("H", "HKV"))
    parser.add_argument("--head-dim", type=int, default=None)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--max-gb", type=float, default=None, help="cap on K + V bytes per case")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    dtype = DTYPES[args.dtype or ("bf16" if on_gpu else "fp32")]
    context_lens = args.context_lens or ([256, 1024, 4096, 16384, 65536] if on_gpu else [64, 256, 1024])
    batch = args.batch or (16 if on_gpu else 4)
    H, Hkv = args.heads or ((32, 8) if on_gpu else (9, 3))  # Llama-3-8B's heads on GPU, SmolLM2-135M's on CPU
    D = args.head_dim or (128 if on_gpu else 64)
    max_bytes = int((args.max_gb or (4.0 if on_gpu else 0.25)) * 1e9)

    env = environment_info(device)
    peak = peak_specs(env["device"]) if on_gpu else None
    if on_gpu:
        bandwidth = peak["bandwidth"] if peak else measure_copy_bandwidth(device, 1 << 30)
        source = peak["source"] if peak else "measured device-to-device copy"
    else:
        bandwidth, source = None, None
    print(f"paged decode benchmark on {env['device']}, {dtype}, H={H} Hkv={Hkv} D={D} BS={args.block_size}")
    rows = run(device, dtype, context_lens, batch, H, Hkv, D, args.block_size, max_bytes)
    if bandwidth:
        for r in rows:
            r["fraction_of_peak_bandwidth"] = round(r["gbps"] * 1e9 / bandwidth, 3)
        print(f"peak bandwidth {bandwidth / 1e9:.0f} GB/s ({source})")
        for impl in ("paged", "sdpa"):
            longest = max((r for r in rows if r["impl"] == impl), key=lambda r: r["S"], default=None)
            if longest:
                print(f"{impl} at S={longest['S']}: {longest['fraction_of_peak_bandwidth']:.0%} of peak, "
                      f"{longest['time_ratio_to_sdpa']:.2f}x sdpa time")
    results = dict(
        dtype=str(dtype), heads=H, kv_heads=Hkv, head_dim=D, block_size=args.block_size,
        bytes_formula="2 (K and V) * B * S * Hkv * D * bytes per element", gbps_formula="bytes / seconds / 1e9",
        peak_bandwidth_bytes_per_s=bandwidth, peak_bandwidth_source=source, rows=rows,
    )
    title = f"decode attention, {dtype}, H={H} Hkv={Hkv} D={D}, {env['device']}"
    fig = None if args.no_plot else plot(rows, bandwidth / 1e9 if bandwidth else None, title)
    for path in write_results("paged", results, fig=fig, out_dir=args.out, device=device):
        print(f"wrote {path}")
