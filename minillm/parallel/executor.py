"""The multi-process executor: rank 0 schedules and broadcasts each step; every rank runs the forward on its shard.

    rank 0 (this process)                            ranks 1..W-1 (spawned workers, or torchrun's processes)
    scheduler, BlockManager, sampler                  wait for a step
    prepare(out) -> packed ids, positions, slots,
        block tables  --- broadcast (one tensor) -->  rebuild the step's metadata
    forward on shard 0  <--- all-reduces, all-gather --->  forward on shard r (own KV pool: own heads)
    sample from the full logits                       drop the logits

That is vLLM's and nano-vllm's design: one scheduler, so the ranks can never disagree about what runs, and every
rank's paged pool holds the same blocks at the same ids (only its own KV heads in them), so the block tables and
slot mappings of rank 0's ``BlockManager`` are valid everywhere. Everything travels through ``torch.distributed``
(gloo on a CPU, NCCL on GPUs): the step plan as one int64 tensor, preceded by a fixed-size header that says how
long it is.

Lifecycle. ``TensorParallelExecutor`` spawns the workers (or, under ``torchrun``, joins the processes it started),
and ``shutdown()`` ends them: it is called by ``LLM.close()``, at interpreter exit, and after any failed step. A
worker that dies makes rank 0's next collective fail at once ("connection closed"), and rank 0 then raises an error
naming the rank and its exit code, and ends the other workers: no process is left behind. Ctrl-C during a step is
held until the step ends (the ranks are in the middle of collectives that must all complete), then delivered (the
default handler raises KeyboardInterrupt), so the engine stays usable; the caller's requests are aborted as usual.
"""

from __future__ import annotations

import datetime
import os
import signal
import socket
import threading
import time
import traceback
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from minillm.attention.backends import PagedAttention, PagedMetadata, resolve_kernel
from minillm.parallel.comm import COUNTERS
from minillm.parallel.heads import check_head_split
from minillm.parallel.shard import build_shard, checkpoint_reader, checkpoint_source, plan_shards

BACKENDS = ("gloo", "nccl")
HEADER = 8  # int64s: kind, then the sizes of the payload's parts
STEP, SHUTDOWN = 1, 2
JOIN_TIMEOUT = datetime.timedelta(minutes=5)  # for every process to start, load and meet (spawn imports torch)
IDLE_TIMEOUT = datetime.timedelta(days=7)  # workers wait this long for the next step; a crash is seen at once


def check_backend(backend: str | None, device: torch.device, world_size: int) -> str:
    """The collective library for `device` (None: NCCL on CUDA, gloo on a CPU), refused before any process starts."""
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    if backend not in BACKENDS:
        raise ValueError(f"unknown distributed_backend {backend!r}; choose one of {BACKENDS} (or None)")
    if not dist.is_available():
        raise RuntimeError("this PyTorch build has no torch.distributed; tensor parallelism needs it")
    if backend == "nccl":
        if device.type != "cuda":
            raise ValueError(f"distributed_backend='nccl' needs CUDA devices, but the model runs on {device}; "
                             "use 'gloo' on a CPU")
        if not dist.is_nccl_available():
            raise RuntimeError("this PyTorch build has no NCCL; use distributed_backend='gloo'")
        if torch.cuda.device_count() < world_size:
            raise ValueError(f"tensor_parallel_size={world_size} needs {world_size} GPUs (one per rank); "
                             f"this machine has {torch.cuda.device_count()}")
    if backend == "gloo" and not dist.is_gloo_available():
        raise RuntimeError("this PyTorch build has no gloo backend")
    return backend


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ
                                                    and "MASTER_ADDR" in os.environ)


def rank_device(device: torch.device, rank: int) -> torch.device:
    return torch.device("cuda", rank) if device.type == "cuda" else device


# ---------------------------------------------------------------------------------------------------------------
# The step plan as tensors


def pack_step(copies: list[tuple[int, int]], inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """One step's copy-on-write pairs and model inputs (``StepInputs``) -> header (HEADER,), payload (L,) int64."""
    m = inputs.metadata
    num_seqs, max_blocks = m.block_tables.shape
    device = m.block_tables.device
    host = torch.tensor([x for pair in copies for x in pair] + m.query_lens_host + m.context_lens_host,
                        dtype=torch.int64).to(device)
    payload = torch.cat([host, inputs.input_ids.view(-1), inputs.positions.view(-1), m.slot_mapping,
                         m.block_tables.view(-1).long(), inputs.logits_at])  # (L,)
    N = inputs.input_ids.numel()
    sizes = [STEP, len(copies), N, num_seqs, max_blocks, inputs.logits_at.numel(), payload.numel(), 0]
    return torch.tensor(sizes, dtype=torch.int64, device=device), payload


def unpack_step(header: list[int], payload: torch.Tensor, block_size: int):
    """The inverse of `pack_step` -> (copies, input_ids (1, N), positions (1, N), PagedMetadata, logits_at (K,))."""
    _, num_copies, N, S, B, K, _, _ = header
    cut = [2 * num_copies, S, S, N, N, N, S * B, K]
    pairs, query_lens, context_lens, ids, pos, slots, tables, logits_at = payload.split(cut)
    pairs = pairs.tolist()
    copies = list(zip(pairs[0::2], pairs[1::2]))
    metadata = PagedMetadata.build(slots.tolist(), query_lens.tolist(), context_lens.tolist(),
                                   tables.view(S, B).tolist(), block_size, payload.device)
    return copies, ids.view(1, N), pos.view(1, N), metadata, logits_at


class BroadcastingPagedAttention(PagedAttention):
    """Rank 0's paged attention: after preparing a step it sends the plan to the workers, which run it too."""

    def __init__(self, cache, block_manager, kernel: str, executor: TensorParallelExecutor):
        super().__init__(cache, block_manager, kernel)
        self.executor = executor

    def prepare(self, out):
        inputs = super().prepare(out)
        self.executor.broadcast_step(out.copies, inputs)
        return inputs

    def start_run(self) -> None:
        super().start_run()
        COUNTERS.reset()  # stats() describes the last run: its collectives too


# ---------------------------------------------------------------------------------------------------------------
# Workers


def serve_steps(model, cache, kernel: str, block_size: int, group, comm_device: torch.device) -> None:
    """A worker's loop: receive a step, run this rank's forward on it (its logits are dropped), until shutdown."""
    attention = PagedAttention(cache, None, kernel)
    header = torch.empty(HEADER, dtype=torch.int64, device=comm_device)
    while True:
        dist.broadcast(header, src=0, group=group)
        sizes = header.tolist()
        if sizes[0] == SHUTDOWN:
            return
        payload = torch.empty(sizes[6], dtype=torch.int64, device=comm_device)
        dist.broadcast(payload, src=0, group=group)
        copies, ids, pos, metadata, logits_at = unpack_step(sizes, payload, block_size)
        cache.copy_blocks(copies)
        with torch.no_grad():
            model(ids, pos, attention, metadata, logits_at=logits_at)


def worker_main(rank: int, world_size: int, port: int, backend: str, threads: int, job, job_args: tuple) -> None:
    """Entry point of a spawned worker: meet the others through rank 0's key-value store, then run
    ``job(rank, world_size, group, *job_args)`` (``run_worker`` for an LLM's workers)."""
    try:
        if threads:
            torch.set_num_threads(threads)
        if backend == "nccl":
            torch.cuda.set_device(rank)  # before NCCL starts: each rank owns one GPU (one node: GPU r for rank r)
        store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False, timeout=JOIN_TIMEOUT)
        store.add("joined", 1)  # rank 0 waits for this count, watching for workers that die first
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=IDLE_TIMEOUT)
        job(rank, world_size, dist.group.WORLD, *job_args)
    except Exception:
        traceback.print_exc()
        os._exit(1)  # at once: rank 0's next collective fails with "connection closed" and reports this rank
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn_workers(world_size: int, backend: str, threads: int, job, job_args: tuple) -> list:
    """Start ranks 1..W-1 (each runs `job` in `worker_main`) and meet them as rank 0: a TCP key-value store on
    127.0.0.1 where each worker checks in, then ``init_process_group`` on it. Raises, with no worker left running,
    when one dies before checking in."""
    port = _free_port()
    store = dist.TCPStore("127.0.0.1", port, world_size, is_master=True, wait_for_workers=False, timeout=JOIN_TIMEOUT)
    context = mp.get_context("spawn")  # a fresh interpreter: fork would copy this process's threads and locks
    workers = []
    for rank in range(1, world_size):
        worker = context.Process(target=worker_main, args=(rank, world_size, port, backend, threads, job, job_args),
                                 name=f"minillm-tp-rank{rank}", daemon=True)
        worker.start()
        workers.append(worker)
    deadline = time.monotonic() + JOIN_TIMEOUT.total_seconds()
    while store.add("joined", 0) < world_size - 1:  # watch for a worker that dies before checking in
        exits = worker_exits(workers)
        if exits or time.monotonic() > deadline:
            end_workers(workers)
            raise RuntimeError(f"the tensor-parallel workers did not start: {exits or 'timed out'}. A script that "
                               "creates the LLM at import time needs `if __name__ == '__main__':` (the workers are "
                               "spawned: they import the main module)")
        time.sleep(0.05)
    dist.init_process_group(backend, store=store, rank=0, world_size=world_size, timeout=IDLE_TIMEOUT)
    return workers


def worker_exits(workers: list, wait: float = 0.0) -> str:
    """'worker rank r (pid p) exited with code c' for each worker that has died, '' when none has."""
    dead = []
    for rank, worker in enumerate(workers, start=1):
        worker.join(timeout=wait if worker.is_alive() else 0)
        if worker.exitcode not in (None, 0):
            dead.append(f"worker rank {rank} (pid {worker.pid}) exited with code {worker.exitcode}")
    return "; ".join(dead)


def end_workers(workers: list) -> None:
    """Terminate, then kill, whatever is still running."""
    for worker in workers:
        if worker.is_alive():
            worker.terminate()
            worker.join(timeout=5)
        if worker.is_alive():
            worker.kill()
            worker.join()


def run_worker(rank: int, world_size: int, group, options: dict) -> None:
    from minillm.kvcache.paged import PagedKVCache
    from minillm.kvcache.paged_int8 import Int8PagedKVCache

    device = rank_device(torch.device(options["device"]), rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    config, files, prefix, _ = checkpoint_source(options["model"])
    shard = plan_shards(config, world_size)[rank]
    model = build_shard(config, checkpoint_reader(files, prefix), shard, group, device, options["dtype"])
    sizes = torch.empty(1, dtype=torch.int64, device=device)
    dist.broadcast(sizes, src=0, group=group)  # rank 0 sized its pool; every rank holds the same block ids
    cfg = model.config
    cache_cls = Int8PagedKVCache if options["kv_cache_dtype"] == "int8" else PagedKVCache
    cache = cache_cls(cfg.num_layers, int(sizes.item()), options["block_size"], cfg.num_kv_heads, cfg.head_dim,
                      dtype=options["dtype"], device=device)
    serve_steps(model, cache, options["kernel"], options["block_size"], group, device)


# ---------------------------------------------------------------------------------------------------------------
# Rank 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _interrupts_after_step():
    """Hold a Ctrl-C until the block ends, then hand it to the handler it was meant for (usually: raise
    KeyboardInterrupt). Only the main thread receives signals; a process that ignores SIGINT keeps ignoring it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.SIG_IGN:
        yield
        return
    received = []
    signal.signal(signal.SIGINT, lambda *_: received.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        if callable(previous):
            previous(signal.SIGINT, None)  # the default handler raises KeyboardInterrupt
        else:
            raise KeyboardInterrupt


class TensorParallelExecutor:
    """Starts W - 1 workers, builds rank 0's shard, broadcasts steps, and ends everything in `shutdown`.

    Spawned workers by default; under ``torchrun`` (its environment variables set, ``WORLD_SIZE`` = the tensor
    parallel size) this process is one of torchrun's, and ranks > 0 serve steps inside ``join_as_worker``.
    """

    def __init__(self, model: str, world_size: int, device: torch.device, dtype: torch.dtype, backend: str | None,
                 attention_backend: str, block_size: int, kv_cache_dtype: str | None):
        if not isinstance(model, (str, os.PathLike)):
            raise TypeError("tensor_parallel_size > 1 needs the model's name or path (every rank loads its own "
                            f"slice of the weights), not a {type(model).__name__}")
        self.world_size, self.device = world_size, device
        self.backend = check_backend(backend, device, world_size)
        self.config, files, prefix, self.tokenizer = checkpoint_source(str(model))
        check_head_split(self.config.num_heads, self.config.num_kv_heads, world_size)  # before any process starts
        self.shards = plan_shards(self.config, world_size)
        kernel = resolve_kernel(attention_backend, device, self.config.head_dim, dtype)
        self.torchrun = launched_by_torchrun()
        if dist.is_initialized() and not self.torchrun:
            raise RuntimeError("torch.distributed is already initialized in this process (another tensor-parallel "
                               "LLM that is still open?); call its close() first")
        threads = max(1, (os.cpu_count() or 1) // world_size) if device.type == "cpu" else 0
        self.options = {"backend": self.backend, "model": str(model), "device": str(device), "dtype": dtype,
                        "kernel": kernel, "block_size": block_size, "kv_cache_dtype": kv_cache_dtype,
                        "threads": 0 if self.torchrun else threads}
        self.workers: list = []
        self.failure: str | None = None
        self._threads_before = torch.get_num_threads()
        self._serving = False  # True once the workers wait for steps (a polite shutdown needs that)
        self.closed = False  # shutdown ran (it runs once: a second call must not end another LLM's group)
        if self.torchrun:
            if int(os.environ["WORLD_SIZE"]) != world_size:
                raise ValueError(f"tensor_parallel_size={world_size} but torchrun started {os.environ['WORLD_SIZE']} "
                                 "processes; they must match")
            self.rank = int(os.environ["RANK"])
            if not dist.is_initialized():
                dist.init_process_group(self.backend, init_method="env://", timeout=IDLE_TIMEOUT)
        else:
            self.rank = 0
            self.workers = spawn_workers(world_size, self.backend, self.options["threads"], run_worker,
                                         (self.options,))
            if threads:
                torch.set_num_threads(threads)  # W ranks share this machine's cores
        self.group = dist.group.WORLD
        if self.rank == 0:
            try:
                self.model = build_shard(self.config, checkpoint_reader(files, prefix), self.shards[0], self.group,
                                         device, dtype)
            except BaseException:
                self.shutdown()
                raise

    # -- rank 0 --------------------------------------------------------------------------------------------------
    def attach(self, engine) -> None:
        """Size the workers' pools like rank 0's and make the engine broadcast every step it prepares."""
        sizes = torch.tensor([engine.block_manager.num_blocks], dtype=torch.int64, device=self.device)
        with self.step():
            dist.broadcast(sizes, src=0, group=self.group)
        self._serving = True
        old = engine.attention
        engine.attention = BroadcastingPagedAttention(old.cache, old.block_manager, old.kernel, self)

    def broadcast_step(self, copies, inputs) -> None:
        header, payload = pack_step(copies, inputs)
        dist.broadcast(header, src=0, group=self.group)
        dist.broadcast(payload, src=0, group=self.group)

    @contextmanager
    def step(self):
        """Around every engine step: refuse when the workers are gone; after a failure, end them and say why."""
        if self.failure is not None:
            raise RuntimeError(f"the tensor-parallel workers were shut down ({self.failure}); create a new LLM")
        try:
            with _interrupts_after_step():
                yield
        except KeyboardInterrupt:
            raise  # held until the step ended: every rank finished it, nothing to clean up
        except BaseException as err:
            exits = worker_exits(self.workers, wait=2.0)
            self.failure = exits or f"{type(err).__name__} in a step: {err}"
            self.shutdown()
            if exits:
                raise RuntimeError(f"tensor-parallel {exits}; its traceback is above. The other workers were "
                                   "shut down; create a new LLM") from err
            raise

    def stats(self) -> dict:
        return {"world_size": self.world_size, "backend": self.backend, "rank0_threads": torch.get_num_threads(),
                "heads": [{"rank": s.rank, "q_heads": list(s.heads.q_heads), "kv_heads": list(s.heads.kv_heads)}
                          for s in self.shards],
                "communication": COUNTERS.as_dict(), "failure": self.failure}

    def shutdown(self) -> None:
        """Tell the workers to stop (if they can still hear it), wait for them, and leave no process behind."""
        if self.rank != 0 or self.closed:
            return
        self.closed = True
        if self.failure is None and self._serving:
            try:
                header = torch.zeros(HEADER, dtype=torch.int64, device=self.device)
                header[0] = SHUTDOWN
                dist.broadcast(header, src=0, group=self.group)
            except Exception:  # a worker already gone: ending the rest below is all that is left
                pass
        self.failure = self.failure or "closed"
        for worker in self.workers:
            worker.join(timeout=10)
        end_workers(self.workers)
        dist.destroy_process_group()
        torch.set_num_threads(self._threads_before)

    # -- torchrun's ranks > 0 ------------------------------------------------------------------------------------
    def join_as_worker(self) -> None:
        """Serve rank 0's steps until it shuts down (torchrun only; returns when rank 0 closes its LLM)."""
        try:
            run_worker(self.rank, self.world_size, self.group, self.options)
        finally:
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------------
# One forward pass, no engine: the layers' parity check (tests, notebook 11)


def _forward_job(rank: int, world_size: int, group, model: str, input_ids: torch.Tensor) -> torch.Tensor:
    config, files, prefix, _ = checkpoint_source(model)
    shard = build_shard(config, checkpoint_reader(files, prefix), plan_shards(config, world_size)[rank], group)
    with torch.no_grad():
        return shard(input_ids)  # (B, T, V) on every rank: the LM head all-gathers


def sharded_forward(model: str, world_size: int, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, V) of `input_ids` (B, T) with the model split over `world_size` CPU processes (gloo), no cache."""
    if dist.is_initialized():
        raise RuntimeError("torch.distributed is already initialized in this process; close the tensor-parallel LLM "
                           "first")
    check_head_split(*_head_counts(model), world_size)
    threads_before = torch.get_num_threads()
    threads = max(1, (os.cpu_count() or 1) // world_size)
    workers = spawn_workers(world_size, "gloo", threads, _forward_job, (model, input_ids))
    try:
        torch.set_num_threads(threads)
        return _forward_job(0, world_size, dist.group.WORLD, model, input_ids)
    finally:
        for worker in workers:
            worker.join(timeout=30)
        end_workers(workers)
        dist.destroy_process_group()
        torch.set_num_threads(threads_before)


def _head_counts(model: str) -> tuple[int, int]:
    config = checkpoint_source(model)[0]
    return config.num_heads, config.num_kv_heads
