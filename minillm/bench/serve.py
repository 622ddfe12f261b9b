"""Benchmark: the server under Poisson load: TTFT, TPOT and goodput against the offered rate, and where the knee is.

``python -m minillm.bench serve`` draws one workload (``minillm.serve.loadgen.make_workload``: short chat questions,
heavy-tailed answer lengths, EOS ignored so every answer is as long as drawn) and one set of unit-rate Poisson arrival
times (``poisson_arrivals(1.0, n, rng)``); for a request rate r the same arrivals are divided by r, so every rate
replays the SAME requests in the same order, only squeezed in time. Each system in ``--systems`` is served by the same
HTTP server (``minillm.serve.app.start_server``, OpenAI's API), one after another in this process:
- ``minillm_continuous``: ``LLM(max_num_seqs=S)``, the continuous scheduler (notebook 05);
- ``minillm_static``: the same with ``scheduler="static"`` (a batch runs until its longest member is done);
- ``minillm_no_chunked_prefill`` (optional): continuous with ``enable_chunked_prefill=False``: a long prompt's prefill
  then runs in one step and every running request's next token waits for it, which shows in the ITL tail.
The load generator (``run_load``, the real ``openai.AsyncOpenAI`` client) sends each request at its arrival time,
streams the answer and times it: TTFT (first content chunk), ITL (gaps between content chunks; a chunk may carry
several tokens' text, so ITL is per chunk), TPOT = (e2e - TTFT) / (tokens - 1), e2e. Per (system, rate) the JSON
holds the percentiles, throughput, and goodput = requests per second that met BOTH SLOs (TTFT <= ``--slo-ttft``,
TPOT <= ``--slo-tpot``; DistServe, arXiv:2401.09670). After each rate the server's ``/metrics`` must show nothing
running, waiting or in flight and no KV block held; and every request must have finished with its drawn length or
been refused with a 429: a run where that does not add up carries an ``error``.

The knee of a system is the highest rate tried at which at least 90% of the requests met both SLOs (its
``slo_attainment`` >= 0.9; equivalently its goodput is >= 90% of the rate the trace actually offered, n / duration).
Past the knee, queueing makes latency grow faster than throughput: the rate a deployment should stay under. The
headline is max goodput over the rates, minillm_continuous / the peer.

The peer: transformers' own server (``transformers serve``, transformers 5.x) cannot load the embedded GGUF offline:
it reads the model class from the config's ``architectures``, which a GGUF's config leaves empty (recorded under
``transformers_serve``). So the peer is minillm's static scheduler, behind the same server, in the same run.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import numpy as np
import torch

from minillm.bench.common import environment_info, make_parser, write_results
from minillm.serve.loadgen import make_workload, poisson_arrivals, run_load, summarize

MODEL = "smollm2-135m"
SYSTEMS = {"minillm_continuous": {}, "minillm_static": {"scheduler": "static"},
           "minillm_no_chunked_prefill": {"enable_chunked_prefill": False}}
KNEE_ATTAINMENT = 0.9
TRANSFORMERS_SERVE = (
    "not used: `transformers serve <gguf folder>:<file>.gguf --continuous-batching --device cpu` fails while loading "
    "the embedded GGUF (ModelManager._load_model reads config.architectures[0]; a GGUF's config has "
    "architectures=None: TypeError: 'NoneType' object is not subscriptable), checked with transformers 5.24.0 "
    "offline; the peer is minillm_static behind the same server")
# The SLO a device can promise, (TTFT s, TPOT s). A reader's pace (about 5 words/s) asks for ~150 ms per token; a
# datacenter GPU decodes SmolLM2 far faster, so 50 ms there. On a 2-core CPU one decode step of the 135M model
# alone takes about 100 ms (it streams its 540 MB of fp32 weights), so under load 400 ms is what it can promise.
SLO = {"cpu": (2.0, 0.4), "cuda": (0.5, 0.05)}
# Sizes per device: (requests, min tokens, max tokens, rates, max_num_seqs, SLO TTFT s, SLO TPOT s).
DEFAULTS = {"cpu": (24, 8, 64, "0.5,1,2,4", 8, *SLO["cpu"]), "cuda": (200, 16, 256, "2,4,8,16,32", 64, *SLO["cuda"]),
            "quick": (4, 4, 8, "4,16", 2, None, None)}


def knee(rows: list[dict]) -> float | None:
    """The highest rate whose run had at least 90% of its requests meet both SLOs (module doc); None if none did."""
    passing = [r["rate"] for r in rows if "error" not in r and r["slo_attainment"] >= KNEE_ATTAINMENT]
    return max(passing) if passing else None


def server_state(url: str, wait_s: float = 10.0) -> dict:
    """The server's /metrics gauges once it is idle (polled for up to `wait_s`: aborts and frees run on the engine
    thread after the last response), with `idle` saying whether it got there."""
    import httpx

    from minillm.serve.metrics import parse_metrics

    names = ("minillm_num_requests_running", "minillm_num_requests_waiting", "minillm_num_requests_in_flight",
             "minillm_kv_blocks_used")
    deadline = time.monotonic() + wait_s
    while True:
        values = parse_metrics(httpx.get(f"{url}/metrics", timeout=10).text)
        state = {name.removeprefix("minillm_"): values[name] for name in names}
        state["idle"] = not any(state.values())
        if state["idle"] or time.monotonic() > deadline:
            return state
        time.sleep(0.1)


def check_accounting(results, requests, state: dict) -> str | None:
    """Why a run does not add up, or None: every request finished with its drawn length or was refused (429), and
    the server holds nothing afterwards."""
    problems = []
    finished = sum(r.is_finished for r in results)
    rejected = sum(r.rejected for r in results)
    if finished + rejected != len(requests):
        errors = sorted({r.error for r in results if r.error and not r.rejected})
        problems.append(f"{finished} finished + {rejected} rejected != {len(requests)} sent; errors: {errors[:3]}")
    short = [r.index for r in results if r.is_finished and r.output_tokens != requests[r.index].max_tokens]
    if short:
        problems.append(f"requests {short[:5]} got fewer or more tokens than asked (ignore_eos)")
    if not state["idle"]:
        problems.append(f"the server was not idle after the run: {state}")
    return "; ".join(problems) or None


def run_system(name: str, model, tok, requests, unit_arrivals, rates, args, on_row) -> list[dict]:
    """Serve `requests` with system `name` at every rate (arrivals = unit arrivals / rate); a row per rate."""
    from minillm import LLM
    from minillm.serve.app import start_server

    llm = LLM(model, tokenizer=tok, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, **SYSTEMS[name])
    rows = []
    try:
        with start_server(llm, MODEL, max_pending_requests=args.max_pending_requests) as server:
            warm_up = [replace(r, max_tokens=2) for r in requests[:2]]
            asyncio.run(run_load(server.base_url, MODEL, warm_up, [0.0, 0.0], 120))  # not timed
            for rate in rates:
                arrivals = [t / rate for t in unit_arrivals]
                timeout_s = arrivals[-1] + args.timeout_s
                t0 = time.perf_counter()
                results = asyncio.run(run_load(server.base_url, MODEL, requests, arrivals, timeout_s))
                duration = time.perf_counter() - t0
                state = server_state(server.url)
                row = {"system": name, "rate": rate,
                       **summarize(results, duration, args.slo_ttft, args.slo_tpot), "server_after": state}
                row["goodput_over_rate"] = row["goodput"] / rate
                if (problem := check_accounting(results, requests, state)) is not None:
                    row["error"] = problem
                rows.append(row)
                on_row(row)
    finally:
        llm.close()
    return rows


def format_row(row: dict) -> str:
    def ms(part: str, q: str) -> str:
        v = row[part][q]
        return f"{v * 1e3:7.0f}" if v is not None else "      -"

    return (f"{row['system']:<27} {row['rate']:6.2f} {row['finished']:4d}/{row['count']:<4d} {row['rejected']:3d} "
            f"{row['errors']:3d} {ms('ttft_s', 'p50')} {ms('ttft_s', 'p90')} {ms('tpot_s', 'p50')} "
            f"{ms('tpot_s', 'p90')} {ms('itl_s', 'p99')} {row['output_tokens_per_s']:7.1f} {row['goodput']:7.2f} "
            f"{row['slo_attainment']:5.0%}" + (f"  ERROR {row['error']}" if "error" in row else ""))


HEADER = (f"{'system':<27} {'rate':>6} {'done':>9} {'429':>3} {'err':>3} {'ttft50':>7} {'ttft90':>7} {'tpot50':>7} "
          f"{'tpot90':>7} {'itl99':>7} {'tok/s':>7} {'goodput':>7} {'slo%':>5}   (ms, req/s)")


def main(argv: list[str] | None = None) -> None:
    parser = make_parser("serve", __doc__.splitlines()[0])
    parser.add_argument("--systems", default="minillm_continuous,minillm_static",
                        help=f"comma-separated, from {', '.join(SYSTEMS)}")
    parser.add_argument("--peer", default="minillm_static", help="the system the headline ratio compares against")
    parser.add_argument("--rates", default=None, help="request rates, req/s, comma-separated (CPU 0.5,1,2,4; CUDA "
                        "2,4,8,16,32)")
    parser.add_argument("--num-requests", type=int, default=None, help="requests per rate (CPU 24, CUDA 200)")
    parser.add_argument("--min-tokens", type=int, default=None, help="shortest answer (CPU 8, CUDA 16)")
    parser.add_argument("--max-tokens", type=int, default=None, help="longest answer (CPU 64, CUDA 256)")
    parser.add_argument("--max-num-seqs", type=int, default=None, help="sequences per step (CPU 8, CUDA 64)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048, help="tokens per step")
    parser.add_argument("--max-pending-requests", type=int, default=256, help="the server's queue; beyond it, 429")
    parser.add_argument("--slo-ttft", type=float, default=None, help="seconds (CPU 2.0, CUDA 0.5)")
    parser.add_argument("--slo-tpot", type=float, default=None, help="seconds (CPU 0.4, CUDA 0.05)")
    parser.add_argument("--timeout-s", type=float, default=120.0, help="seconds past the last arrival before open "
                        "requests are cut (they then count as errors)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny: 4 requests of 4-8 tokens, rates 4 and 16")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    base = DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
    size = DEFAULTS["quick"] if args.quick else base
    n = args.num_requests or size[0]
    lo, hi = args.min_tokens or size[1], args.max_tokens or size[2]
    rates = sorted(float(r) for r in (args.rates or size[3]).split(","))
    args.max_num_seqs = args.max_num_seqs or size[4]
    args.slo_ttft, args.slo_tpot = args.slo_ttft or base[5], args.slo_tpot or base[6]
    systems = args.systems.split(",")
    if unknown := [s for s in systems if s not in SYSTEMS]:
        parser.error(f"unknown system(s) {unknown}; choose from {', '.join(SYSTEMS)}")
    if not rates or min(rates) <= 0 or n < 2:
        parser.error(f"need positive --rates and --num-requests >= 2, got {args.rates!r}, {n}")

    from tqdm import tqdm

    from minillm.loading import load_model
    from minillm.viz.serving import plot_load_curves

    wall_start = time.perf_counter()
    model, tok = load_model(MODEL, device=device)
    requests = make_workload(n, args.seed, lo, hi)
    unit_arrivals = poisson_arrivals(1.0, n, np.random.default_rng(args.seed))
    bar = tqdm(total=len(systems) * len(rates), desc="[serve] (system, rate) runs")
    tqdm.write(HEADER)

    def on_row(row: dict) -> None:
        tqdm.write(format_row(row))
        bar.update()

    by_system, errors = {}, {}
    for name in systems:
        try:
            by_system[name] = run_system(name, model, tok, requests, unit_arrivals, rates, args, on_row)
        except Exception as e:  # noqa: BLE001  one system that cannot run is reported, not fatal
            errors[name] = f"{type(e).__name__}: {e}"
            tqdm.write(f"[serve] {name} failed: {errors[name]}")
    bar.close()

    knees = {name: knee(rows) for name, rows in by_system.items()}
    best = {name: max(r["goodput"] for r in rows if "error" not in r) if any("error" not in r for r in rows)
            else None for name, rows in by_system.items()}
    ours, peer = best.get("minillm_continuous"), best.get(args.peer)
    lengths = [r.max_tokens for r in requests]
    record = {
        "model": MODEL,
        "workload": {"num_requests": n, "min_tokens": lo, "max_tokens": hi, "seed": args.seed,
                     "output_tokens_median": float(np.median(lengths)), "output_tokens_mean": float(np.mean(lengths)),
                     "output_lengths": "lognormal (sigma 1), clipped", "ignore_eos": True, "temperature": 0,
                     "arrivals": "Poisson: the same unit-rate arrivals divided by each rate", "stream": True,
                     "max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
                     "max_pending_requests": args.max_pending_requests},
        "slo": {"ttft_s": args.slo_ttft, "tpot_s": args.slo_tpot},
        "rates": rates,
        "peer": args.peer,
        "transformers_serve": TRANSFORMERS_SERVE,
        "definitions": {
            "goodput": "requests finished with TTFT <= slo.ttft_s and TPOT <= slo.tpot_s, per second of the run",
            "knee": f"the highest rate with slo_attainment >= {KNEE_ATTAINMENT} (fraction of requests meeting both)",
            "tpot": "(e2e - ttft) / (output tokens - 1), per request",
            "itl": "gaps between streamed content chunks (a chunk may hold several tokens' text)",
            "duration_s": "wall time from the run's start (t = 0 of the arrivals) to its last response"},
        "systems": {name: {"rows": rows, "knee_rate": knees[name], "max_goodput": best[name]}
                    for name, rows in by_system.items()},
        "errors": errors,
        "max_goodput_ratio": ours / peer if ours is not None and peer else None,
        "wall_s": None,
    }
    if ours is not None and peer == 0:
        record["max_goodput_ratio_note"] = f"{args.peer} met the SLOs at no rate: the ratio is unbounded"
    record["wall_s"] = round(time.perf_counter() - wall_start, 1)
    dev = environment_info(device)["device"]
    fig = plot_load_curves(by_system, knees, args.slo_ttft, args.slo_tpot,
               f"SmolLM2-135M behind minillm's OpenAI server on {dev}, peer {args.peer}: {n} chat requests per rate, "
               f"Poisson arrivals, answers {lo}-{hi} tokens (heavy-tailed), max_num_seqs {args.max_num_seqs}; "
               f"SLO TTFT <= {args.slo_ttft:g} s, TPOT <= {args.slo_tpot * 1e3:g} ms; star = knee")
    for path in write_results("serve", record, fig, args.out, device):
        print(f"[serve] wrote {path}")
    for name in by_system:
        print(f"[serve] {name}: max goodput {best[name]} req/s, knee {knees[name]} req/s")
    if record["max_goodput_ratio"] is not None:
        print(f"[serve] max goodput minillm_continuous / {args.peer}: {record['max_goodput_ratio']:.2f}x")
    print(f"[serve] total wall time {record['wall_s']:.0f} s")
