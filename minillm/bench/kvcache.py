"""KV cache: time per generated token with and without the cache as the context grows, as ratios in one run.

Without a cache, the token after a context of S tokens costs a forward pass over all S tokens (matmuls linear in S,
attention quadratic), so generating n tokens costs O(n^2); with a cache it is one forward pass over 1 token that
reads S cached keys and values (nearly constant until attention's reads dominate). Both are timed on the same model
at each S, and the ratio no-cache / cache is reported. Notebook 03 (``03_kv_cache``) plots these measurements.

Timed step, with S the context length:
  * no cache: ``model(ids[:, :S])``, the last position's logits give the next token (as ``RecomputeEngine`` does);
  * cache: a decode step at column S - 1 of a ``ContiguousKVCache`` already holding S - 1 tokens (rewound with
    ``truncate`` before each repetition, so every repetition does the same work).
Default sizes: on a CPU a small random model (weights do not change timings) and S up to 1024; on a GPU the
SmolLM2-135M shape and S up to 8192.
"""

from __future__ import annotations

import torch

from minillm.attention.backends import ContiguousAttention
from minillm.bench.common import device_name, make_parser, time_fn, write_results
from minillm.config import ModelConfig
from minillm.kvcache.contiguous import ContiguousBatch, ContiguousKVCache
from minillm.kvcache.memory import KV_PRESETS
from minillm.model import Transformer

CPU_CONTEXTS = [32, 64, 128, 256, 512, 1024]
GPU_CONTEXTS = [128, 256, 512, 1024, 2048, 4096, 8192]


def bench_config(device: torch.device | str) -> ModelConfig:
    """The model shape to time: SmolLM2-135M's on a GPU; a 4-layer, 256-wide one on a CPU (seconds, not minutes)."""
    if torch.device(device).type == "cuda":
        return KV_PRESETS["SmolLM2-135M"]
    return ModelConfig(vocab_size=2048, hidden_size=256, intermediate_size=768, num_layers=4, num_heads=4,
                       num_kv_heads=2, max_position_embeddings=8192, tie_word_embeddings=True, name="small-random")


def random_model(config: ModelConfig, device: torch.device | str, dtype: torch.dtype, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(config).to(device=device, dtype=dtype).eval()


@torch.no_grad()
def time_per_token(
    model: Transformer,
    context_lens: list[int],
    warmup: int = 1,
    iters: int = 3,
) -> dict[str, list[float]]:
    """Milliseconds to produce the token after a context of S tokens, without and with a KV cache, for each S.

    Returns dict(context_lens, no_cache_ms, cache_ms, ratio) with ratio = no_cache_ms / cache_ms.
    """
    if not context_lens or min(context_lens) < 2:
        raise ValueError(f"context_lens must be a non-empty list of ints >= 2, got {context_lens!r}")
    p = next(model.parameters())
    device, dtype = p.device, p.dtype
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, max(context_lens)), generator=g).to(device)  # (1, S_max)
    no_cache, cache_ms = [], []
    for S in context_lens:
        no_cache.append(time_fn(lambda: model(ids[:, :S]), warmup=warmup, iters=iters, device=device))
        cache = ContiguousKVCache.for_model(model.config, 1, S, dtype, device)
        attention = ContiguousAttention(cache)
        prefill = ContiguousBatch.prefill([S - 1], device)
        model(ids[:, : S - 1], prefill.positions, attention, prefill)
        decode = prefill.next_decode()
        last = ids[:, S - 1 : S]  # (1, 1)

        def decode_step():
            cache.truncate(S - 1)
            return model(last, decode.positions, attention, decode)

        cache_ms.append(time_fn(decode_step, warmup=warmup, iters=iters, device=device))
    return dict(
        context_lens=list(context_lens),
        no_cache_ms=no_cache,
        cache_ms=cache_ms,
        ratio=[a / b for a, b in zip(no_cache, cache_ms)],
    )


def plot_time_per_token(results: dict, title: str):
    """Time per token against context length (left) and the cumulative time to generate up to S tokens (right)."""
    import matplotlib.pyplot as plt
    import numpy as np

    S = np.array(results["context_lens"], dtype=float)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for key, label in (("no_cache_ms", "no cache (recompute)"), ("cache_ms", "KV cache")):
        ms = np.array(results[key])
        ax1.plot(S, ms, "o-", label=label)
        # Total cost of generating every token up to S: the per-token time, interpolated at each S, summed.
        grid = np.arange(1, S.max() + 1)
        per_token = np.interp(grid, S, ms)
        ax2.plot(grid, np.cumsum(per_token) / 1e3, label=label)
    ax1.set(xlabel="context length S (tokens)", ylabel="ms per generated token", title="time per token")
    ax2.set(xlabel="tokens generated", ylabel="total seconds", title="total time (no cache ~ S², cache ~ S)")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> None:
    """Time per generated token with and without the KV cache as the context grows; JSON + PNG."""
    parser = make_parser("kvcache", description=main.__doc__)
    parser.add_argument("--contexts", type=int, nargs="+", default=None, help="context lengths S to time")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None, help="bf16 on GPU, fp32 on CPU")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (1 is steadier on a shared machine)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    ]
    contexts = args.contexts or (GPU_CONTEXTS if device.type == "cuda" else CPU_CONTEXTS)
    config = bench_config(device)
    model = random_model(config, device, dtype)
    results = time_per_token(model, contexts)
    results.update(model=config.name, dtype=str(dtype))
    title = f"{config.name}, {dtype}, {device_name(device)}"
    print(f"{'S':>6} {'no cache ms':>12} {'cache ms':>10} {'ratio':>7}   ({title})")
    for S, a, b, r in zip(contexts, results["no_cache_ms"], results["cache_ms"], results["ratio"]):
        print(f"{S:>6} {a:>12.3f} {b:>10.3f} {r:>6.1f}x")
    for path in write_results("kvcache", results, plot_time_per_token(results, title), args.out, device):
        print(f"wrote {path}")
