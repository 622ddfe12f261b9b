"""Tensor parallelism across processes (gloo on this CPU): the engine at world size 2 and 3 against one process.

Each LLM here spawns workers that load their slice of SmolLM2-135M: a few seconds each, so the LLMs are shared by
module-scoped fixtures and the runs are short.
"""

import multiprocessing
import os
import signal

import pytest
import torch
import torch.distributed as dist

import minillm
from minillm import SamplingParams
from minillm.parallel.executor import sharded_forward

pytestmark = pytest.mark.slow

SYSTEM = "You are a concise assistant. Answer in one short sentence. "
PROMPTS = [SYSTEM + "What is the capital of France?", "def add(a, b):", SYSTEM + "Name a prime number.",
           "Once upon a time", SYSTEM + "What color is the sky?"]
# More requests than slots (continuous batching), chunked prefill, a shared prefix (prefix caching), and a pool
# small enough that sequences are preempted and recomputed.
ENGINE = dict(max_num_seqs=3, max_num_batched_tokens=24, num_kv_blocks=8, block_size=8)
PARAMS = SamplingParams(max_tokens=16, ignore_eos=True)


def test_logits_match_the_dense_model(smollm):
    model, tok = smollm
    ids = torch.tensor([tok("The quick brown fox jumps over the lazy dog").input_ids])
    logits = sharded_forward("smollm2-135m", 2, ids)
    assert (logits - model(ids)).abs().max() < 1e-3  # fp32, summed in another order


def test_a_dead_worker_raises_and_leaves_nothing_behind():
    llm = minillm.LLM("smollm2-135m", tensor_parallel_size=2, max_num_seqs=2, num_kv_blocks=16)
    worker = llm._tp.workers[0]
    os.kill(worker.pid, signal.SIGKILL)
    worker.join(timeout=10)
    with pytest.raises(RuntimeError, match=r"worker rank 1 \(pid \d+\) exited with code -9"):
        llm.generate("Hello", PARAMS)
    assert not multiprocessing.active_children() and not dist.is_initialized()
    assert not llm.engine.has_unfinished()  # the request was aborted
    with pytest.raises(RuntimeError, match="workers were shut down"):
        llm.generate("Hello", PARAMS)


def test_a_failed_construction_ends_its_workers():
    with pytest.raises(ValueError, match="num_kv_blocks"):  # refused by the engine, after the workers started
        minillm.LLM("smollm2-135m", tensor_parallel_size=2, num_kv_blocks=0)
    assert not multiprocessing.active_children() and not dist.is_initialized()


def test_torchrun_runs_the_same_engine():
    import subprocess
    import sys
    from pathlib import Path

    torchrun = Path(sys.executable).with_name("torchrun")
    result = subprocess.run([str(torchrun), "--nproc-per-node", "2", "-m", "minillm.parallel", "--max-tokens", "4",
                             "What is 2+2?"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "2 ranks (gloo)" in result.stdout and "> What is 2+2?" in result.stdout


def test_bad_configurations_are_refused_before_any_process_starts():
    cases = [
        (dict(tensor_parallel_size=10), ValueError, "larger than the model's 9 query heads"),
        (dict(tensor_parallel_size=2, distributed_backend="nccl"), ValueError, "needs CUDA devices"),
        (dict(tensor_parallel_size=2, kv_cache="contiguous"), ValueError, "does not combine with kv_cache"),
        (dict(tensor_parallel_size=2, quantization="int8"), ValueError, "does not combine with quantization"),
        (dict(tensor_parallel_size=0), ValueError, "positive int"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            minillm.LLM("smollm2-135m", **kwargs)
        assert not multiprocessing.active_children()
    model, tok = minillm.load_model("smollm2-135m")
    with pytest.raises(TypeError, match="name or path"):
        minillm.LLM(model, tokenizer=tok, tensor_parallel_size=2)


# The module-scoped LLMs last: while one is open, this process cannot start another process group.
@pytest.fixture(scope="module")
def single():
    llm = minillm.LLM("smollm2-135m", **ENGINE)
    outs = llm.generate(PROMPTS, PARAMS)
    return [o.token_ids for o in outs], llm.stats()


@pytest.fixture(scope="module", params=[2, 3])
def parallel(request):
    llm = minillm.LLM("smollm2-135m", tensor_parallel_size=request.param, **ENGINE)
    yield llm
    llm.close()
    assert not any(w.is_alive() for w in llm._tp.workers) and not dist.is_initialized()


def test_greedy_tokens_equal_one_process(single, parallel):
    tokens, stats = single
    outs = parallel.generate(PROMPTS, PARAMS)
    assert [o.token_ids for o in outs] == tokens
    tp = parallel.stats()
    assert stats["num_preemptions"] > 0 and tp["num_preemptions"] == stats["num_preemptions"]
    assert tp["prefix_cache_hit_rate"] > 0
    comm = tp["tensor_parallel"]["communication"]
    assert comm["all_reduce_calls"] == tp["num_steps"] * (2 * 30 + 1)  # two per layer and the embedding's
    assert comm["all_gather_calls"] == tp["num_steps"]  # the LM head's logits


def test_stream_dropped_early_leaves_the_engine_usable(single, parallel):
    stream = parallel.stream(PROMPTS[1], PARAMS)
    next(stream)
    stream.close()  # aborts its request on every rank's behalf: only rank 0 holds requests
    assert not parallel.engine.has_unfinished()
    assert parallel.generate(PROMPTS[1], PARAMS)[0].token_ids == single[0][1]
