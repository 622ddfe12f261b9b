"""Benchmark: the serving engine on one workload, continuous vs static batching vs transformers, in the same run.

``python -m minillm.bench engine`` draws one workload -- N requests whose prompt and output lengths are uniform in
[min_len, max_len], random token ids, ``ignore_eos`` so every request produces exactly its output length -- and
serves it, all requests arriving at once, with:
- ``minillm_continuous``: ``LLM(scheduler="continuous")`` (paged KV cache, chunked prefill; notebook 05);
- ``minillm_static``: the same engine with ``scheduler="static"`` (a batch runs until its longest member is done);
- ``hf_generate``: transformers ``generate`` on static batches of the same size, left-padded, each batch running
  to its longest output (what most tutorials do);
- ``hf_generate_batch``: transformers' own continuous batching (``ContinuousBatchingManager``, the engine behind
  ``model.generate_batch``), given each request's own ``max_new_tokens``.
Every system gets the same caps: at most ``--max-num-seqs`` sequences and ``--max-num-batched-tokens`` tokens per
step (transformers' ``max_requests_per_batch`` and ``max_batch_tokens``). Left to itself generate_batch would run
every request at once, and on a bandwidth-bound machine a bigger batch alone buys throughput: that would compare
batch sizes, not engines.
Reported: output tokens/s = sum of requested output tokens / wall time (padding and over-generation don't count),
time to first token (TTFT) and time per output token (TPOT) percentiles in ms, and speed ratios of minillm
continuous to each peer. Defaults: on a GPU 256 requests with lengths in [64, 512]; on a CPU a small version.
Each system serves the workload ``--repeats`` times, the systems taking turns, and its median run is reported (the
JSON keeps every run's tokens/s): a CPU's speed drifts by 10-20% from one minute to the next.

``static_bound`` is the most FCFS continuous batching can gain over static batching on this workload if every step
cost the same and prefill were free: static decodes each batch for as many steps as its longest output, continuous
hands a freed slot to the next request at once, and the bound is the ratio of those step counts. Uniform lengths
leave little tail for continuous batching to fill, so the bound is modest there; long-tailed lengths raise it.
"""

from __future__ import annotations

import heapq
import statistics
import time

import torch

from minillm.bench.common import environment_info, make_parser, write_results


def make_workload(num_requests: int, min_len: int, max_len: int, vocab_size: int, seed: int = 0):
    """Prompts (random token ids) and output lengths, both uniform in [min_len, max_len]."""
    g = torch.Generator().manual_seed(seed)
    prompt_lens = torch.randint(min_len, max_len + 1, (num_requests,), generator=g).tolist()
    out_lens = torch.randint(min_len, max_len + 1, (num_requests,), generator=g).tolist()
    prompts = [torch.randint(100, vocab_size - 100, (n,), generator=g).tolist() for n in prompt_lens]
    return prompts, out_lens


def summarize(elapsed: float, out_lens: list[int], ttft: list[float], tpot: list[float], **extra) -> dict:
    def pct(xs, q):
        xs = sorted(xs)
        return 1e3 * xs[min(len(xs) - 1, int(q / 100 * len(xs)))]

    return {
        "seconds": elapsed,
        "output_tokens_per_s": sum(out_lens) / elapsed,
        **{f"ttft_p{q}_ms": pct(ttft, q) for q in (50, 90, 99)},
        **{f"tpot_p{q}_ms": pct(tpot, q) for q in (50, 90, 99)},
        **extra,
    }


def static_bound(out_lens: list[int], max_num_seqs: int) -> float:
    """Decode steps of static batching over those of FCFS continuous batching, one token per step (module doc)."""
    static_steps = sum(max(out_lens[i : i + max_num_seqs]) for i in range(0, len(out_lens), max_num_seqs))
    slot_free_at = [0] * max_num_seqs  # a min-heap: the step at which each slot finishes its current request
    for n in out_lens:
        heapq.heappush(slot_free_at, heapq.heappop(slot_free_at) + n)
    return static_steps / max(slot_free_at)


def make_minillm(
    model, tok, prompts, out_lens, scheduler: str, max_num_seqs: int, max_num_batched_tokens: int, max_len: int
):
    """Build and warm up an engine; -> a function that serves the workload once and returns its summary."""
    from minillm import LLM, SamplingParams

    # Enough blocks for max_num_seqs sequences at full length: this compares batching, not memory pressure.
    llm = LLM(model, tokenizer=tok, scheduler=scheduler, max_num_seqs=max_num_seqs,
              max_num_batched_tokens=max_num_batched_tokens,
              num_kv_blocks=max_num_seqs * -(-2 * max_len // 16) + 16, enable_prefix_caching=False)
    llm.generate(prompts[:2], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)  # warm-up
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in out_lens]

    def serve() -> dict:
        _sync()
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        _sync()
        elapsed = time.perf_counter() - t0
        assert [len(o.token_ids) for o in outs] == out_lens
        stats = llm.stats()
        return summarize(
            elapsed, out_lens, [o.metrics["ttft"] for o in outs],
            [o.metrics["tpot"] for o in outs if o.metrics["tpot"]],
            num_steps=stats["num_steps"], mean_tokens_per_step=statistics.mean(stats["tokens_per_step"]),
            mean_batch_size=statistics.mean(stats["batch_sizes"]), kv_waste_pct=stats["kv_waste_pct"],
        )

    return serve


def run_hf_generate(hf_model, prompts, out_lens, batch_size: int, pad_id: int) -> dict:
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StepClock(StoppingCriteria):  # called once per generated token of the batch: our per-step timestamps
        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores, **kwargs):
            self.times.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    device = next(hf_model.parameters()).device
    ttft, tpot = [], []
    _sync()
    t0 = time.perf_counter()
    for start in range(0, len(prompts), batch_size):
        batch, lens = prompts[start : start + batch_size], out_lens[start : start + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch], device=device)  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        clock = StepClock()
        hf_model.generate(ids, attention_mask=mask, max_new_tokens=max(lens), min_new_tokens=max(lens),
                          do_sample=False, pad_token_id=pad_id, stopping_criteria=StoppingCriteriaList([clock]))
        _sync()
        for n in lens:
            ttft.append(clock.times[0] - t0)
            if n > 1:
                tpot.append((clock.times[n - 1] - clock.times[0]) / (n - 1))
    return summarize(time.perf_counter() - t0, out_lens, ttft, tpot)


def run_hf_generate_batch(hf_model, prompts, out_lens, max_len: int, max_num_seqs: int, max_batch_tokens: int) -> dict:
    from transformers import ContinuousBatchingConfig, GenerationConfig

    config = GenerationConfig(max_new_tokens=max_len, do_sample=False, eos_token_id=-1, pad_token_id=0)
    caps = ContinuousBatchingConfig(max_requests_per_batch=max_num_seqs, max_batch_tokens=max_batch_tokens)
    with hf_model.continuous_batching_context_manager(
        generation_config=config, continuous_batching_config=caps, block=True, timeout=5
    ) as manager:
        manager.add_request(prompts[0], request_id="warmup", max_new_tokens=4, eos_token_id=-1)
        while (r := manager.get_result(timeout=1)) is None or not r.is_finished():
            pass
        _sync()
        t0 = time.perf_counter()
        for i, (p, n) in enumerate(zip(prompts, out_lens)):
            manager.add_request(p, request_id=str(i), max_new_tokens=n, record_timestamps=True, eos_token_id=-1)
        results = {}
        while len(results) < len(prompts):
            r = manager.get_result(timeout=1)
            if r is not None and r.is_finished():
                if r.error is not None:
                    raise RuntimeError(f"generate_batch request {r.request_id} failed: {r.error}")
                results[r.request_id] = r
            elif r is None and not manager.is_running():
                raise RuntimeError("transformers' continuous batching thread stopped")
        elapsed = time.perf_counter() - t0
    outs = [results[str(i)] for i in range(len(prompts))]
    assert [len(o.generated_tokens) for o in outs] == out_lens
    ttft = [o.timestamps[0] - t0 for o in outs]
    tpot = [(o.timestamps[-1] - o.timestamps[0]) / (len(o.timestamps) - 1) for o in outs if len(o.timestamps) > 1]
    return summarize(elapsed, out_lens, ttft, tpot)


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def plot(results: dict, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, r in results.items() if "output_tokens_per_s" in r]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.9))
    for ax, key, label in zip(axes, ["output_tokens_per_s", "ttft_p50_ms", "tpot_p50_ms"],
                              ["output tokens/s (higher is better)", "TTFT p50, ms", "TPOT p50, ms"]):
        values = [results[n][key] for n in names]
        bars = ax.bar(range(len(names)), values, color=["tab:blue" if n.startswith("minillm") else "tab:gray"
                                                       for n in names])
        ax.bar_label(bars, [f"{v:.0f}" for v in values], fontsize=8)
        ax.set_xticks(range(len(names)), [n.replace("_", "\n", 1) for n in names], fontsize=8)
        ax.set_title(label)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> None:
    parser = make_parser("engine", __doc__.splitlines()[0])
    parser.add_argument("--num-requests", type=int, default=None, help="default 256 on GPU, 16 on CPU")
    parser.add_argument("--min-len", type=int, default=None, help="default 64 on GPU, 8 on CPU")
    parser.add_argument("--max-len", type=int, default=None, help="default 512 on GPU, 48 on CPU")
    parser.add_argument("--max-num-seqs", type=int, default=None, help="batch size of every system (64 GPU, 8 CPU)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048, help="token budget per step, every system")
    parser.add_argument("--peers", default="minillm_continuous,minillm_static,hf_generate,hf_generate_batch")
    parser.add_argument("--repeats", type=int, default=None,
                        help="runs per system, round robin; the median is kept (default 3 on CPU, 1 on GPU)")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    n = args.num_requests or (256 if gpu else 16)
    lo, hi = args.min_len or (64 if gpu else 8), args.max_len or (512 if gpu else 48)
    max_num_seqs = args.max_num_seqs or (64 if gpu else 8)
    repeats = args.repeats or (1 if gpu else 3)

    from minillm.loading import embedded_gguf_path, load_model

    model, tok = load_model("smollm2-135m", device=device)
    dtype = next(model.parameters()).dtype
    prompts, out_lens = make_workload(n, lo, hi, model.config.vocab_size)
    peers, hf = args.peers.split(","), None

    def make_runner(name: str):
        """A function that serves the workload once with system `name` (its model loaded, its engine warm)."""
        nonlocal hf
        if name.startswith("minillm_"):
            return make_minillm(model, tok, prompts, out_lens, name.split("_")[1], max_num_seqs,
                                args.max_num_batched_tokens, hi)
        if hf is None:
            from transformers import AutoModelForCausalLM

            path = embedded_gguf_path("smollm2-135m")
            hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
            hf = hf.to(device).eval()
        if name == "hf_generate":
            return lambda: run_hf_generate(hf, prompts, out_lens, max_num_seqs, tok.pad_token_id or 0)
        if name == "hf_generate_batch":
            return lambda: run_hf_generate_batch(hf, prompts, out_lens, hi, max_num_seqs, args.max_num_batched_tokens)
        raise ValueError(f"unknown peer {name!r}")

    # A peer that cannot run here is reported in the JSON, not fatal. The systems take turns, so a slow minute of a
    # noisy machine lands on all of them rather than on whichever happened to run then.
    errors, runners, runs = {}, {}, {name: [] for name in peers}
    for name in peers:
        try:
            runners[name] = make_runner(name)
        except Exception as e:
            errors[name] = f"{type(e).__name__}: {e}"
    with torch.no_grad():
        for rep in range(repeats):
            for name, serve in runners.items():
                if name in errors:
                    continue
                print(f"[engine] {name} (run {rep + 1}/{repeats}) ...", flush=True)
                try:
                    runs[name].append(serve())
                except Exception as e:
                    errors[name] = f"{type(e).__name__}: {e}"
    results: dict[str, dict] = {}
    for name in peers:
        if name in errors:
            results[name] = {"error": errors[name]}
        else:
            by_speed = sorted(runs[name], key=lambda r: r["output_tokens_per_s"])
            median = by_speed[len(by_speed) // 2]
            results[name] = {**median, "output_tokens_per_s_runs": [r["output_tokens_per_s"] for r in runs[name]]}
        print(f"[engine] {name}: {results[name]}", flush=True)
    base = results.get("minillm_continuous", {}).get("output_tokens_per_s")
    ratios = {
        f"minillm_continuous_vs_{name}": base / r["output_tokens_per_s"]
        for name, r in results.items() if base and name != "minillm_continuous" and "output_tokens_per_s" in r
    }
    record = {
        "workload": {"num_requests": n, "min_len": lo, "max_len": hi, "max_num_seqs": max_num_seqs,
                     "max_num_batched_tokens": args.max_num_batched_tokens, "dtype": str(dtype), "ignore_eos": True,
                     "arrivals": "all at t=0", "repeats": repeats, "reported": "the median run of each system"},
        "static_bound": static_bound(out_lens, max_num_seqs),
        "systems": results,
        "throughput_ratios": ratios,
    }
    model_name = f"SmolLM2-135M {str(dtype).removeprefix('torch.')}"
    title = (f"serving engine on {environment_info(device)['device']}, {model_name}: {n} requests, lengths uniform "
             f"in [{lo}, {hi}], at most {max_num_seqs} sequences per step for every system, median of {repeats} runs")
    for path in write_results("engine", record, plot(results, title), args.out, device):
        print(f"[engine] wrote {path}")
    print(f"[engine] {environment_info(device)['device']}: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    bound = record["static_bound"]
    print(f"[engine] static_bound {bound:.2f}x (FCFS continuous over static at best, equal step costs)")
