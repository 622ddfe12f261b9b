"""Benchmark: decode speed, eager vs compiled or graph-replayed, against transformers and the roofline, in one run.

``python -m minillm.bench decode`` loads SmolLM2-135M once (fp32 on a CPU, bf16 on a GPU) and measures, the systems
taking turns for ``--repeats`` rounds (the median round is reported):
- batch 1, one chat prompt, ``--max-tokens`` new tokens (greedy, EOS ignored), decode tokens/s = 1 / time per
  output token (TPOT), for
    ``minillm_eager``   ``LLM(enforce_eager=True)``: minillm.model's forward, op by op;
    ``minillm_fast``    on a CPU ``LLM(compile=True)`` (torch.compile of the pieces between attentions, inductor's
                        C++ backend); on a GPU ``LLM(enforce_eager=False)`` (fused Triton kernels, CUDA graphs);
    ``hf_generate``     transformers ``generate`` on its own Llama built from the same GGUF file;
  and whether both minillm systems emit the same greedy tokens;
- tokens/s against batch size (1..16 on a CPU, 1..64 on a GPU; random prompts of 32 tokens) for both minillm systems,
  each point as a fraction of the decode roofline at that batch size and context: bandwidth (measured here, and the
  datasheet's on a known GPU) / bytes a step reads (``bench/roofline.py``);
- on a GPU, each fused Triton kernel (``fast/fused.py``) against its unfused torch reference at 1, 64 and 2048 tokens;
- a prefill (no cache, 64 tokens) in minillm's eager forward and in ONNX Runtime (CPU only; ``fast/onnx_runtime.py``),
  with the largest logit difference: what a graph runtime gives a fixed-shape forward, and it cannot page a cache.
Writes JSON + PNG. Timings, not tests: CI runs this only at tiny sizes (``gpu_check --dry-run``).
"""

from __future__ import annotations

import statistics
import tempfile
import time

import torch

from minillm.bench.common import environment_info, make_parser, write_results
from minillm.bench.roofline import decode_roofline, measure_read_bandwidth, peak_specs

CHAT = [{"role": "user", "content": "Explain in a few sentences why the sky is blue, then give one fun fact."}]


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def minillm_system(model, tok, fast: bool, max_num_seqs: int, max_len: int):
    from minillm import LLM

    options = dict(compile=True) if model.embed_tokens.weight.device.type == "cpu" else dict(enforce_eager=False)
    llm = LLM(model, tokenizer=tok, max_num_seqs=max_num_seqs, max_model_len=max_len,
              num_kv_blocks=max_num_seqs * -(-max_len // 16) + 8, **(options if fast else dict(enforce_eager=True)))
    return llm


def decode_rate(llm, prompts: list, max_tokens: int) -> tuple[float, list[list[int]]]:
    """Decode tokens/s of a batch (len(prompts) / mean TPOT) and the tokens it produced."""
    from minillm import SamplingParams

    _sync()
    outs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, ignore_eos=True), use_tqdm=False)
    tpot = statistics.mean(o.metrics["tpot"] for o in outs)
    return len(prompts) / tpot, [o.token_ids for o in outs]


def hf_decode_rate(hf, ids: list[int], max_tokens: int) -> tuple[float, list[int]]:
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Clock(StoppingCriteria):  # called once per generated token: per-step timestamps
        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores, **kwargs):
            _sync()
            self.times.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    clock = Clock()
    x = torch.tensor([ids], device=hf.device)
    out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                      do_sample=False, pad_token_id=0, stopping_criteria=StoppingCriteriaList([clock]))
    return (len(clock.times) - 1) / (clock.times[-1] - clock.times[0]), out[0, len(ids):].tolist()


def onnx_prefill(model, num_tokens: int, repeats: int) -> dict:
    from minillm.bench.common import time_fn
    from minillm.fast.onnx_runtime import OnnxRunner, compare_logits, export_onnx

    ids = torch.randint(100, model.config.vocab_size - 100, (1, num_tokens), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        runner = OnnxRunner(export_onnx(model, f"{tmp}/model.onnx"))
        export_s = time.perf_counter() - start
        with torch.no_grad():
            minillm_ms = time_fn(lambda: model(ids), warmup=1, iters=repeats)
        ort_ms = time_fn(lambda: runner(ids), warmup=1, iters=repeats)
        diff = compare_logits(model, runner, ids)
    return {"num_tokens": num_tokens, "export_and_load_s": export_s, "minillm_eager_ms": minillm_ms,
            "onnxruntime_ms": ort_ms, "onnxruntime_speedup": minillm_ms / ort_ms, **diff}


def fused_kernels(model, device: torch.device, token_counts=(1, 64, 2048)) -> list[dict]:
    """Each fused Triton kernel against its unfused torch reference at decode and prefill sizes (GPU only: on a CPU
    the kernels run in Triton's interpreter, which checks them but says nothing about speed)."""
    from minillm.bench.common import time_fn
    from minillm.fast import fused

    cfg, dtype = model.config, next(model.parameters()).dtype
    C, H, Hkv, D, I = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    rows = []
    for N in token_counts:
        def t(*shape):
            return torch.randn(*shape, device=device, dtype=dtype)

        x, r, w, q, k, gate, up = t(N, C), t(N, C), t(C), t(N, H, D), t(N, Hkv, D), t(N, I), t(N, I)
        cos, sin = t(N, D), t(N, D)
        for name, args in [("add_rmsnorm", (x, r, w, 1e-5)), ("rope_qk", (q, k, cos, sin)), ("silu_mul", (gate, up))]:
            kernel, reference = getattr(fused, name), getattr(fused, f"{name}_ref")
            ms_fused = time_fn(lambda: kernel(*args), warmup=3, iters=20, device=device)
            ms_ref = time_fn(lambda: reference(*args), warmup=3, iters=20, device=device)
            rows.append({"kernel": name, "num_tokens": N, "fused_ms": ms_fused, "unfused_ms": ms_ref,
                         "speedup": ms_ref / ms_fused})
    return rows


def plot(record: dict, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    batch1 = {k: v["decode_tokens_per_s"] for k, v in record["batch1"].items() if "decode_tokens_per_s" in v}
    bars = axes[0].bar(range(len(batch1)), list(batch1.values()),
                       color=["tab:blue" if k.startswith("minillm") else "tab:gray" for k in batch1])
    axes[0].bar_label(bars, [f"{v:.1f}" for v in batch1.values()], fontsize=8)
    axes[0].set_xticks(range(len(batch1)), list(batch1), fontsize=8)
    axes[0].set_title("batch 1: decode tokens/s (higher is better)")
    sweep = record["batch_sweep"]
    for name, style in [("minillm_eager", "o-"), ("minillm_fast", "s-")]:
        rows = [r for r in sweep if r["system"] == name and "tokens_per_s" in r]
        axes[1].plot([r["batch_size"] for r in rows], [r["tokens_per_s"] for r in rows], style, label=name)
    rows = [r for r in sweep if r["system"] == "minillm_eager"]
    axes[1].plot([r["batch_size"] for r in rows], [r["roofline_tokens_per_s"] for r in rows], "k--",
                 label="roofline (measured bandwidth)")
    axes[1].set(xscale="log", yscale="log", xlabel="batch size", ylabel="decode tokens/s",
                title="tokens/s vs batch size, and the bandwidth bound")
    axes[1].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> None:
    parser = make_parser("decode", __doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=None, help="new tokens per request (256 GPU, 48 CPU)")
    parser.add_argument("--batch-sizes", default=None, help="comma-separated (default 1..64 GPU, 1..16 CPU)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds, systems taking turns; median reported")
    parser.add_argument("--peers", default="minillm_eager,minillm_fast,hf_generate,onnxruntime")
    parser.add_argument("--prefill-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    max_tokens = args.max_tokens or (256 if gpu else 48)
    batch_sizes = [int(b) for b in (args.batch_sizes or ("1,2,4,8,16,32,64" if gpu else "1,2,4,8,16")).split(",")]
    peers = args.peers.split(",")

    from minillm.loading import embedded_gguf_path, load_model

    model, tok = load_model("smollm2-135m", device=device)
    dtype = next(model.parameters()).dtype
    prompt = tok(tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False),
                 add_special_tokens=False).input_ids
    max_len = max(len(prompt), 32) + max_tokens + 8
    systems, errors = {}, {}
    for name in [p for p in peers if p.startswith("minillm_")]:
        try:
            start = time.perf_counter()
            systems[name] = minillm_system(model, tok, name == "minillm_fast", max(batch_sizes), max_len)
            print(f"[decode] {name}: built in {time.perf_counter() - start:.1f} s, "
                  f"{systems[name].stats()['execution']}", flush=True)
        except Exception as e:
            errors[name] = f"{type(e).__name__}: {e}"
    hf = None
    if "hf_generate" in peers:
        try:
            from transformers import AutoModelForCausalLM

            path = embedded_gguf_path("smollm2-135m")
            hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
            hf = hf.to(device).eval()
        except Exception as e:
            errors["hf_generate"] = f"{type(e).__name__}: {e}"

    # Batch 1, the systems taking turns so a slow minute of a shared machine hits all of them.
    runs: dict[str, list[float]] = {name: [] for name in [*systems, *(["hf_generate"] if hf else [])]}
    tokens: dict[str, list[int]] = {}
    with torch.no_grad():
        for name, llm in systems.items():  # warm-up: first calls allocate, compile, capture
            decode_rate(llm, [prompt], 4)
        if hf is not None:
            hf_decode_rate(hf, prompt, 4)
        for rep in range(args.repeats):
            for name in runs:
                if name == "hf_generate":
                    rate, out = hf_decode_rate(hf, prompt, max_tokens)
                else:
                    rate, outs = decode_rate(systems[name], [prompt], max_tokens)
                    out = outs[0]
                runs[name].append(rate)
                tokens[name] = out
                print(f"[decode] batch 1, {name} (round {rep + 1}/{args.repeats}): {rate:.1f} tokens/s", flush=True)
    batch1 = {name: {"decode_tokens_per_s": statistics.median(r), "runs": r} for name, r in runs.items()}
    batch1.update({name: {"error": e} for name, e in errors.items()})
    ratios = {}
    for a, b in [("minillm_eager", "hf_generate"), ("minillm_fast", "hf_generate"), ("minillm_fast", "minillm_eager")]:
        if a in runs and b in runs:
            ratios[f"{a}_vs_{b}"] = batch1[a]["decode_tokens_per_s"] / batch1[b]["decode_tokens_per_s"]
    same = {f"{a}_equals_{b}": tokens[a] == tokens[b] for a, b in [("minillm_fast", "minillm_eager"),
                                                                  ("hf_generate", "minillm_eager")]
            if a in tokens and b in tokens}

    # Tokens/s against batch size, each point against the bandwidth bound at its batch size and mean context.
    bandwidth = max(measure_read_bandwidth(device, (1 << 30) if gpu else (512 << 20)) for _ in range(3))
    peak = peak_specs(torch.cuda.get_device_name(device)) if gpu else None
    context = 32 + max_tokens // 2
    sweep = []
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for B in batch_sizes:
            prompts = [torch.randint(100, model.config.vocab_size - 100, (32,), generator=g).tolist() for _ in range(B)]
            roof = decode_roofline(model.config, dtype, bandwidth, context_len=context, batch_size=B)["tokens_per_s"]
            for name, llm in systems.items():
                rounds = max(1, args.repeats // 2)
                rate = statistics.median(decode_rate(llm, prompts, max_tokens)[0] for _ in range(rounds))
                row = {"system": name, "batch_size": B, "tokens_per_s": rate, "roofline_tokens_per_s": roof,
                       "fraction_of_roofline": rate / roof}
                if peak:
                    datasheet = decode_roofline(model.config, dtype, peak["bandwidth"], context, B)["tokens_per_s"]
                    row["fraction_of_datasheet_roofline"] = rate / datasheet
                sweep.append(row)
                print(f"[decode] batch {B}, {name}: {rate:.1f} tokens/s = {rate / roof:.0%} of the roofline",
                      flush=True)
    prefill = {"skipped": "ONNX Runtime runs on the CPU build here; compare on a CPU"} if gpu else None
    if "onnxruntime" in peers and not gpu:
        try:
            prefill = onnx_prefill(model, args.prefill_tokens, max(3, args.repeats))
        except Exception as e:
            prefill = {"error": f"{type(e).__name__}: {e}"}
    kernels = fused_kernels(model, device) if gpu else {"skipped": "Triton runs interpreted on a CPU: not timed"}
    record = {
        "fused_kernels": kernels,
        "workload": {"prompt": CHAT, "prompt_tokens": len(prompt), "max_tokens": max_tokens, "dtype": str(dtype),
                     "greedy": True, "ignore_eos": True, "repeats": args.repeats, "sweep_context_len": context},
        "execution": {name: llm.stats()["execution"] for name, llm in systems.items()},
        "batch1": batch1, "batch1_ratios": ratios, "same_tokens": same,
        "measured_read_bandwidth": bandwidth, "peak": peak, "batch_sweep": sweep, "onnxruntime_prefill": prefill,
    }
    title = (f"decode on {environment_info(device)['device']}, SmolLM2-135M {str(dtype).removeprefix('torch.')}, "
             f"{max_tokens} new tokens, median of {args.repeats} rounds")
    for path in write_results("decode", record, plot(record, title), args.out, device):
        print(f"[decode] wrote {path}")
    print("[decode] " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()) + f"; same tokens: {same}")
