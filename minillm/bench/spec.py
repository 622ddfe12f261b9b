"""Benchmark: speculative decoding against plain decoding of the same requests, in the same run.

``python -m minillm.bench spec`` serves two workloads with SmolLM2-135M, greedy, with and without speculation:
  * ``repetitive``: edit code or a given text and print it again (rename a variable, fix the spelling): the output
    copies long runs of the prompt, where prompt lookup shines;
  * ``chat``: open questions, whose answers copy little.
For each workload and batch size (1: one request at a time; 8: eight requests in one ``generate``) it times plain
decoding and each speculative configuration alternately, so every speedup is a ratio of neighbouring runs on the
same, possibly noisy, machine: ``speedup = mean(plain before, plain after) / speculative``. Greedy speculation must
produce exactly the plain tokens; the benchmark checks it on every run.

The configurations: the ``--k`` sweep at batch 1 with speculation always on (``min_expected_tokens`` 0), one run
each, for the acceptance-vs-k curve and its theory, ``(1 - a^(k+1)) / (1 - a)`` tokens per verification with ``a``
the acceptance rate measured at k = 1; then the default, adaptive proposer (k = ``--adaptive-k``, turning itself down
when guesses fail) at every batch size, ``--repeats`` runs each (the median speedup: on a shared 2-core VM one run
varies by about 15%). Proposers: ``ngram`` (prompt lookup) and ``draft`` (``self_draft``: the target's first
``--draft-layers`` layers with its norm and head, sharing every weight; untrained, it rarely agrees with the target,
which the adaptive rule has to notice). Tokens/s count generated tokens over the wall time of the ``generate`` calls;
acceptance and steps are summed over them.
Notebook 09 (``09_speculative_decoding``) shows the plot.
"""

from __future__ import annotations

import time

import torch

import minillm
from minillm.bench.common import environment_info, make_parser, write_results
from minillm.spec.draft import self_draft
from minillm.spec.verify import expected_tokens_per_step

CODE = '''def mean(values):
    total = 0
    count = 0
    for value in values:
        total = total + value
        count = count + 1
    return total / count


def variance(values):
    m = mean(values)
    total = 0
    for value in values:
        total = total + (value - m) * (value - m)
    return total / len(values)
'''
TEXT = ("The recieved wisdom is that a good teacher explains everything twice. The first time, the students listen; "
        "the second time, they beleive. A course that repeats itself is not a waste of time: it is how an idea "
        "becomes a habbit, and a habbit becomes a skill.")
EDITS = [
    f"Rename the variable `total` to `acc` in this code and print the whole code again:\n\n{CODE}",
    f"Rename the function `mean` to `average` everywhere in this code and print the whole code again:\n\n{CODE}",
    f"Add a docstring to each function in this code and print the whole code again:\n\n{CODE}",
    f"Rename `values` to `xs` in this code and print the whole code again:\n\n{CODE}",
    f"Fix the spelling mistakes in this paragraph and print it again:\n\n{TEXT}",
    f"Repeat this paragraph word for word, then say how many sentences it has:\n\n{TEXT}",
    f"Rewrite this paragraph with every sentence on its own line:\n\n{TEXT}",
    f"Replace the word 'habbit' with 'habit' in this paragraph and print it again:\n\n{TEXT}",
]
QUESTIONS = [
    "Write a short story about a cat who learns to fly.",
    "Why is the sky blue? Explain it to a ten-year-old.",
    "Give me three ideas for a rainy Sunday afternoon.",
    "What makes a good cup of tea?",
    "Describe the city of your dreams.",
    "How do bees make honey?",
    "Write a poem about the sea.",
    "What should I pack for a weekend of hiking?",
]
WORKLOADS = {"repetitive": EDITS, "chat": QUESTIONS}


def chat(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


def speculative_config(proposer: str, k: int, adaptive: bool, target, draft_layers: int) -> dict:
    config = {"num_speculative_tokens": k, **({} if adaptive else {"min_expected_tokens": 0})}
    if proposer == "ngram":
        return {"method": "ngram", **config}
    return {"method": "draft_model", "model": self_draft(target, draft_layers), **config}


def serve(llm, prompts: list, batch: int, params, counts: dict | None = None) -> tuple[float, list[list[int]]]:
    """Wall seconds to serve `prompts`, `batch` at a time, and the generated token ids. `counts`, if given, adds up
    the engine's steps and speculation counts over the ``generate`` calls (each call restarts ``llm.stats()``)."""
    tokens, seconds = [], 0.0
    for i in range(0, len(prompts), batch):
        start = time.perf_counter()
        tokens += [o.token_ids for o in llm.generate(prompts[i : i + batch], params, use_tqdm=False)]
        seconds += time.perf_counter() - start
        if counts is not None:
            stats = llm.stats()
            for key, value in [("num_steps", stats["num_steps"]), *stats.get("speculative", {}).items()]:
                if key in ("num_steps", "proposed", "accepted", "verification_steps"):
                    counts[key] = counts.get(key, 0) + value
    return seconds, tokens


def main(argv: list[str] | None = None) -> None:
    parser = make_parser("spec", "speculative decoding vs plain decoding: prompt lookup and a draft model")
    parser.add_argument("--workloads", nargs="+", choices=sorted(WORKLOADS), default=sorted(WORKLOADS)[::-1])
    parser.add_argument("--proposers", nargs="+", choices=["ngram", "draft"], default=["ngram", "draft"])
    parser.add_argument("--k", nargs="+", type=int, default=None, help="sweep at batch 1 (default: 1 2 4 6 on CPU, "
                        "1 2 3 4 6 8 on GPU; the draft proposer uses the first two and the last)")
    parser.add_argument("--adaptive-k", type=int, default=4, help="k of the adaptive runs at every batch size")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--prompts", type=int, default=None, help="requests per batch-1 run (default: 2 CPU, 8 GPU)")
    parser.add_argument("--max-tokens", type=int, default=None, help="default: 48 on CPU, 256 on GPU")
    parser.add_argument("--draft-layers", type=int, default=10, help="self-draft: the target's first layers kept")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each adaptive (headline) configuration, "
                        "each between two plain runs; the median speedup is reported (the k sweep runs once)")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    ks = args.k or ([1, 2, 3, 4, 6, 8] if on_gpu else [1, 2, 4, 6])
    num_prompts = args.prompts or (8 if on_gpu else 2)
    max_tokens = args.max_tokens or (256 if on_gpu else 48)
    if any(k < 1 for k in [*ks, args.adaptive_k]) or any(b < 1 for b in args.batches) or args.repeats < 1:
        parser.error("every k, batch size and --repeats must be >= 1")

    env = environment_info(device)
    print(f"spec benchmark on {env['device']}: greedy, up to {max_tokens} new tokens per request")
    wall_start = time.perf_counter()
    base = minillm.LLM("smollm2-135m", device=device)
    model, tokenizer = base.model, base.tokenizer
    params = minillm.SamplingParams(temperature=0.0, max_tokens=max_tokens)
    plain_llm = minillm.LLM(model, tokenizer=tokenizer)
    rows = []
    for workload in args.workloads:
        for batch in args.batches:
            prompts = [chat(p) for p in WORKLOADS[workload][: max(batch, num_prompts if batch == 1 else batch)]]
            configs = [(proposer, k, False) for proposer in args.proposers if batch == 1
                       for k in (ks if proposer == "ngram" else sorted({*ks[:2], ks[-1]}))]
            configs += [(proposer, args.adaptive_k, True) for proposer in args.proposers]
            serve(plain_llm, prompts[:1], 1, minillm.SamplingParams(temperature=0.0, max_tokens=4))  # warm-up
            plain_s, plain_tokens = serve(plain_llm, prompts, batch, params)
            num_tokens = sum(map(len, plain_tokens))
            for proposer, k, adaptive in configs:
                llm = minillm.LLM(model, tokenizer=tokenizer,
                                  speculative_config=speculative_config(proposer, k, adaptive, model,
                                                                        args.draft_layers))
                serve(llm, prompts[:1], 1, minillm.SamplingParams(temperature=0.0, max_tokens=4))
                speedups, spec_times, plain_times = [], [], []
                for _ in range(args.repeats if adaptive else 1):
                    counts = {}
                    spec_s, spec_tokens = serve(llm, prompts, batch, params, counts)
                    if spec_tokens != plain_tokens:
                        raise AssertionError(f"{workload}, {proposer} k={k}: greedy speculation changed the output")
                    plain_after, _ = serve(plain_llm, prompts, batch, params)
                    plain_times.append((plain_s + plain_after) / 2)
                    spec_times.append(spec_s)
                    speedups.append(plain_times[-1] / spec_s)
                    plain_s = plain_after
                middle = sorted(range(len(speedups)), key=speedups.__getitem__)[len(speedups) // 2]  # the median run
                proposed, accepted, verifications = counts["proposed"], counts["accepted"], counts["verification_steps"]
                row = dict(workload=workload, batch=batch, proposer=proposer, k=k, adaptive=adaptive,
                           num_requests=len(prompts), generated_tokens=num_tokens, runs=len(speedups),
                           tokens_per_s=num_tokens / spec_times[middle],
                           plain_tokens_per_s=num_tokens / plain_times[middle], speedup=speedups[middle],
                           speedups=speedups, acceptance_rate=accepted / proposed if proposed else 0.0,
                           tokens_per_verification=1 + (accepted / verifications if verifications else 0.0),
                           verification_steps=verifications, steps=counts["num_steps"], proposed=proposed,
                           accepted=accepted)
                rows.append(row)
                print(f"{workload:<10} batch {batch} {proposer:<5} k={k} {'adaptive' if adaptive else 'always  '} "
                      f"{row['tokens_per_s']:6.1f} tok/s vs plain {row['plain_tokens_per_s']:6.1f}: "
                      f"{row['speedup']:.2f}x, {row['acceptance_rate']:.0%} of guesses accepted, "
                      f"{row['tokens_per_verification']:.2f} tokens per verification", flush=True)
    for row in rows:  # the theory's prediction from the acceptance rate at k = 1 of the same workload and proposer
        first = next((r for r in rows if r["k"] == 1 and not r["adaptive"] and r["workload"] == row["workload"]
                      and r["proposer"] == row["proposer"] and r["batch"] == row["batch"]), None)
        row["theory_tokens_per_verification"] = (
            None if first is None else expected_tokens_per_step(first["acceptance_rate"], row["k"]))
    wall_s = time.perf_counter() - wall_start
    results = dict(
        model="smollm2-135m", dtype=str(next(model.parameters()).dtype), max_tokens=max_tokens, ks=ks,
        adaptive_k=args.adaptive_k, batches=args.batches, draft=f"self_draft, first {args.draft_layers} layers",
        speedup_formula="mean(plain run before, plain run after) / speculative run, same requests, same tokens; "
                        "the median of `runs` such ratios",
        theory_formula="(1 - a^(k+1)) / (1 - a), a = acceptance rate at k = 1",
        wall_s=round(wall_s, 1), rows=rows,
    )
    fig = None if args.no_plot else plot(rows, f"speculative decoding, SmolLM2-135M greedy, {env['device']}")
    for path in write_results("spec", results, fig=fig, out_dir=args.out, device=device):
        print(f"wrote {path}")
    print(f"total wall time {wall_s:.0f} s")


def plot(rows: list[dict], title: str):
    from minillm.viz.spec import plot_speculation_sweep

    fig = plot_speculation_sweep(rows)
    fig.suptitle(title)
    return fig
