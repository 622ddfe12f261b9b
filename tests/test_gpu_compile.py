"""Every Triton kernel compiled ahead of time for a T4, an A100, an A10 and an H100, on a machine without a GPU.

The other kernel tests run in Triton's CPU interpreter, which checks the algorithm but not the GPU: it has no shared
memory, no registers and no tensor cores. Triton compiles for a CUDA target without one, though, down to PTX and a
cubin (ptxas ships in its wheel): ``triton.compile(ASTSource(kernel, signature, constexprs, attrs),
target=GPUTarget("cuda", 80, 32))``. So this file asks each launcher's ``plan`` function what it would launch for
representative shapes (SmolLM2's heads and Llama's, fp16/bf16/fp32, decode and prefill) on sm75/80/86/90, keeps
the distinct specializations (what Triton's JIT would compile: many shapes share one), compiles each once per target
and checks that it compiles and that its shared memory fits the architecture (``_triton.MAX_SHARED_MEMORY``). The last
tests check that these plans are what the launchers launch.

The compiles run in worker processes that set TRITON_INTERPRET=0 before importing minillm (under the interpreter a
``@triton.jit`` function is not compilable), with a fresh Triton cache: a CI machine starts cold, and so does this.
That is also why this module imports minillm inside functions only: the workers import it to unpickle them.
"""

import contextlib
import importlib
import importlib.util
import io
import os
import re
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from itertools import product
from multiprocessing import get_context
from typing import NamedTuple

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")

TARGETS = (75, 80, 86, 90)  # T4, A100, A10 / RTX 3090 (99 KiB of shared memory, the least since sm80), H100
NUM_SMS = {75: 40, 80: 108, 86: 72, 90: 132}  # their SM counts, which set paged attention's split-K
MODELS = {"SmolLM2": (9, 3, 64), "Llama": (32, 8, 128)}  # H, Hkv, D
SMOLLM2, LLAMA = MODELS.values()
WIDTHS = {"SmolLM2": (576, 1536), "Llama": (4096, 14336)}  # C, I: model dim and MLP width, for the fused kernels
DTYPES = F16, B16, F32 = (torch.float16, torch.bfloat16, torch.float32)
QUANT_FORMATS = ((8, None), (4, 64), (4, 128))  # (bits, group size); int8 has one group per row
QUANT_SIZES = (576, 1536, 4096)  # K and N: SmolLM2's C and MLP width, Llama's C
NUM_WORKERS = 2

FLASH = "minillm.attention.flash._flash_attention_fwd_kernel"
PAGED = "minillm.attention.paged._paged_decode_kernel"
COMBINE = "minillm.attention.paged._paged_decode_combine_kernel"
STORE = "minillm.kvcache.store._store_kv_kernel"
GEMV = "minillm.quant.kernels._dequant_gemv_kernel"
GEMM = "minillm.quant.kernels._dequant_gemm_kernel"
ADD_RMSNORM = "minillm.fast.fused._add_rmsnorm_kernel"
ROPE_QK = "minillm.fast.fused._rope_qk_kernel"
SILU_MUL = "minillm.fast.fused._silu_mul_kernel"


class Launch(NamedTuple):
    """One specialization of a kernel, keyed the way Triton's JIT keys its compiled kernels."""

    kernel: str  # "module.attribute"
    args: tuple  # each runtime argument as triton.jit specializes it: (type, "D" if divisible by 16), ("constexpr", v)
    constexprs: tuple  # sorted (name, value) pairs
    num_warps: int
    num_stages: int

    def __str__(self) -> str:
        meta = ", ".join(f"{k}={v}" for k, v in self.constexprs)
        pointers = "/".join(sorted({t for t, _ in self.args if t.startswith("*")}))
        name = self.kernel.rsplit(".", 1)[1]
        return f"{name}({meta}, {pointers}, warps={self.num_warps}, stages={self.num_stages})"


def launch(kernel: str, args: list, meta: dict) -> Launch:
    """``kernel[grid](*args, **meta)`` as a Launch: the arguments specialized exactly as triton.jit does (with its
    own function: a stride of 1 becomes a constant, a pointer or int divisible by 16 says so)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    meta = dict(meta)
    num_warps, num_stages = meta.pop("num_warps"), meta.pop("num_stages")
    # (is_const, specialize, align) = (False, True, True): what triton.jit does for a parameter without annotation.
    spec = tuple(native_specialize_impl(BaseBackend, a, False, True, True) for a in args)
    return Launch(kernel, spec, tuple(sorted(meta.items())), num_warps, num_stages)


def fake(*shape: int, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """A tensor with shape, dtype and strides but no memory: all a launch needs to be specialized."""
    return torch.empty(shape, dtype=dtype, device="meta")


# ------------------------------------------------------------------------------------------------------------------
# The launches, built like the launchers build them, with the tile choices taken from their plan functions.


def flash_launches(arch: int, cases):
    """flash_attention or, for is_varlen, flash_attention_varlen (4 packed sequences of up to T rows), for each
    (model, dtype, T, is_varlen) case. T = 1 is decode: one query against 1000 cached keys."""
    from minillm.attention import flash

    for (H, Hkv, D), dtype, T, is_varlen in cases:
        meta = dict(NUM_GROUPS=H // Hkv, D=D, CAUSAL=True, IS_VARLEN=is_varlen, **flash.plan(T, D, dtype, arch))
        if is_varlen:
            q, k, cu = fake(4 * T, H, D, dtype=dtype), fake(4 * T, Hkv, D, dtype=dtype), fake(5, dtype=torch.int32)
            packed = [(0, t.stride(1), t.stride(0), t.stride(2)) for t in (q, k, k, q)]  # no batch stride
            yield launch(FLASH, [q, k, k, q, cu, cu, 0, 0, H, 0.125, *(s for st in packed for s in st)], meta)
        else:
            S = T if T > 1 else 1000
            q, k = fake(1, H, T, D, dtype=dtype), fake(1, Hkv, S, D, dtype=dtype)
            args = [q, k, k, q, None, None, T, S, H, 0.125, *q.stride(), *k.stride(), *k.stride(), *q.stride()]
            yield launch(FLASH, args, meta)


def paged_launches(arch: int, cases):
    """paged_decode_attention, and its split-K combine where the plan splits, for each (model, dtype, batch size,
    context length, block size) case."""
    from minillm.attention import paged

    for (H, Hkv, D), dtype, B, context_len, BS in cases:
        cfg = paged.plan(B * Hkv, H // Hkv, D, dtype, context_len, arch, NUM_SMS[arch])
        num_splits = cfg["num_splits"]
        q, cache = fake(B, H, D, dtype=dtype), fake(B * context_len // BS + 1, BS, Hkv, D, dtype=dtype)
        tables, lens = fake(B, -(-context_len // BS), dtype=torch.int32), fake(B, dtype=torch.int32)
        if num_splits == 1:
            mid_o, mid_m, m_strides = q.unsqueeze(2), None, (0, 0, 0)
        else:
            mid_o, mid_m = fake(B, H, num_splits, D, dtype=torch.float32), fake(B, H, num_splits, dtype=torch.float32)
            m_strides = mid_m.stride()
        args = [q, cache, cache, tables, lens, mid_o, mid_m, mid_m, H // Hkv, D, cfg["tokens_per_split"],
                *q.stride(), *cache.stride(), *cache.stride(), *tables.stride(), *mid_o.stride(), *m_strides, 0.125]
        yield launch(PAGED, args, dict(BS=BS, **cfg["decode"]))
        if cfg["combine"] is not None:
            args = [mid_o, mid_m, mid_m, q, num_splits, D, *mid_o.stride(), *mid_m.stride(), *q.stride()]
            yield launch(COMBINE, args, cfg["combine"])


def store_launches(cases, num_tokens: int = 100):
    """store_kv of num_tokens new tokens for each (model, dtype, block size) case."""
    from minillm.kvcache import store

    for (_, Hkv, D), dtype, BS in cases:
        k, cache = fake(num_tokens, Hkv, D, dtype=dtype), fake(64, BS, Hkv, D, dtype=dtype)
        args = [k, k, cache, cache, fake(num_tokens, dtype=torch.int64), Hkv, D,
                *k.stride(), *k.stride(), *cache.stride(), *cache.stride()]
        yield launch(STORE, args, dict(BS=BS, **store.plan(Hkv, D)))


def quant_launches(arch: int, cases, gemm_rows: int = 500):
    """dequant_gemv (one row) and dequant_gemm (gemm_rows rows) for each ((bits, group size), K, N, dtype) case."""
    from minillm.quant import kernels

    for (bits, G), K, N, dtype in cases:
        G = G or K
        num_groups = -(-K // G)
        qweight = fake(N, K, dtype=torch.int8) if bits == 8 else fake(N, K // 2, dtype=torch.uint8)
        scales = fake(N, num_groups)
        zeros = scales if bits == 8 else fake(N, num_groups, dtype=torch.uint8)  # the launchers pass scales for int8
        for kernel, M in ((GEMV, 1), (GEMM, gemm_rows)):
            x, out = fake(M, K, dtype=dtype), fake(M, N, dtype=dtype)
            if kernel == GEMV:
                sizes, cfg = [N, K, G], kernels.gemv_plan(K, G, bits, arch)
            else:
                sizes, cfg = [M, N, K, G], kernels.gemm_plan(K, G, bits, dtype, arch)
            args = [x, qweight, scales, zeros, out, *sizes,
                    *x.stride(), *qweight.stride(), *scales.stride(), *out.stride()]
            yield launch(kernel, args, dict(BITS=bits, **cfg))


def fused_launches(cases):
    """add_rmsnorm (with and without a residual), rope_qk and silu_mul of N tokens for each (model name, dtype, N)
    case. Their plans are the same on every GPU; N only sizes the grid, so N = 1 and N = 512 share a compile."""
    from minillm.fast import fused

    for name, dtype, N in cases:
        (H, Hkv, D), (C, I) = MODELS[name], WIDTHS[name]
        x, weight = fake(N, C, dtype=dtype), fake(C, dtype=dtype)
        for residual in (x, None):
            r_strides = (0, 0) if residual is None else residual.stride()
            args = [x, residual, weight, x, None if residual is None else x, C,
                    *x.stride(), *r_strides, weight.stride(0), x.stride(0), x.stride(0), 1e-5]
            yield launch(ADD_RMSNORM, args, fused.add_rmsnorm_plan(C))
        q, k, cos = fake(N, H, D, dtype=dtype), fake(N, Hkv, D, dtype=dtype), fake(N, D, dtype=dtype)
        args = [q, k, cos, cos, q, k, H, Hkv, D // 2, *q.stride(), *k.stride(), *cos.stride(), *cos.stride(),
                *q.stride()[:2], *k.stride()[:2]]
        yield launch(ROPE_QK, args, fused.rope_qk_plan(H, Hkv, D))
        gate = fake(N, I, dtype=dtype)
        yield launch(SILU_MUL, [gate, gate, gate, I, *gate.stride(), *gate.stride(), gate.stride(0)],
                     fused.silu_mul_plan(I))


def representative_launches(arch: int) -> list[Launch]:
    """What CI compiles: every model, dtype, path and block size appears for every kernel, not every combination
    of them (a few seconds per compile on two cores add up): the slow sweep compiles those."""
    return [
        *flash_launches(arch, [
            (SMOLLM2, F16, 1, False), (LLAMA, B16, 1, False), (SMOLLM2, F32, 1, False), (LLAMA, F32, 1, False),  # T=1
            (LLAMA, F16, 3000, False), (SMOLLM2, F32, 3000, False),  # prefill, one sequence
            (SMOLLM2, B16, 3000, True), (LLAMA, F32, 3000, True),  # prefill, packed
        ]),
        *paged_launches(arch, [
            (SMOLLM2, F16, 64, 500, 16), (LLAMA, F32, 64, 500, 32),  # many sequences fill the GPU: one split
            (LLAMA, B16, 1, 4000, 32), (SMOLLM2, F32, 1, 4000, 16),  # one long sequence: split-K
        ]),
        *store_launches([(SMOLLM2, F16, 16), (LLAMA, B16, 32), (LLAMA, F32, 16)]),
        *quant_launches(arch, [((8, None), 4096, 4096, F16), ((4, 128), 4096, 1536, B16), ((4, 64), 576, 576, F32)]),
        *fused_launches([("SmolLM2", F16, 1), ("Llama", B16, 512), ("SmolLM2", F32, 512), ("Llama", F32, 1)]),
    ]


def all_launches(arch: int) -> list[Launch]:
    """The full sweep: every combination of model, dtype, length, batch, block size and weight format."""
    return [
        *flash_launches(arch, product(MODELS.values(), DTYPES, (1, 7, 20, 50, 64, 100, 1000, 4096), (False, True))),
        *paged_launches(arch, product(MODELS.values(), DTYPES, (1, 8, 64), (100, 500, 4000), (16, 32))),
        *store_launches(product(MODELS.values(), DTYPES, (16, 32))),
        *quant_launches(arch, product(QUANT_FORMATS, QUANT_SIZES, QUANT_SIZES, DTYPES)),
        *fused_launches(product(MODELS, DTYPES, (1, 512))),
    ]


# ------------------------------------------------------------------------------------------------------------------
# Compiling: worker processes with the interpreter off, each launch compiled for one target.


def _init_worker(cache_dir: str) -> None:
    # Before the first compile imports triton and minillm. TRITON_DUMP_PTXAS_LOG: ptxas prints registers and spills;
    # TRITON_DEFAULT_FP_FUSION=1: Triton 3.9's default, which it warns about while the variable is unset.
    os.environ.update(
        TRITON_INTERPRET="0", TRITON_CACHE_DIR=cache_dir, TRITON_DUMP_PTXAS_LOG="1", TRITON_DEFAULT_FP_FUSION="1"
    )


def _compile(launch: Launch, arch: int) -> dict:
    """Compile one launch for sm<arch> to a cubin; return its shared memory, registers, spills and compile seconds."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile
    from triton.compiler.compiler import make_backend

    module, name = launch.kernel.rsplit(".", 1)
    fn = getattr(importlib.import_module(module), name)
    assert hasattr(fn, "cache_key"), f"{name} is an interpreted kernel: minillm was imported before _init_worker ran"
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    types, constexprs, attrs = {}, dict(launch.constexprs), {}
    for i, (arg, (ty, value)) in enumerate(zip(fn.arg_names, launch.args)):
        types[arg] = ty
        if ty == "constexpr":
            constexprs[arg] = value
        elif value:
            attrs[(i,)] = backend.parse_attr(value)  # "D": tt.divisibility = 16
    signature = {arg: types.get(arg, "constexpr") for arg in fn.arg_names}
    options = dict(num_warps=launch.num_warps, num_stages=launch.num_stages)
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            kernel = compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options)
    except Exception as e:  # reported per launch by the test, with the others that failed
        return dict(error=f"{type(e).__name__}: {e}"[:2000])
    registers = re.search(r"Used (\d+) registers", log.getvalue())
    spills = re.search(r"(\d+) bytes spill stores", log.getvalue())
    return dict(
        shared=kernel.metadata.shared, seconds=time.perf_counter() - start,
        registers=int(registers[1]) if registers else None, spill_stores=int(spills[1]) if spills else None,
    )


def compile_all(jobs: list[tuple[Launch, int]]) -> dict[tuple[Launch, int], dict]:
    """Compile each (launch, arch) in NUM_WORKERS fresh processes with an empty Triton cache."""
    # The slowest kernels first, so that neither worker is left alone with a long one at the end.
    order = (FLASH, GEMM, PAGED, GEMV, COMBINE, STORE, ADD_RMSNORM, ROPE_QK, SILU_MUL)
    jobs = sorted(set(jobs), key=lambda job: (order.index(job[0].kernel), job[1] != 75, str(job[0])))
    with (
        tempfile.TemporaryDirectory() as cache_dir,
        ProcessPoolExecutor(NUM_WORKERS, get_context("spawn"), initializer=_init_worker, initargs=(cache_dir,)) as pool,
    ):
        results = pool.map(_compile, *zip(*jobs))
        return dict(zip(jobs, results))


def check(results: dict[tuple[Launch, int], dict]) -> None:
    """Fail on any launch that did not compile or needs more shared memory than its target has."""
    from minillm._triton import max_shared_memory

    problems = [f"sm{arch} {launch}: {r['error']}" for (launch, arch), r in results.items() if "error" in r]
    problems += [
        f"sm{arch} {launch}: {r['shared']} bytes of shared memory, sm{arch} has {max_shared_memory(arch)}"
        for (launch, arch), r in results.items()
        if "error" not in r and r["shared"] > max_shared_memory(arch)
    ]
    assert not problems, f"{len(problems)} of {len(results)} compiles failed:\n" + "\n".join(problems)


@pytest.fixture(scope="module")
def compiled() -> dict[tuple[Launch, int], dict]:
    return compile_all([(launch, arch) for arch in TARGETS for launch in representative_launches(arch)])


@pytest.mark.slow  # ~90 s of cold compiles, shared by these three: make test runs them, make test-fast not
def test_every_planned_launch_compiles_and_fits_shared_memory(compiled):
    check(compiled)


@pytest.mark.slow  # ~90 s of cold compiles, shared by these three: make test runs them, make test-fast not
def test_t4_flash_prefill_fits_64_kib(compiled):
    """Regression: D = 128 fp16 prefill on a T4 took 128 x 64 tiles in 3 stages, 96 KiB of the 64 KiB it has."""
    (prefill,) = flash_launches(75, [(LLAMA, F16, 3000, False)])
    assert compiled[prefill, 75]["shared"] <= 64 * 1024, compiled[prefill, 75]


@pytest.mark.slow  # ~90 s of cold compiles, shared by these three: make test runs them, make test-fast not
def test_int4_gemv_does_not_spill_registers(compiled):
    """Regression: int4 GEMV in groups of 128 took 64 x 128 tiles, which spilled 1.9 KiB a thread on sm80."""
    spills = {(arch, str(launch)): r["spill_stores"] for (launch, arch), r in compiled.items() if launch.kernel == GEMV}
    assert spills and all(spilled == 0 for spilled in spills.values()), spills


@pytest.mark.sweep  # ~11 minutes cold: run it with `pytest -m sweep` after changing a launcher's plan
def test_full_sweep_compiles_and_fits_shared_memory():
    check(compile_all([(launch, arch) for arch in TARGETS for launch in all_launches(arch)]))


# ------------------------------------------------------------------------------------------------------------------
# The plans compiled above are the ones the launchers launch: each launcher runs (in the interpreter on a CPU) with its
# plan function and its kernel wrapped, and the kernel must receive exactly what the plan returned.

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def record_plans(monkeypatch, module, name: str = "plan") -> list[dict]:
    """Wrap the plan function module.name; return the list its results are appended to."""
    plans, plan = [], getattr(module, name)

    def recorded(*args, **kwargs):
        plans.append(plan(*args, **kwargs))
        return plans[-1]

    monkeypatch.setattr(module, name, recorded)
    return plans


class KernelSpy:
    """Stands in for a @triton.jit kernel: records each launch's grid and keyword meta-parameters, then launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **meta):
            self.launches.append((grid, meta))
            return self.kernel[grid](*args, **meta)

        return launch


def spy_kernel(monkeypatch, kernel: str) -> KernelSpy:
    module, name = kernel.rsplit(".", 1)
    spy = KernelSpy(getattr(importlib.import_module(module), name))
    monkeypatch.setattr(kernel, spy)
    return spy


@pytest.fixture
def launchable():
    from minillm._triton import triton_available

    if not triton_available(DEVICE):
        pytest.skip("needs a GPU or Triton's interpreter")


def test_flash_launchers_launch_their_plan(monkeypatch, launchable):
    from minillm.attention import flash, varlen

    plans, kernel = record_plans(monkeypatch, flash), spy_kernel(monkeypatch, FLASH)
    q, k = torch.randn(20, 4, 16, device=DEVICE), torch.randn(20, 2, 16, device=DEVICE)  # (T, H, D), (S, Hkv, D)
    flash.flash_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], k.transpose(0, 1)[None])
    cu = torch.tensor([0, 20], dtype=torch.int32, device=DEVICE)
    varlen.flash_attention_varlen(q, k, k, cu, cu, 20, 20)
    assert len(plans) == len(kernel.launches) == 2
    for plan, (grid, meta) in zip(plans, kernel.launches):
        assert meta.items() >= plan.items() and grid[0] == -(-20 // plan["BLOCK_M"])


def test_paged_decode_launches_its_plan(monkeypatch, launchable):
    from minillm.attention import paged

    plans = record_plans(monkeypatch, paged)
    decode, combine = spy_kernel(monkeypatch, PAGED), spy_kernel(monkeypatch, COMBINE)
    context_len, BS = 300, 16
    num_blocks = -(-context_len // BS)
    q, cache = torch.randn(1, 2, 16, device=DEVICE), torch.randn(num_blocks, BS, 1, 16, device=DEVICE)
    tables = torch.arange(num_blocks, dtype=torch.int32, device=DEVICE)[None]
    lens = torch.tensor([context_len], dtype=torch.int32, device=DEVICE)
    paged.paged_decode_attention(q, cache, cache, tables, lens)  # 300 tokens: 2 splits, on CPU and on a GPU
    ((plan,), ((grid, decode_meta),), ((_, combine_meta),)) = plans, decode.launches, combine.launches
    assert grid[2] == plan["num_splits"] == 2
    assert decode_meta.items() >= plan["decode"].items() and combine_meta.items() >= plan["combine"].items()


def test_store_kv_launches_its_plan(monkeypatch, launchable):
    from minillm.kvcache import store

    plans, kernel = record_plans(monkeypatch, store), spy_kernel(monkeypatch, STORE)
    k, cache = torch.randn(5, 3, 16, device=DEVICE), torch.zeros(2, 4, 3, 16, device=DEVICE)
    store.store_kv(k, k, cache, cache.clone(), torch.arange(5, device=DEVICE))
    ((plan,), ((_, meta),)) = plans, kernel.launches
    assert meta.items() >= plan.items()


def test_dequant_launchers_launch_their_plans(monkeypatch, launchable):
    from minillm.quant import kernels

    gemv_plans, gemv = record_plans(monkeypatch, kernels, "gemv_plan"), spy_kernel(monkeypatch, GEMV)
    gemm_plans, gemm = record_plans(monkeypatch, kernels, "gemm_plan"), spy_kernel(monkeypatch, GEMM)
    N, K, G = 24, 64, 32
    qweight = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, device=DEVICE)
    scales = torch.rand(N, K // G, device=DEVICE).half()
    zeros = torch.full((N, K // G), 8, dtype=torch.uint8, device=DEVICE)
    kernels.dequant_gemv(torch.randn(2, K, device=DEVICE), qweight, scales, zeros, 4, G)
    kernels.dequant_gemm(torch.randn(20, K, device=DEVICE), qweight, scales, zeros, 4, G)
    for plans, spy in ((gemv_plans, gemv), (gemm_plans, gemm)):
        ((plan,), ((_, meta),)) = plans, spy.launches
        assert meta.items() >= plan.items()


def test_fused_launchers_launch_their_plans(monkeypatch, launchable):
    from minillm.fast import fused

    names = ("add_rmsnorm_plan", "rope_qk_plan", "silu_mul_plan")
    plans = {name: record_plans(monkeypatch, fused, name) for name in names}
    spies = {name: spy_kernel(monkeypatch, kernel) for name, kernel in zip(names, (ADD_RMSNORM, ROPE_QK, SILU_MUL))}
    N, C, H, Hkv, D, I = 3, 40, 4, 2, 16, 1500  # I > 1024: more than one column tile per row
    x, weight = torch.randn(N, C, device=DEVICE), torch.randn(C, device=DEVICE)
    fused.add_rmsnorm(x, x, weight, 1e-6)
    fused.add_rmsnorm(x, None, weight, 1e-6)
    q, k = torch.randn(N, H, D, device=DEVICE), torch.randn(N, Hkv, D, device=DEVICE)
    cos = torch.randn(N, D, device=DEVICE)
    fused.rope_qk(q, k, cos, cos)
    gate = torch.randn(N, I, device=DEVICE)
    fused.silu_mul(gate, gate)
    for name in names:
        assert len(plans[name]) == len(spies[name].launches) == (2 if name == "add_rmsnorm_plan" else 1), name
        for plan, (grid, meta) in zip(plans[name], spies[name].launches):
            assert meta.items() >= plan.items(), name
            assert grid[0] == N, name
    ((silu_grid, _),) = spies["silu_mul_plan"].launches
    assert silu_grid == (N, -(-I // plans["silu_mul_plan"][0]["BLOCK_I"])) == (N, 2)
