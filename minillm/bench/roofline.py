"""Roofline: this device's measured FLOP/s and memory bandwidth, and the best decode speed they allow.

In doing so, you will learn about:
  * the roofline model (Williams, Waterman & Patterson, "Roofline: an insightful visual performance model", CACM
    2009): a kernel doing F FLOPs while moving M bytes takes at least max(F / peak_flops, M / bandwidth), so its
    speed is bounded by min(peak_flops, bandwidth * F / M), where F / M is its arithmetic intensity;
  * why decoding one token is memory bound: every weight is read once to do 2 FLOPs with it (one multiply-add),
    an intensity of 2 / bytes_per_weight FLOP/byte (1 in bf16), far left of an H100's ridge point of ~300;
  * the decode roofline: best tokens/s = bandwidth / bytes read per token (the weights, plus the KV cache read
    by attention), a bound no engine beats; a batch of B sequences shares one weight read, so the bound grows
    with B until the compute roof or the KV cache (which each sequence reads for itself) stops it;
  * measuring a machine honestly: sizes big enough to reach the peak (a 512 x 512 fp32 matmul measures threading
    overhead, not a CPU's FMA units; a buffer inside the caches measures the caches), the median of repeats, the
    best of interleaved rounds on a shared machine, and a cross-check against what the model's own forward reads.
Notebook 00 (``00_setup_and_roofline``) measures these numbers here and plots the model's decode points.

``python -m minillm.bench roofline`` measures matmul FLOP/s and copy and read bandwidth (n = 2048 and 512 MiB on a
CPU, n = 8192 and 1 GiB on a GPU), times the default model's decode step, computes its decode bound from the
measurements and from the datasheet, and writes JSON + PNG.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from minillm.bench.common import device_name, make_parser, time_fn, write_results
from minillm.config import ModelConfig

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# Datasheet peaks: dense (no 2:4 sparsity) 16-bit tensor-core FLOP/s and memory bandwidth, in FLOP/s and bytes/s.
# Matched against torch.cuda.get_device_name() in this order (first match wins, so "H100 PCIe" before "H100").
PEAK_SPECS: list[tuple[str, dict]] = [
    (r"H200", dict(name="NVIDIA H200 SXM", flops=989e12, bandwidth=4.8e12,
                   source="NVIDIA H200 datasheet: 1,979 TFLOP/s bf16 with sparsity -> 989 dense; 4.8 TB/s HBM3e")),
    (r"H100.*PCIe", dict(name="NVIDIA H100 PCIe", flops=756e12, bandwidth=2.0e12,
                         source="NVIDIA H100 datasheet (PCIe): 1,513 TFLOP/s bf16 sparse -> 756 dense; 2.0 TB/s")),
    (r"H100", dict(name="NVIDIA H100 SXM", flops=989e12, bandwidth=3.35e12,
                   source="NVIDIA H100 datasheet (SXM): 1,979 TFLOP/s bf16 sparse -> 989 dense; 3.35 TB/s HBM3")),
    (r"A100.*80GB", dict(name="NVIDIA A100 80GB", flops=312e12, bandwidth=2.0e12,
                         source="NVIDIA A100 datasheet: 312 TFLOP/s bf16 dense; 80GB SXM 2,039 GB/s")),
    (r"A100", dict(name="NVIDIA A100 40GB", flops=312e12, bandwidth=1.555e12,
                   source="NVIDIA A100 datasheet: 312 TFLOP/s bf16 dense; 40GB 1,555 GB/s")),
    (r"L40S", dict(name="NVIDIA L40S", flops=362e12, bandwidth=0.864e12,
                   source="NVIDIA L40S datasheet: 733 TFLOP/s bf16 sparse -> 362 dense; 864 GB/s")),
    (r"\bL4\b", dict(name="NVIDIA L4", flops=121e12, bandwidth=0.3e12,
                     source="NVIDIA L4 datasheet: 242 TFLOP/s bf16 sparse -> 121 dense; 300 GB/s")),
    (r"A10G", dict(name="NVIDIA A10G", flops=70e12, bandwidth=0.6e12,
                   source="AWS G5 (A10G): ~70 TFLOP/s bf16 dense tensor core; 600 GB/s")),
    (r"\bA10\b", dict(name="NVIDIA A10", flops=125e12, bandwidth=0.6e12,
                      source="NVIDIA A10 datasheet: 125 TFLOP/s bf16 dense; 600 GB/s")),
    (r"\bT4\b", dict(name="NVIDIA T4", flops=65e12, bandwidth=0.32e12,
                     source="NVIDIA T4 datasheet: 65 TFLOP/s fp16 (mixed precision, no bf16); 320 GB/s")),
    (r"V100", dict(name="NVIDIA V100", flops=125e12, bandwidth=0.9e12,
                   source="NVIDIA V100 datasheet (SXM2): 125 TFLOP/s fp16 tensor core; 900 GB/s")),
]


def peak_specs(name: str) -> dict | None:
    """Datasheet peak FLOP/s (dense 16-bit tensor cores) and bandwidth (bytes/s) of a known GPU, or None.

    `name` is what ``torch.cuda.get_device_name()`` returns, e.g. "NVIDIA H100 80GB HBM3". The dict has keys
    name, flops, bandwidth, source. CPUs and unknown GPUs give None: measure them instead.
    """
    for pattern, spec in PEAK_SPECS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return dict(spec)
    return None


def measure_matmul_flops(
    device: torch.device | str, dtype: torch.dtype, size: int, warmup: int = 3, iters: int = 10
) -> float:
    """Measured FLOP/s of a (size x size) @ (size x size) matmul: 2 * size^3 FLOPs (a multiply and an add each).

    A big square matmul is compute bound (intensity ~size/3 FLOP/byte in bf16), so this approaches the device's
    peak once `size` is large: on a GPU use size >= 4096, on a CPU >= 2048. At small sizes the fixed costs of a
    call (waking threads, packing the operands) weigh as much as the arithmetic, and the result is not the peak.
    """
    device = torch.device(device)
    if size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=g).to(device, dtype)
    b = torch.randn(size, size, generator=g).to(device, dtype)
    ms = time_fn(lambda: torch.mm(a, b), warmup=warmup, iters=iters, device=device)
    return 2 * size**3 / (ms * 1e-3)


def _buffer(device: torch.device, nbytes: int) -> torch.Tensor:
    if nbytes < 1024:
        raise ValueError(f"nbytes must be at least 1024, got {nbytes!r}")
    return torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)


def measure_copy_bandwidth(device: torch.device | str, nbytes: int, warmup: int = 3, iters: int = 10) -> float:
    """Measured memory bandwidth in bytes/s of copying an `nbytes` buffer into another one.

    A copy reads nbytes and writes nbytes, so bandwidth = 2 * nbytes / time (the convention of STREAM's "copy";
    a CPU usually also reads each destination line before writing it, traffic this formula does not count).
    The buffer must be much larger than the caches (GPU L2 is 50 MB on an H100, a server CPU's L3 tens of MB) to
    measure DRAM/HBM. torch splits a big copy across all its threads.
    """
    device = torch.device(device)
    src = _buffer(device, nbytes)
    dst = torch.empty_like(src)
    ms = time_fn(lambda: dst.copy_(src), warmup=warmup, iters=iters, device=device)
    return 2 * src.numel() * 4 / (ms * 1e-3)


def measure_read_bandwidth(device: torch.device | str, nbytes: int, warmup: int = 3, iters: int = 10) -> float:
    """Measured memory bandwidth in bytes/s of reading an `nbytes` buffer: bandwidth = nbytes / time of its sum.

    A sum reads every byte once and writes one number, like a decode step, which reads every weight and writes a
    few small activations; so this is the ceiling decode runs against. torch splits a big sum across its threads.
    """
    device = torch.device(device)
    src = _buffer(device, nbytes)
    ms = time_fn(lambda: src.sum(), warmup=warmup, iters=iters, device=device)
    return src.numel() * 4 / (ms * 1e-3)


def measure_decode_tokens_per_s(model: torch.nn.Module, batch_size: int = 1, warmup: int = 1, iters: int = 5) -> float:
    """Measured tokens/s of one decode step of `batch_size` sequences: batch_size / median time of a forward.

    The step is ``model(input_ids)`` with input_ids (B, 1) and no KV cache: one new token per sequence and no
    context, so it reads exactly the weights once (``decode_roofline(..., context_len=0)["weight_bytes"]``) and
    ``decode_achieved`` turns the result into bytes/s and FLOP/s. The engine's steps add the KV cache and the
    scheduler's bookkeeping; this is the model's own speed.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    device = next(model.parameters()).device
    input_ids = torch.zeros(batch_size, 1, dtype=torch.long, device=device)  # (B, T=1)
    with torch.inference_mode():
        ms = time_fn(lambda: model(input_ids), warmup=warmup, iters=iters, device=device)
    return batch_size / (ms * 1e-3)


def best_of_rounds(measures: dict[str, Callable[[], float]], rounds: int = 3) -> dict[str, float]:
    """Run every measure once per round, interleaved, and keep each one's best (largest) rate.

    On a shared machine other processes can only slow a measurement down, never speed it up, so the best round is
    the closest to what the hardware does; interleaving the measures means a busy spell hits all of them, not
    just the one that happened to run then. Each measure returns a rate (FLOP/s, bytes/s, tokens/s).
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds!r}")
    best: dict[str, float] = {}
    for _ in range(rounds):
        for name, measure in measures.items():
            best[name] = max(best.get(name, 0.0), measure())
    return best


def decode_bytes_table(config: ModelConfig, dtype: torch.dtype, context_len: int = 0) -> list[dict]:
    """What one decode step (one new token, batch 1) reads from memory, one row per component.

    Each row: component, params (weights read), bytes. Weights are read whole once per step, except the embedding
    table, of which only the new token's row is read (with tied embeddings the LM head still reads the whole
    matrix). Attention reads the cached keys and values of the `context_len` earlier tokens: 2 (K and V) * Hkv * D
    values per layer per token, stored in `dtype` like the weights.
    """
    if context_len < 0:
        raise ValueError(f"context_len must be >= 0, got {context_len!r}")
    nbytes = torch.tensor([], dtype=dtype).element_size()
    C, D, H, Hkv, L = config.hidden_size, config.head_dim, config.num_heads, config.num_kv_heads, config.num_layers
    qkv = C * (H + 2 * Hkv) * D + ((H + 2 * Hkv) * D if config.attention_bias else 0)
    rows = [
        ("embedding row", C),
        ("attention q, k, v, o", L * (qkv + H * D * C)),
        ("MLP gate, up, down", L * 3 * C * config.intermediate_size),
        ("RMSNorm weights", (2 * L + 1) * C),
        ("LM head" + (" (tied: the embedding matrix)" if config.tie_word_embeddings else ""), config.vocab_size * C),
        (f"KV cache ({context_len} tokens)", L * 2 * Hkv * D * context_len),
    ]
    return [dict(component=name, params=n, bytes=n * nbytes) for name, n in rows]


def decode_roofline(
    config: ModelConfig,
    dtype: torch.dtype,
    bandwidth: float,
    context_len: int = 0,
    batch_size: int = 1,
    peak_flops: float | None = None,
) -> dict:
    """The ceiling on decode speed: one step cannot beat bytes / bandwidth, nor FLOPs / peak_flops when given.

    Returns bytes_per_token (weights + KV cache, at batch 1), flops_per_token (2 per weight used, the embedding
    lookup excluded; attention's own FLOPs, 4 * H * D per cached token per layer, are left out), intensity
    (FLOP/byte of a step of `batch_size` sequences: they share one read of the weights, each reads its own KV
    cache), tokens_per_s (the best possible tokens/s summed over the batch) and bound ("memory" or "compute").

    Batching helps until one of two limits, which no batch size passes (``limit_tokens_per_s``, the smaller one):
    the compute roof, peak_flops / flops_per_token, and the KV cache, which the batch does not share:
    bandwidth / kv_bytes (so the intensity never exceeds ``max_intensity`` = flops_per_token / kv_bytes).
    Either is inf when it does not apply (no peak_flops given, no context).
    """
    if bandwidth <= 0 or batch_size < 1 or (peak_flops is not None and peak_flops <= 0):
        raise ValueError(
            f"need bandwidth > 0, batch_size >= 1 and peak_flops > 0 or None; "
            f"got {bandwidth!r}, {batch_size!r}, {peak_flops!r}"
        )
    table = decode_bytes_table(config, dtype, context_len)
    kv_bytes = table[-1]["bytes"]
    weight_bytes = sum(r["bytes"] for r in table[:-1])
    # A matrix-vector product does one multiply-add (2 FLOPs) per weight; the embedding row is a lookup.
    flops_per_token = 2 * sum(r["params"] for r in table[1:-1])
    step_bytes = weight_bytes + batch_size * kv_bytes
    memory_s = step_bytes / bandwidth
    compute_s = batch_size * flops_per_token / peak_flops if peak_flops else 0.0
    compute_limit = peak_flops / flops_per_token if peak_flops else float("inf")
    kv_limit = bandwidth / kv_bytes if kv_bytes else float("inf")
    return dict(
        bytes_per_token=weight_bytes + kv_bytes,
        weight_bytes=weight_bytes,
        kv_bytes=kv_bytes,
        flops_per_token=flops_per_token,
        intensity=batch_size * flops_per_token / step_bytes,
        tokens_per_s=batch_size / max(memory_s, compute_s),
        bound="memory" if memory_s >= compute_s else "compute",
        limit_tokens_per_s=min(compute_limit, kv_limit),
        max_intensity=flops_per_token / kv_bytes if kv_bytes else float("inf"),
    )


def decode_achieved(config: ModelConfig, dtype: torch.dtype, tokens_per_s: float, batch_size: int = 1) -> dict:
    """A measured decode speed (from ``measure_decode_tokens_per_s``) in hardware units.

    One step of `batch_size` sequences without a KV cache reads the weights once and does batch_size *
    flops_per_token FLOPs, so: bandwidth = weight_bytes * steps/s, flops = flops_per_token * tokens/s, and
    intensity = flops / bandwidth, the same as ``decode_roofline(..., context_len=0)`` gives for that batch.
    """
    if tokens_per_s <= 0 or batch_size < 1:
        raise ValueError(f"need tokens_per_s > 0 and batch_size >= 1, got {tokens_per_s!r}, {batch_size!r}")
    roof = decode_roofline(config, dtype, bandwidth=1.0, context_len=0, batch_size=batch_size)
    return dict(
        bandwidth=roof["weight_bytes"] * tokens_per_s / batch_size,
        flops=roof["flops_per_token"] * tokens_per_s,
        intensity=roof["intensity"],
    )


def plot_roofline(peak_flops: float, bandwidth: float, points: list[dict], title: str, ax=None):
    """Log-log roofline min(peak, bandwidth * I) with labelled points, each dict(label, intensity, flops).

    A point may also set marker and color, and hollow=True (a measurement, under the roof, rather than a bound on
    it). Draws into `ax` when given; returns the figure.
    """
    import matplotlib.pyplot as plt
    import numpy as np

    ridge = peak_flops / bandwidth
    lo = min([ridge / 1000] + [p["intensity"] / 4 for p in points])
    hi = max([ridge * 100] + [p["intensity"] * 4 for p in points])
    intensity = np.logspace(np.log10(lo), np.log10(hi), 200)
    if ax is None:
        fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.loglog(intensity, np.minimum(peak_flops, bandwidth * intensity), "k-", lw=2, label="roofline")
    ax.axvline(ridge, color="gray", ls=":", lw=1)
    ax.annotate(f"ridge {ridge:.3g} FLOP/byte", (ridge, peak_flops / 30), rotation=90, ha="right", fontsize=8)
    for p in points:
        color = p.get("color")
        ax.plot(p["intensity"], p["flops"], p.get("marker", "o"), ms=8, label=p["label"], color=color,
                mfc="none" if p.get("hollow") else color, mew=1.5)
    ax.set_xlabel("arithmetic intensity (FLOP / byte)")
    ax.set_ylabel("attainable FLOP/s")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(True, which="both", alpha=0.3)
    ax.figure.tight_layout()
    return ax.figure


def main(argv: list[str] | None = None) -> None:
    """Measure FLOP/s and bandwidth here, cross-check them with the model's decode step, write JSON + PNG."""
    from minillm.loading import load_model, resolve_device

    parser = make_parser("roofline", description=main.__doc__)
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--size", type=int, default=None, help="matmul size (default 8192 on GPU, 2048 on CPU)")
    parser.add_argument("--nbytes", type=int, default=None, help="buffer size (default 1 GiB on GPU, 512 MiB on CPU)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; each measure keeps its best")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--context-len", type=int, default=512, help="KV cache tokens read per step")
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    on_gpu = device.type == "cuda"
    dtype = DTYPES[args.dtype or ("bf16" if on_gpu else "fp32")]
    size = args.size or (8192 if on_gpu else 2048)
    nbytes = args.nbytes or ((1 << 30) if on_gpu else (512 << 20))
    model = load_model(args.model, device=device, dtype=dtype, progress=False)[0]
    config = model.config
    best = best_of_rounds({
        "flops": lambda: measure_matmul_flops(device, dtype, size, warmup=1, iters=5),
        "copy": lambda: measure_copy_bandwidth(device, nbytes, warmup=1, iters=5),
        "read": lambda: measure_read_bandwidth(device, nbytes, warmup=1, iters=5),
        "decode_batch1": lambda: measure_decode_tokens_per_s(model, 1),
    }, rounds=args.rounds)
    flops, bandwidth = best["flops"], max(best["copy"], best["read"])
    achieved = decode_achieved(config, dtype, best["decode_batch1"])
    name = device_name(device)
    spec = peak_specs(name) if on_gpu else None
    print(f"{name}: matmul {size}x{size} {dtype}: {flops / 1e12:.3f} TFLOP/s; {nbytes >> 20} MiB: copy "
          f"{best['copy'] / 1e9:.1f} GB/s, read {best['read'] / 1e9:.1f} GB/s; best of {args.rounds} rounds")
    print(f"  {config.name} batch-1 decode step (no cache): {best['decode_batch1']:.1f} tokens/s = "
          f"{achieved['bandwidth'] / 1e9:.1f} GB/s of weights read "
          f"({achieved['bandwidth'] / bandwidth:.0%} of the measured bandwidth)")

    results = dict(
        device=name, dtype=str(dtype).removeprefix("torch."), matmul_size=size, copy_nbytes=nbytes,
        rounds=args.rounds, measured_flops=flops, measured_copy_bandwidth=best["copy"],
        measured_read_bandwidth=best["read"], measured_bandwidth=bandwidth, peak=spec, model=config.name,
        decode_step_batch1=dict(tokens_per_s=best["decode_batch1"], **achieved),
        context_len=args.context_len, decode={},
    )
    points = []
    for batch_size in (1, 8, 64, 256):
        roof = decode_roofline(config, dtype, bandwidth, args.context_len, batch_size, peak_flops=flops)
        results["decode"][f"batch{batch_size}"] = roof
        points.append(dict(
            label=f"decode, batch {batch_size}: at most {roof['tokens_per_s']:.0f} tok/s ({roof['bound']} bound)",
            intensity=roof["intensity"], flops=min(flops, bandwidth * roof["intensity"]),
        ))
        print(f"  decode batch {batch_size:3d}: {roof['bytes_per_token'] / 1e6:.1f} MB/token, "
              f"{roof['intensity']:.2f} FLOP/byte, at most {roof['tokens_per_s']:.0f} tokens/s ({roof['bound']} bound)")
    points.append(dict(label=f"measured batch-1 step (no cache): {best['decode_batch1']:.0f} tok/s",
                       intensity=achieved["intensity"], flops=achieved["flops"], marker="s", hollow=True))
    if spec is not None:
        results["decode_datasheet_batch1"] = decode_roofline(
            config, dtype, spec["bandwidth"], args.context_len, peak_flops=spec["flops"]
        )
        print(f"  measured vs datasheet ({spec['name']}): {flops / spec['flops']:.0%} of peak FLOP/s, "
              f"{bandwidth / spec['bandwidth']:.0%} of peak bandwidth")
    title = f"{config.name} decode, {args.context_len} tokens of context, on {name} ({results['dtype']}, measured)"
    fig = plot_roofline(flops, bandwidth, points, title)
    for path in write_results("roofline", results, fig, args.out, device):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
