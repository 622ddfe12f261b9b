"""``python -m minillm.gpu_check``: the GPU tests and every benchmark as one command that ends inside a time budget.

A GPU is lent for one short session with a hard limit, so everything that needs one runs here, in order, each stage
in a subprocess with a time limit (a stage that overruns is killed with its children, reported as "timeout", and the
run goes on):
  1. environment: ``minillm.doctor()`` (device, compute capability, memory, torch/triton/transformers versions), the
     CUDA version, the git commit and whether tracked files changed since it;
  2. tests: ``pytest -m gpu -x``;
  3. every benchmark topic, ``python -m minillm.bench <topic>``, at GPU sizes (``TOPICS``), each writing its own
     ``<topic>-<device>.json`` and ``.png`` into ``--out`` (default ``benchmarks/results``);
  4. the summary: ``gpu-check-<device>.json`` next to them (environment, each stage's status and time, each topic's
     headline ratios against its peer, read back from the topic's JSON), ``gpu-check-<device>.log`` (every stage's
     output), and a one-screen table.
The budget (``--budget-s``, 420 s: with start-up and the summary a run stays under 8 minutes) is shared out by each
stage's ``share_s``: a stage may use its share of what is left, so time one stage does not use goes to the stages
after it; the engine benchmark, the longest and least predictable, runs last to get all of that slack.

``--dry-run`` (or ``MINILLM_GPU_CHECK=cpu``) runs the same stages the same way on the CPU at tiny sizes, into a
temporary folder unless ``--out`` is given. CI runs it (tests/test_gpu_check.py), so that this command still works
on the day a GPU is lent. ``make gpu-check`` and ``make gpu-check-dry-run`` call it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from minillm.bench.common import DEFAULT_OUT_DIR, device_name, device_slug
from minillm.bench.headlines import HEADLINES, key_numbers
from minillm.doctor import doctor

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BUDGET_S = 420.0
MIN_STAGE_S = 1.0  # less than this left for a stage: not worth starting an interpreter
# pyproject's addopts already has -q; one more would drop the "3 passed, 1 skipped" line the summary reads.
GPU_TESTS = ("-m", "gpu", "-x")
DRY_RUN_TESTS = ("-x", "tests/test_bench_engine.py")  # two fast CPU tests: the same invocation, tiny


@dataclass(frozen=True)
class TopicPlan:
    """How one benchmark topic runs: its options on a GPU and in the dry run, its share of the default budget."""

    gpu: tuple[str, ...]
    cpu: tuple[str, ...]
    share_s: float


# Shares are seconds of the default budget (with these two they add up to it). On a GPU a topic runs at its own GPU
# defaults (real sizes) unless options are listed; the dry run takes the smallest sizes that still go through every
# code path of the topic that runs on a CPU.
ENVIRONMENT_SHARE_S = 20.0  # a cold machine's first CUDA initialization can take seconds
TESTS_SHARE_S = 95.0  # collecting the whole suite, then dozens of Triton kernel variants compiled from cold
TOPICS: dict[str, TopicPlan] = {
    "roofline": TopicPlan((), ("--size", "256", "--nbytes", str(1 << 20), "--rounds", "1"), 25.0),
    "attention": TopicPlan(
        (), ("--seq-lens", "64", "--head-dims", "32", "--num-heads", "2", "--tokens-per-batch", "64"), 25.0
    ),
    "kvcache": TopicPlan((), ("--contexts", "8", "16"), 15.0),
    "paged": TopicPlan((), ("--context-lens", "32", "--batch", "2", "--heads", "4", "2", "--head-dim", "32"), 30.0),
    "quant": TopicPlan((), ("--sizes", "64x128", "--batches", "1,2"), 15.0),
    "prune": TopicPlan((), ("--tokens", "16", "--decode-layers", "1", "--batch-size", "1", "--new-tokens", "2"), 20.0),
    # The benchmark's own GPU default (both students, 300 steps of 8 x 512, two losses each) is a run of minutes:
    # here one student and a short curve, enough to see logit distillation pull ahead of next-token training.
    "distill": TopicPlan(
        ("--students", "depth", "--steps", "100", "--batch-size", "8", "--seq-len", "256", "--corpus-samples", "2"),
        ("--students", "depth", "--drop-layers", "28", "--steps", "2", "--batch-size", "1", "--seq-len", "16",
         "--eval-every", "1", "--eval-tokens", "64", "--corpus-samples", "1", "--corpus-tokens", "4"),
        30.0,
    ),
    # The benchmark's GPU default (8 requests of 256 tokens, k up to 8, both proposers) takes minutes: here prompt
    # lookup alone at k = 1 and 4 on two requests, enough for the batch-1 and batch-8 speedups on both workloads. The
    # dry run: one k, one repeat, batch 1 (more overran an 88 s limit on a slow 2-core CI machine: every
    # configuration builds engines and a draft model, 10-15 s each there).
    "spec": TopicPlan(
        ("--proposers", "ngram", "--k", "1", "4", "--prompts", "2", "--max-tokens", "96", "--repeats", "2"),
        ("--workloads", "repetitive", "--k", "2", "--batches", "1", "--prompts", "1", "--max-tokens", "4",
         "--draft-layers", "1", "--adaptive-k", "2", "--repeats", "1"),
        55.0,
    ),
    # On a GPU four batch sizes and 128 tokens: eager against CUDA graphs and transformers, batch 1 to 64 against the
    # roofline. The dry run takes the eager engine alone (the compiled CPU path has its own test: it compiles for
    # tens of seconds).
    "decode": TopicPlan(
        ("--max-tokens", "128", "--batch-sizes", "1,4,16,64", "--repeats", "2"),
        ("--max-tokens", "3", "--batch-sizes", "1", "--repeats", "1", "--peers", "minillm_eager"),
        35.0,
    ),
    # Tensor parallelism needs >= 2 GPUs: on one GPU the topic only records why it skipped; on several, W = 1 and 2
    # at the quick size. The dry run: W = 1 on the CPU, a few tokens (tests/test_bench_tp.py runs W = 2).
    "tp": TopicPlan(("--quick", "--world-sizes", "1,2"), ("--quick", "--world-sizes", "1"), 10.0),
    # On a GPU 48 requests at 8 and 32 req/s (the benchmark's own default, 200 requests at five rates, is minutes of
    # Poisson arrivals per system); the dry run: the quick size with 3 requests, both systems, two rates.
    "serve": TopicPlan(("--num-requests", "48", "--rates", "8,32"), ("--quick", "--num-requests", "3"), 20.0),
    # On a GPU half the default 256 requests (still 64 sequences per step, lengths 64..512): four systems serve the
    # workload one after another, and at 256 transformers' two alone could take minutes. The dry run leaves out
    # transformers' peers, whose model load doubles its time; the engine benchmark's own CPU run covers them.
    "engine": TopicPlan(
        ("--num-requests", "128"),
        ("--num-requests", "4", "--min-len", "4", "--max-len", "8", "--max-num-seqs", "2", "--repeats", "1",
         "--peers", "minillm_continuous,minillm_static"),
        25.0,
    ),
}


@dataclass(frozen=True)
class Stage:
    name: str
    kind: str  # "environment", "tests" or "topic": what the summary reads back after it
    argv: tuple[str, ...]
    share_s: float
    cwd: Path | None = None
    skip: str | None = None  # why it cannot run here, if it cannot


@dataclass(frozen=True)
class StageResult:
    status: str  # ok, failed, timeout or skipped
    seconds: float
    time_limit_s: float
    started: float  # time.time(), to tell a file the stage wrote from one an earlier run left
    reason: str | None = None
    output: str = ""  # what it printed, progress bars reduced to their last state


def plan(dry_run: bool, out: Path, facts_file: Path) -> list[Stage]:
    """The stages of a run, in order: environment, tests, then every topic in TOPICS' order."""
    python, device = sys.executable, "cpu" if dry_run else "cuda"
    facts = "import sys; from minillm.gpu_check import write_environment; write_environment(*sys.argv[1:])"
    stages = [Stage("environment", "environment", (python, "-c", facts, device, str(facts_file)), ENVIRONMENT_SHARE_S)]
    stages.append(Stage(
        "tests", "tests", (python, "-m", "pytest", *(DRY_RUN_TESTS if dry_run else GPU_TESTS)), TESTS_SHARE_S,
        cwd=ROOT, skip=None if (ROOT / "tests").is_dir() else "no tests/ folder: minillm is installed, not a checkout",
    ))
    for topic, p in TOPICS.items():
        options = p.cpu if dry_run else p.gpu
        argv = (python, "-m", "minillm.bench", topic, "--out", str(out), "--device", device, *options)
        stages.append(Stage(topic, "topic", argv, p.share_s))
    return stages


def command(stage: Stage) -> str:
    return shlex.join(("python", *stage.argv[1:]))  # no interpreter path: it names the machine


def run_stage(stage: Stage, time_limit_s: float, log: Path) -> StageResult:
    """Run one stage's command, its output appended to `log`; after `time_limit_s` kill it and its children."""
    with log.open("a") as f:
        f.write(f"\n===== {stage.name}: {command(stage)} (limit {time_limit_s:.0f} s)\n")
    offset = log.stat().st_size
    started, t0 = time.time(), time.monotonic()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg"}  # a killed stage's log is complete; no windows
    with log.open("a") as f:
        # A session of its own, so that a timeout also kills what the stage started (Triton's compiler, workers).
        proc = subprocess.Popen(stage.argv, cwd=stage.cwd, stdout=f, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            returncode = proc.wait(timeout=time_limit_s)
        except subprocess.TimeoutExpired:
            returncode = None
        finally:  # also on Ctrl-C, which never reaches a child in its own session
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    seconds = time.monotonic() - t0
    with log.open("rb") as f:
        f.seek(offset)
        output = "\n".join(line.rsplit("\r", 1)[-1] for line in f.read().decode(errors="replace").splitlines())
    if returncode is None:
        reason = f"killed at its {time_limit_s:.0f} s limit"
        return StageResult("timeout", seconds, time_limit_s, started, reason, output)
    if returncode != 0:
        return StageResult("failed", seconds, time_limit_s, started, f"exit status {returncode}", output)
    return StageResult("ok", seconds, time_limit_s, started, None, output)


def run_stages(stages: list[Stage], budget_s: float, log: Path) -> list[StageResult]:
    """Run every stage within `budget_s` seconds in all (shares: module doc), printing a line per stage."""
    deadline = time.monotonic() + budget_s
    results = []
    for i, stage in enumerate(stages):
        limit = max(0.0, deadline - time.monotonic()) * stage.share_s / sum(s.share_s for s in stages[i:])
        print(f"[{i + 1}/{len(stages)}] {stage.name:<12}", end=" ", flush=True)
        if stage.skip:
            result = StageResult("skipped", 0.0, limit, time.time(), stage.skip)
        elif limit < MIN_STAGE_S:
            result = StageResult("timeout", 0.0, limit, time.time(), "the budget was spent before it started")
        else:
            print(f"(limit {limit:.0f} s) ...", end=" ", flush=True)
            result = run_stage(stage, limit, log)
        print(f"{result.status} {result.seconds:.1f} s" + (f": {result.reason}" if result.reason else ""), flush=True)
        if result.status in ("failed", "timeout") and result.output:
            print(textwrap.indent("\n".join(result.output.splitlines()[-10:]), "    | "), flush=True)
        results.append(result)
    return results


# ---------------------------------------------------------------- environment (a stage: runs in its own subprocess)


def git_state() -> dict[str, Any]:
    """The checkout's commit and whether tracked files differ from it; None for both outside a git checkout."""
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}  # `git status` must not take the index lock from someone else
    try:
        head, status = (
            subprocess.run(["git", *args], check=False, cwd=ROOT, capture_output=True, text=True, timeout=30, env=env)
            for args in (["rev-parse", "HEAD"], ["status", "--porcelain", "--untracked-files=no"])
        )
    except (OSError, subprocess.TimeoutExpired):
        return {"git_commit": None, "git_dirty": None}
    if head.returncode != 0:
        return {"git_commit": None, "git_dirty": None}
    return {"git_commit": head.stdout.strip(), "git_dirty": bool(status.stdout.strip())}


def write_environment(device: str, path: str) -> None:
    """Write what this run ran on to `path` (JSON): doctor()'s report, the benchmark device and its file-name slug,
    the CUDA version and git_state(). A stage does this, so that the parent process never holds a CUDA context."""
    facts = doctor()
    facts.update(bench_device=device_name(device), device_slug=device_slug(device), cuda=torch.version.cuda)
    facts.update(git_state())
    Path(path).write_text(json.dumps(facts, indent=2, default=str) + "\n")


def describe(env: dict[str, Any]) -> str:
    device = env["bench_device"]
    if env.get("compute_capability"):
        device += f" (compute capability {env['compute_capability']}, {env['memory_gib']} GiB)"
    commit = (env["git_commit"] or "?")[:10] + (" + local changes" if env["git_dirty"] else "")
    versions = f"torch {env['torch']}, triton {env['triton']}, transformers {env['transformers']}"
    return f"{device}; {versions}; commit {commit}"


def read_topic(out: Path, topic: str, since: float) -> tuple[dict[str, Any], str | None]:
    """The results file `topic` wrote after `since` and its headline, or what is wrong with it."""
    fresh = [p for p in out.glob(f"{topic}-*.json") if p.stat().st_mtime >= since]
    if not fresh:
        return {}, f"exited 0 but wrote no {topic}-<device>.json"
    path = max(fresh, key=lambda p: p.stat().st_mtime)
    try:
        headline = HEADLINES.get(topic, key_numbers)(json.loads(path.read_text())["results"])
    except (KeyError, IndexError, TypeError, ValueError, ZeroDivisionError) as e:  # the topic's JSON changed shape
        return {"results_file": path.name}, f"no headline in {path.name}: {type(e).__name__}: {e}"
    rounded = {k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in headline.items()}
    return {"results_file": path.name, "headline": rounded}, None


def pytest_counts(output: str) -> dict[str, int]:
    """pytest's closing line, "3 passed, 2 skipped, 98 deselected in 4.0s", as counts."""
    last = (output.splitlines() or [""])[-1]
    return {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected|x\w+)", last)}


def summarize(stages: list[Stage], results: list[StageResult], out: Path, env: dict, dry_run: bool,
              budget_s: float, total_s: float) -> dict[str, Any]:
    """The gpu-check JSON: the environment, then per stage its status, time, command and headline."""
    record: dict[str, Any] = {"dry_run": dry_run, "budget_s": budget_s, "total_s": round(total_s, 1),
                              "environment": env, "stages": {}}
    for stage, result in zip(stages, results):
        status, reason, found = result.status, result.reason, {}
        if status == "ok" and stage.kind == "topic":
            found, reason = read_topic(out, stage.name, result.started)
            status = "failed" if reason else status
        elif stage.kind == "tests" and result.output:
            found = {"headline": pytest_counts(result.output)}
        elif stage.kind == "environment" and env:
            found = {"headline": {"device": describe(env)}}
        record["stages"][stage.name] = {
            "status": status, "seconds": round(result.seconds, 1), "time_limit_s": round(result.time_limit_s, 1),
            "command": command(stage) if stage.kind != "environment" else "minillm.doctor() and git", **found,
            **({"reason": reason} if reason else {}),
            **({"output_tail": result.output.splitlines()[-20:]} if status in ("failed", "timeout") else {}),
        }
    return record


def table(record: dict[str, Any]) -> str:
    """One screen: a line per stage with its status, time and headline numbers (wrapped)."""
    lines = ["", f"{'stage':<12} {'status':<8} {'time':>7}  headline"]
    for name, s in record["stages"].items():
        numbers = [f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in s.get("headline", {}).items()]
        wrapped = textwrap.wrap("; ".join(filter(None, [s.get("reason"), *numbers])), 90) or [""]
        lines.append(f"{name:<12} {s['status']:<8} {s['seconds']:6.1f}s  {wrapped[0]}")
        lines += [" " * 31 + w for w in wrapped[1:]]
    lines.append(f"total {record['total_s']:.0f} s of a {record['budget_s']:.0f} s budget")
    return "\n".join(lines)


def check(stages: list[Stage], out: Path, budget_s: float, dry_run: bool, facts_file: Path) -> int:
    """Run the stages, write the summary JSON and log into `out`, print the table; 0 if nothing failed or timed out."""
    log = out / "gpu-check.log"
    log.write_text(f"minillm gpu-check, {time.strftime('%Y-%m-%d %H:%M:%S %z')}\n")
    t0 = time.monotonic()
    results = run_stages(stages, budget_s, log)
    env = json.loads(facts_file.read_text()) if facts_file.exists() else {}
    record = summarize(stages, results, out, env, dry_run, budget_s, time.monotonic() - t0)
    slug = env.get("device_slug") or ("cpu" if dry_run else "cuda")
    json_path = out / f"gpu-check-{slug}.json"
    json_path.write_text(json.dumps(record, indent=2) + "\n")
    log.replace(json_path.with_suffix(".log"))
    print(table(record))
    print(f"wrote {json_path} and {json_path.with_suffix('.log')}")
    return 1 if any(s["status"] in ("failed", "timeout") for s in record["stages"].values()) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m minillm.gpu_check",
        description="The GPU tests and every benchmark in one run that ends inside a time budget (see the module doc).",
    )
    parser.add_argument("--dry-run", action="store_true", help="on the CPU, tiny sizes (also: MINILLM_GPU_CHECK=cpu)")
    parser.add_argument("--out", default=None, help=f"results folder (default {DEFAULT_OUT_DIR}; a dry run: a new "
                                                    "temporary folder, so that it never replaces stored results)")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="seconds for all stages together")
    args = parser.parse_args(argv)
    mode = os.environ.get("MINILLM_GPU_CHECK", "")
    if mode not in ("", "cpu"):
        parser.error(f"MINILLM_GPU_CHECK={mode!r}: set it to 'cpu' (a dry run) or leave it unset")
    if args.budget_s <= 0:
        parser.error(f"--budget-s must be positive, got {args.budget_s}")
    dry_run = args.dry_run or mode == "cpu"
    if not dry_run and not torch.cuda.is_available():
        parser.error("no CUDA GPU here; --dry-run (or MINILLM_GPU_CHECK=cpu) runs the same stages on the CPU")
    if dry_run:
        # Its timings mean nothing, and on a busy machine torch's CPU threads wait on each other: one thread per
        # stage made a shared 2-core machine's dry run 3x faster (the engine stage 5x).
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    out = Path(args.out or (tempfile.mkdtemp(prefix="minillm-gpu-check-") if dry_run else DEFAULT_OUT_DIR))
    out.mkdir(parents=True, exist_ok=True)
    print(f"minillm gpu-check{' (dry run: CPU, tiny sizes)' if dry_run else ''}: results into {out}, "
          f"budget {args.budget_s:.0f} s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        facts_file = Path(tmp) / "environment.json"
        return check(plan(dry_run, out, facts_file), out, args.budget_s, dry_run, facts_file)


if __name__ == "__main__":
    sys.exit(main())
