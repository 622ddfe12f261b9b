"""Benchmark: what pruning buys in speed, 2:4 sparse GEMMs and structurally pruned decoding, each against dense.

``python -m minillm.bench prune`` measures, in one run on one device:
- ``linear``: ``F.linear(x, W)`` at prefill shapes (M tokens x K inputs -> N outputs) with W dense against the same
  W pruned 2:4 and compressed by ``torch.sparse.to_sparse_semi_structured`` (cuSPARSELt/CUTLASS sparse tensor cores),
  fp16. Reported in dense-equivalent TFLOP/s, ``2 * M * N * K / time``, and as the ratio dense time / sparse time
  (the target: >= 1.2x at M >= 2048 on an H100). On CPU there are no sparse tensor cores: the row times the
  dense matmul of the 2:4-zeroed weight instead, to show that zeros alone are not faster (informational).
- ``decode``: greedy decoding tokens/s of a random-weight Llama (speed depends on shapes only) before and after
  structured pruning (``prune_heads`` by KV groups, ``prune_mlp_channels``), with minillm's contiguous KV cache.
  GPU default: a Llama-2-7B-shaped model cut to 8 layers, fp16; CPU default: SmolLM2-135M-shaped, 4 layers, fp32.
Notebook 07 (``07_pruning``) shows the plot.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from minillm.attention.backends import ContiguousAttention
from minillm.bench.common import environment_info, make_parser, time_fn, write_results
from minillm.config import ModelConfig
from minillm.kvcache.contiguous import ContiguousBatch, ContiguousKVCache
from minillm.model import Transformer
from minillm.prune import count_parameters, nm_mask, prune_heads, prune_mlp_channels
from minillm.prune.semistructured import semi_structured_supported, to_sparse_24

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
GPU_LINEAR_SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192)]  # (K, N) of Llama-class layers
CPU_LINEAR_SHAPES = [(512, 512), (1024, 1024)]


def run_linear(
    device: torch.device, dtype: torch.dtype, tokens: list[int], shapes: list[tuple[int, int]]
) -> list[dict]:
    """Dense vs 2:4 linear at every (M, K, N); one row per shape."""
    rows = []
    for M in tokens:
        for K, N in shapes:
            g = torch.Generator(device=device).manual_seed(0)
            x = torch.randn(M, K, device=device, dtype=dtype, generator=g)  # (M, K)
            weight = torch.randn(N, K, device=device, dtype=dtype, generator=g)  # (N, K)
            weight = weight * nm_mask(weight.abs(), 2, 4)  # magnitude 2:4 pruning
            if semi_structured_supported(weight):
                sparse_weight, impl = to_sparse_24(weight), "sparse_24"
            else:
                sparse_weight, impl = weight, "dense_24_zeros"
            error = (F.linear(x, sparse_weight).float() - F.linear(x, weight).float()).abs().max().item()
            dense_ms = time_fn(lambda: F.linear(x, weight), device=device)
            sparse_ms = time_fn(lambda: F.linear(x, sparse_weight), device=device)
            flops = 2 * M * N * K
            rows.append(dict(
                M=M, K=K, N=N, dtype=str(dtype).removeprefix("torch."), impl=impl,
                dense_ms=round(dense_ms, 4), sparse_ms=round(sparse_ms, 4),
                dense_tflops=round(flops / (dense_ms * 1e-3) / 1e12, 3),
                sparse_tflops=round(flops / (sparse_ms * 1e-3) / 1e12, 3),
                speedup=round(dense_ms / sparse_ms, 3), max_abs_error=error,
            ))
            r = rows[-1]
            print(f"linear M={M:5d} K={K:5d} N={N:5d}  dense {r['dense_tflops']:.3g} TFLOP/s  {impl} "
                  f"{r['sparse_tflops']:.3g} TFLOP/s  speedup {r['speedup']:.2f}x  max|err| {error:.2g}")
            del x, weight, sparse_weight
    return rows


@torch.no_grad()
def greedy_generate(model: Transformer, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """prompt (B, T) -> the `new_tokens` greedy continuations (B, new_tokens), one forward per token, through
    minillm's contiguous KV cache (chapter 03) sized from ``model.config``, so a pruned config sizes it too."""
    B, T = prompt.shape
    dtype = next(model.parameters()).dtype
    cache = ContiguousKVCache.for_model(model.config, B, T + new_tokens, dtype, prompt.device)
    batch = ContiguousBatch.prefill([T] * B, prompt.device)
    attention = ContiguousAttention(cache)
    next_ids = model(prompt, batch.positions, attention, batch)[:, -1].argmax(-1, keepdim=True)  # (B, 1)
    out = [next_ids]
    for _ in range(new_tokens - 1):
        batch = batch.next_decode()
        next_ids = model(next_ids, batch.positions, attention, batch)[:, -1].argmax(-1, keepdim=True)
        out.append(next_ids)
    return torch.cat(out, dim=1)


def run_decode(
    device: torch.device, dtype: torch.dtype, config: ModelConfig, batch_size: int, prompt_len: int,
    new_tokens: int, head_fraction: float, mlp_fraction: float, iters: int,
) -> list[dict]:
    """Decode tokens/s of the dense model and of its structurally pruned variants; one row per variant."""
    torch.manual_seed(0)
    dense = Transformer(config).to(device=device, dtype=dtype).eval()
    prompt = torch.randint(0, config.vocab_size, (batch_size, prompt_len), device=device)
    variants = {
        "dense": lambda m: None,
        f"heads -{head_fraction:.0%} (KV groups)": lambda m: prune_heads(m, head_fraction, score="magnitude"),
        f"MLP -{mlp_fraction:.0%}": lambda m: prune_mlp_channels(m, mlp_fraction, score="magnitude"),
        "heads + MLP": lambda m: (prune_heads(m, head_fraction, score="magnitude"),
                                  prune_mlp_channels(m, mlp_fraction, score="magnitude")),
    }
    rows = []
    for name, prune in variants.items():
        model = copy.deepcopy(dense)
        prune(model)
        # Decode time = whole generation minus the prefill, so the prompt does not count.
        total_ms = time_fn(lambda: greedy_generate(model, prompt, new_tokens), warmup=1, iters=iters, device=device)
        prefill_ms = time_fn(lambda: greedy_generate(model, prompt, 1), warmup=1, iters=iters, device=device)
        decode_s = max(total_ms - prefill_ms, 1e-6) * 1e-3
        rows.append(dict(
            variant=name, num_params=count_parameters(model), num_heads=model.config.num_heads,
            num_kv_heads=model.config.num_kv_heads, intermediate_size=model.config.intermediate_size,
            batch_size=batch_size, new_tokens=new_tokens,
            tokens_per_s=round(batch_size * (new_tokens - 1) / decode_s, 2),
        ))
        del model
    for r in rows:
        r["speedup"] = round(r["tokens_per_s"] / rows[0]["tokens_per_s"], 3)
        r["params_ratio"] = round(r["num_params"] / rows[0]["num_params"], 3)
        print(f"decode {r['variant']:<24} {r['num_params'] / 1e6:8.1f} M params ({r['params_ratio']:.2f}x)  "
              f"{r['tokens_per_s']:9.1f} tok/s ({r['speedup']:.2f}x dense)")
    return rows


def plot(linear_rows: list[dict], decode_rows: list[dict], title: str):
    import matplotlib.pyplot as plt

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 4))
    labels = [f"{r['M']}x{r['K']}x{r['N']}" for r in linear_rows]
    ax0.bar(range(len(linear_rows)), [r["speedup"] for r in linear_rows])
    ax0.axhline(1.0, color="gray", linestyle="--")
    ax0.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax0.set_ylabel(f"dense time / {linear_rows[0]['impl']} time")
    ax0.set_title("2:4 linear vs dense (M x K x N)")
    ax1.bar(range(len(decode_rows)), [r["tokens_per_s"] for r in decode_rows])
    ax1.set_xticks(range(len(decode_rows)), [r["variant"] for r in decode_rows], rotation=20, ha="right")
    ax1.set_ylabel("decode tokens/s")
    ax1.set_title("structured pruning, greedy decode")
    for ax in (ax0, ax1):
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> None:
    parser = make_parser("prune", "2:4 sparse linear vs dense; decode speed of structurally pruned models")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: fp16 on GPU, fp32 on CPU")
    parser.add_argument("--tokens", type=int, nargs="+", default=None, help="M, tokens per linear call")
    parser.add_argument("--decode-layers", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--head-fraction", type=float, default=0.5, help="fraction of KV groups removed")
    parser.add_argument("--mlp-fraction", type=float, default=0.5, help="fraction of MLP channels removed")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    dtype = DTYPES[args.dtype or ("fp16" if on_gpu else "fp32")]
    tokens = args.tokens or ([2048, 4096, 8192] if on_gpu else [256])
    shapes = GPU_LINEAR_SHAPES if on_gpu else CPU_LINEAR_SHAPES
    if on_gpu:  # Llama-2-7B widths with grouped-query attention (Hkv = 8), fewer layers to keep the run short
        config = ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_heads=32,
                             num_kv_heads=8, num_layers=args.decode_layers or 8, name="llama-7b-shaped")
    else:  # SmolLM2-135M widths
        config = ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_heads=9, num_kv_heads=3,
                             num_layers=args.decode_layers or 4, tie_word_embeddings=True, name="smollm2-135m-shaped")
    batch_size = args.batch_size or (8 if on_gpu else 1)
    new_tokens = args.new_tokens or (64 if on_gpu else 16)

    env = environment_info(device)
    print(f"prune benchmark on {env['device']}, {dtype}")
    linear_rows = run_linear(device, dtype, tokens, shapes)
    decode_rows = run_decode(device, dtype, config, batch_size, prompt_len=16, new_tokens=new_tokens,
                             head_fraction=args.head_fraction, mlp_fraction=args.mlp_fraction,
                             iters=10 if on_gpu else 3)
    results = dict(
        dtype=str(dtype), flops_formula="2 * M * N * K (dense-equivalent, also for the 2:4 matmul)",
        linear=linear_rows, decode_config=config.to_dict(), decode=decode_rows,
    )
    fig = None if args.no_plot else plot(linear_rows, decode_rows, f"pruning speed, {dtype}, {env['device']}")
    for path in write_results("prune", results, fig=fig, out_dir=args.out, device=device):
        print(f"wrote {path}")
