"""Chapter 10 checks (fast decoding), used by solutions/10_fast_decoding.ipynb.

Each check compares the learner's function with minillm's own on fixed cases and on fresh random ones (``ex.rng``,
a new seed every run) and tests the properties whose failure names the likely mistake: a Triton kernel that really
ran, stores h = x + residual and normalizes it in fp32 (10.1); the smallest bucket that holds the batch, and pad rows
that write no K/V and attend over one key, checked end to end on a tiny model over a real paged pool (10.2); the
bytes an eager residual add + RMSNorm moves against one fused kernel (10.3); the largest idle gap of an unordered,
overlapping kernel table (10.4). The references are ``minillm.fast.fused.add_rmsnorm_ref``,
``minillm.fast.buckets``, ``minillm.fast.traffic.add_rmsnorm_traffic`` and ``minillm.fast.timeline.largest_gap``.
Every check has plausible wrong answers in tests/answers/ch10_fast_decoding.py that it must reject.

Shapes: N tokens (rows), C hidden, B sequences of a decode batch, V vocab.
"""

from __future__ import annotations

import copy
import functools
import math
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from minillm.grading.framework import (
    assert_close,
    assert_equal,
    assert_shape,
    call_kernel,
    exercise,
    generator,
    randn,
    triton_device,
)

__all__ = [  # the checks, re-exported by minillm.grading
    "check_add_rmsnorm_kernel",
    "check_decode_padding",
    "check_add_rmsnorm_traffic",
    "check_largest_gap",
]


def _description(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return f"{type(x).__name__} {str(x)[:80]}"


# ---------------------------------------------------------------------------------------------------------------------
# Exercise 10.1: a fused residual add + RMSNorm kernel in Triton.
# ---------------------------------------------------------------------------------------------------------------------


H_HINT = "h must hold x + residual, stored by the kernel: it is the residual the next layer adds its output to"


@contextmanager
def triton_launches() -> Iterator[list[str]]:
    """Yield a list that collects the name of every Triton kernel launched inside the block, whoever launched it.

    minillm's own launchers count themselves (``minillm.count_kernel_launches``); a learner's launcher does not, so
    this wraps the launch itself: ``JITFunction.run`` (compiled, on a GPU) and ``InterpretedFunction.run`` (the CPU
    interpreter), which ``kernel[grid](...)`` calls.
    """
    from triton.runtime import jit

    classes = [jit.JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction

        classes.append(InterpretedFunction)
    except ImportError:  # pragma: no cover - a Triton without the interpreter
        pass
    launched: list[str] = []
    originals = {cls: cls.__dict__["run"] for cls in classes if "run" in cls.__dict__}

    def counting(original):
        def run(self, *args, **kwargs):
            if not kwargs.get("warmup", False):
                launched.append(getattr(getattr(self, "fn", None), "__name__", "kernel"))
            return original(self, *args, **kwargs)

        return run

    for cls, original in originals.items():
        cls.run = counting(original)
    try:
        yield launched
    finally:
        for cls, original in originals.items():
            cls.run = original


def check_add_rmsnorm_kernel(fn: Callable) -> None:
    """Exercise 10.1. `fn(x, residual, weight, eps) -> (y, h)`: h = x + residual and y = RMSNorm(h) * weight, both
    (N, C) in x's dtype, computed by a Triton kernel, one program per row; same as
    ``minillm.fast.fused.add_rmsnorm_ref``.

    Runs on CUDA when available, else on the CPU in Triton's interpreter, which importing minillm switches on when
    there is no GPU (before the learner's kernel is defined). Every call must launch a Triton kernel.
    """
    from minillm.fast.fused import add_rmsnorm_ref

    device = triton_device("Exercise 10.1 (fused add + RMSNorm kernel)")

    def run(x, residual, weight, eps):
        with triton_launches() as launched:
            out = call_kernel(fn, x, residual, weight, eps)
        if not launched:
            raise AssertionError(
                "no Triton kernel ran: the launcher must launch add_rmsnorm_kernel[grid](...), not compute the result "
                "with torch"
            )
        if not isinstance(out, tuple) or len(out) != 2:
            raise AssertionError(f"expected a tuple (y, h), got {_description(out)}: return both, h is the next "
                                 "layer's residual")
        return out

    def compare(x, residual, weight, eps, what, tol):
        y, h = run(x, residual, weight, eps)
        y_ref, h_ref = add_rmsnorm_ref(x, residual, weight, eps)
        shape = f"N={x.shape[0]}, C={x.shape[1]}, {x.dtype}"
        for name, got in (("y", y), ("h", h)):
            assert_shape(got, x.shape, what=f"{name} ({what}, {shape})")
            assert_equal(got.dtype, x.dtype, what=f"dtype of {name} ({what})")
        try:
            assert_close(h, h_ref, atol=tol, rtol=tol, what=f"h ({what}, {shape})")
        except AssertionError as e:
            raise AssertionError(f"{e}\n{H_HINT}") from None
        try:
            assert_close(y, y_ref, atol=tol, rtol=tol, what=f"y ({what}, {shape})")
        except AssertionError as e:
            hint = ""
            y_of_x, _ = add_rmsnorm_ref(x, None, weight, eps)
            zero_rows = (y.float() == 0).all(dim=-1) & (y_ref.float() != 0).any(dim=-1)
            if torch.allclose(y.float(), y_of_x.float(), atol=tol, rtol=tol):
                hint = "\nthat is RMSNorm(x) * weight: normalize h = x + residual, not x"
            elif not torch.isfinite(y).all() or bool(zero_rows.any()):
                hint = ("\nsome rows are 0, inf or NaN: square and sum h in fp32 (h.to(tl.float32)); in fp16 h * h "
                        "overflows past |h| = 256 and the mean of squares becomes inf")
            raise AssertionError(f"{e}{hint}") from None

    def case(N, C, dtype, seed, scale=1.0, eps=1e-6, what="fixed case"):
        x = (randn(N, C, seed=seed) * scale).to(device=device, dtype=dtype)
        residual = (randn(N, C, seed=seed + 1) * scale).to(device=device, dtype=dtype)
        weight = (randn(C, seed=seed + 2) * 0.5 + 1).to(device=device, dtype=dtype)
        compare(x, residual, weight, eps, what, 1e-5 if dtype == torch.float32 else 4e-3)

    def returns_both():
        x, r, w = randn(3, 100, seed=200), randn(3, 100, seed=201), randn(100, seed=202)
        y, h = run(x.to(device), r.to(device), w.to(device), 1e-6)
        assert_shape(y, (3, 100), what="y")
        assert_shape(h, (3, 100), what="h")

    def h_is_stored():
        x, r, w = randn(5, 77, seed=210, device=device), randn(5, 77, seed=211, device=device) * 3, randn(77, seed=212)
        y, h = run(x, r, w.to(device), 1e-6)
        try:
            assert_close(h, x + r, atol=1e-6, rtol=1e-6, what="h (N=5, C=77, fp32)")
        except AssertionError as e:
            raise AssertionError(f"{e}\n{H_HINT}") from None

    def strided_rows():
        x_buf, r_buf = randn(4, 64, seed=230, device=device), randn(4, 80, seed=231, device=device)
        w = randn(50, seed=232, device=device)
        compare(x_buf[:, 7:57], r_buf[:, :50], w, 1e-6, "rows that are views with row strides 64 and 80", 1e-5)

    def fresh_cases():
        for _ in range(3):
            N, C = ex.rng.randint(1, 9), ex.rng.choice([ex.rng.randint(2, 40), ex.rng.randint(41, 300)])
            dtype = ex.rng.choice([torch.float32, torch.float16])
            scale, eps = ex.rng.choice([0.1, 1.0, 30.0]), ex.rng.choice([1e-6, 1e-5, 1e-2])
            x, r = ex.randn(N, C) * scale, ex.randn(N, C) * scale
            w = ex.randn(C) * 0.5 + 1
            compare(x.to(device, dtype), r.to(device, dtype), w.to(device, dtype), eps,
                    f"random case, x * {scale:g}, eps={eps:g}", 1e-5 if dtype == torch.float32 else 4e-3)

    with exercise("10.1", "a fused add + RMSNorm kernel in Triton") as ex:
        ex.check("returns (y, h), two (N, C) tensors, computed by a Triton kernel", returns_both)
        ex.check("h = x + residual, stored by the kernel (N=5, C=77, fp32)", h_is_stored)
        ex.check("y = RMSNorm(x + residual) * weight and h, fp32, C not a power of two (masked tail)",
                 lambda: case(5, 77, torch.float32, 213))
        ex.check("fp16: h and y in fp16, the normalization in fp32 (N=7, C=129)",
                 lambda: case(7, 129, torch.float16, 220))
        ex.check("fp16 activations of a few hundred (outlier features): the squares must be summed in fp32",
                 lambda: case(3, 96, torch.float16, 225, scale=300.0, what="large activations"))
        ex.check("rows that are views with a stride bigger than C: use the strides the launcher passes",
                 strided_rows)
        ex.check("fresh random shapes (N from 1 to 9, C from 2 to 300), fp32 and fp16, magnitudes and eps",
                 fresh_cases)


# ---------------------------------------------------------------------------------------------------------------------
# Exercise 10.2: the bucket and the padding of a decode batch for CUDA-graph replay.
# ---------------------------------------------------------------------------------------------------------------------

BLOCK_SIZE = 4  # of the end-to-end pool: small, so that sequences span several blocks
NUM_KV_BLOCKS = 32


@functools.lru_cache(maxsize=1)
def _tiny_model() -> torch.nn.Module:
    """A tiny random Llama whose layers matter (see tests/conftest.py's varied_tiny_model), drawn without touching
    the global random state."""
    from minillm.config import ModelConfig
    from minillm.model import Transformer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(10)
        model = Transformer(ModelConfig.tiny()).eval()
        with torch.no_grad():
            model.embed_tokens.weight.normal_(0, 0.3)
            for p in model.layers.parameters():
                if p.dim() == 2:
                    p.normal_(0, 0.1)
    return model


def decode_logits(model, cache, token_ids, positions, slot_mapping, context_lens, block_tables) -> torch.Tensor:
    """One decode step (one token per row) through a PagedAttention over `cache` (written in place) -> (B, V)."""
    from minillm.attention.backends import PagedAttention, PagedMetadata

    m = PagedMetadata.build(slot_mapping, [1] * len(token_ids), context_lens, block_tables, cache.block_size)
    with torch.no_grad():
        logits = model(torch.tensor([token_ids]), torch.tensor([positions]), attention=PagedAttention(cache),
                       metadata=m)
    return logits[0]


def decode_scenario(rng: random.Random, num_seqs: int) -> tuple[Any, Any, dict]:
    """A pool after prefilling `num_seqs` random prompts, and the unpadded decode batch of their next tokens.

    -> (model, cache, batch): batch holds the five lists of ``pad_decode_batch`` (token_ids, positions,
    slot_mapping, context_lens, block_tables). The BlockManager hands out block 0 first, so sequence 0's first
    token sits in slot 0: a pad row that writes slot 0 overwrites it.
    """
    from minillm.attention.backends import PagedAttention, PagedMetadata
    from minillm.kvcache.blocks import BlockManager
    from minillm.kvcache.paged import PagedKVCache

    model = _tiny_model()
    config = model.config
    cache = PagedKVCache(config.num_layers, NUM_KV_BLOCKS, BLOCK_SIZE, config.num_kv_heads, config.head_dim)
    bm = BlockManager(NUM_KV_BLOCKS, BLOCK_SIZE, enable_prefix_caching=False)
    lens = [rng.randint(1, 11) for _ in range(num_seqs)]
    ids, positions, slots = [], [], []
    for i, n in enumerate(lens):
        prompt = [rng.randrange(config.vocab_size) for _ in range(n)]
        bm.allocate_prompt(i, prompt)
        bm.ensure_capacity(i, n + 1)  # the prompt and the token decoded next
        ids += prompt
        positions += range(n)
        slots += bm.slot_mapping(i, 0, n)
    tables = [bm.block_table(i) for i in range(num_seqs)]
    m = PagedMetadata.build(slots, lens, lens, tables, BLOCK_SIZE)
    with torch.no_grad():  # the prefill: every prompt's K/V into the pool
        model(torch.tensor([ids]), torch.tensor([positions]), attention=PagedAttention(cache), metadata=m)
    batch = dict(
        token_ids=[rng.randrange(config.vocab_size) for _ in range(num_seqs)],
        positions=list(lens),
        slot_mapping=[bm.slot_mapping(i, n, n + 1)[0] for i, n in enumerate(lens)],
        context_lens=[n + 1 for n in lens],
        block_tables=tables,
    )
    return model, cache, batch


def changed_slots(cache, before) -> list[int]:
    """Flat pool slots whose K or V differ between two PagedKVCaches, in any layer."""
    L, NB, BS = cache.k_cache.shape[:3]
    changed = torch.zeros(NB * BS, dtype=torch.bool)
    for pool, old in zip(cache.pools, before.pools):
        changed |= (pool != old).reshape(L, NB * BS, -1).any(dim=2).any(dim=0)
    return changed.nonzero().flatten().tolist()


def _padded_lists(out: Any, bucket: int, max_blocks: int) -> tuple:
    """The learner's padded batch, checked for its types and lengths."""
    names = ("token_ids", "positions", "slot_mapping", "context_lens", "block_tables")
    if not isinstance(out, tuple) or len(out) != 5:
        raise AssertionError(f"pad_decode_batch must return a tuple of 5 lists ({', '.join(names)}), got "
                             f"{_description(out)}")
    for name, got in zip(names, out):
        if not isinstance(got, list) or len(got) != bucket:
            raise AssertionError(f"{name}: expected a list of {bucket} entries (one per row of the bucket), got "
                                 f"{_description(got) if not isinstance(got, list) else f'{len(got)} entries'}")
    for row, table in enumerate(out[4]):
        if not isinstance(table, list) or len(table) != max_blocks:
            raise AssertionError(
                f"block_tables[{row}]: expected a list of max_blocks = {max_blocks} block ids, got "
                f"{table!r}: the captured graph reads a ({bucket}, {max_blocks}) table, so pad every row with 0")
    return out


PAD_HINTS = {
    "slot_mapping": "pad rows write slot -1 (the pool skips it); slot 0 is block 0's first slot, which a real "
                    "sequence may hold",
    "context_lens": "pad rows attend over 1 key: with 0 the softmax has no key at all, 0/0 = NaN in the Triton "
                    "decode kernel",
    "token_ids": "pad rows feed token 0",
    "positions": "pad rows sit at position 0",
}


def check_decode_padding(pick_bucket: Callable, pad_decode_batch: Callable) -> None:
    """Exercise 10.2. `pick_bucket(batch_size, buckets) -> bucket`, the smallest bucket >= batch_size (ValueError
    naming both when none fits, or for batch_size < 1), and `pad_decode_batch(token_ids, positions, slot_mapping,
    context_lens, block_tables, bucket, max_blocks) -> the five lists padded to bucket rows`; same as
    ``minillm.fast.buckets``.

    Besides the lists themselves, a padded decode step runs end to end: a tiny random model, a real PagedKVCache,
    BlockManager and PagedAttention (the torch kernel) decode the padded batch, and the real rows' logits must be the
    unpadded batch's, with the pool unchanged everywhere but at the real rows' slots.
    """
    from minillm.fast import buckets as ref

    def same_bucket(batch_size, buckets):
        got = pick_bucket(batch_size, list(buckets))
        want = ref.pick_bucket(batch_size, buckets)
        if got == want:
            return
        hint = ""
        if got == max(buckets):
            hint = ": that is the largest bucket; take the smallest one that holds the batch (less padding)"
        elif batch_size in buckets:
            hint = f": a batch of {batch_size} fits bucket {batch_size} exactly (bucket >= batch_size, not >)"
        raise AssertionError(f"pick_bucket({batch_size}, {list(buckets)}): expected {want}, got {got!r}{hint}")

    def every_size():
        buckets = ref.decode_buckets(20)
        for batch_size in range(1, 21):
            same_bucket(batch_size, buckets)

    def raises(batch_size, buckets, names):
        try:
            got = pick_bucket(batch_size, list(buckets))
        except ValueError as e:
            missing = [str(n) for n in names if str(n) not in str(e)]
            assert not missing, f"pick_bucket({batch_size}, {buckets}): the ValueError should name {missing}: {e}"
            return
        raise AssertionError(f"pick_bucket({batch_size}, {buckets}): expected ValueError, got {got!r}")

    def no_bucket_fits():
        raises(21, ref.decode_buckets(20), [21, 20])
        raises(3, [1, 2], [3, 2])
        raises(0, ref.decode_buckets(8), [])

    def fresh_buckets():
        for _ in range(30):
            buckets = ref.decode_buckets(ex.rng.randint(1, 80))
            same_bucket(ex.rng.randint(1, buckets[-1]), buckets)

    def same_padding(batch, bucket, max_blocks, what):
        given = copy.deepcopy(batch)
        out = pad_decode_batch(*given.values(), bucket, max_blocks)
        assert given == batch, f"{what}: your function changed its input lists: return new ones"
        out = _padded_lists(out, bucket, max_blocks)
        want = ref.pad_decode_batch(*batch.values(), bucket, max_blocks)
        for name, got_list, want_list in zip(batch, out, want):
            if got_list == want_list:
                continue
            row = next(i for i, (g, w) in enumerate(zip(got_list, want_list)) if g != w)
            kind = "real row (leave it as it was)" if row < len(batch["token_ids"]) else "pad row"
            hint = f"; {PAD_HINTS[name]}" if name in PAD_HINTS and row >= len(batch["token_ids"]) else ""
            raise AssertionError(f"{what}: {name}[{row}], a {kind}: expected {want_list[row]!r}, got "
                                 f"{got_list[row]!r}{hint}\n{name}: expected {want_list}, got {got_list}")

    def end_to_end(rng, num_seqs, bucket, extra_blocks):
        model, cache, batch = decode_scenario(rng, num_seqs)
        max_blocks = max(len(t) for t in batch["block_tables"]) + extra_blocks
        what = f"a decode batch of {num_seqs} padded to bucket {bucket}, max_blocks {max_blocks}"
        plain = copy.deepcopy(cache)
        want = decode_logits(model, plain, *batch.values())  # (B, V)
        padded_cache = copy.deepcopy(cache)
        out = _padded_lists(pad_decode_batch(*copy.deepcopy(batch).values(), bucket, max_blocks), bucket, max_blocks)
        bad = [n for n in out[3][num_seqs:] if not isinstance(n, int) or n < 1]
        assert not bad, f"{what}: pad context_lens {bad}: {PAD_HINTS['context_lens']} (PagedMetadata refuses it)"
        got = decode_logits(model, padded_cache, *out)  # (bucket, V)
        real_slots = set(batch["slot_mapping"])
        stray = [s for s in changed_slots(padded_cache, cache) if s not in real_slots]
        if stray:
            s = stray[0]
            raise AssertionError(
                f"{what}: the step changed pool slot {s} (block {s // BLOCK_SIZE}, offset {s % BLOCK_SIZE}), which "
                f"no real row writes: a pad row wrote K/V over a cached token. {PAD_HINTS['slot_mapping']}")
        for pool, plain_pool in zip(padded_cache.pools, plain.pools):
            flat, flat_plain = pool.flatten(1, 2), plain_pool.flatten(1, 2)  # (L, NB * BS, Hkv, D)
            slots = torch.tensor(sorted(real_slots))
            assert_close(flat[:, slots], flat_plain[:, slots], atol=1e-5, rtol=1e-4,
                         what=f"{what}: K/V written at the real rows' slots")
        assert bool(torch.isfinite(got).all()), f"{what}: a row's logits are not finite"
        assert_close(got[:num_seqs], want, atol=1e-5, rtol=1e-4,
                     what=f"{what}: the real rows' logits vs the unpadded batch's")

    def worked_example():
        batch = dict(token_ids=[7, 9, 4], positions=[5, 2, 7], slot_mapping=[1, 10, 19], context_lens=[6, 3, 8],
                     block_tables=[[3, 0], [2], [1, 4]])
        same_padding(batch, 4, 3, "the example above (bucket 4, max_blocks 3)")

    def random_batch(rng):
        B = rng.randint(1, 9)
        tables = [[rng.randrange(64) for _ in range(rng.randint(1, 5))] for _ in range(B)]
        return dict(
            token_ids=[rng.randrange(1000) for _ in range(B)],
            positions=[rng.randrange(1, 80) for _ in range(B)],
            slot_mapping=[rng.randrange(1, 256) for _ in range(B)],
            context_lens=[rng.randrange(2, 81) for _ in range(B)],
            block_tables=tables,
        )

    def fresh_padding():
        for _ in range(20):
            batch = random_batch(ex.rng)
            B = len(batch["token_ids"])
            bucket = ex.rng.choice([B, ref.pick_bucket(B, ref.decode_buckets(16)), B + ex.rng.randint(0, 7)])
            max_blocks = max(len(t) for t in batch["block_tables"]) + ex.rng.randint(0, 3)
            same_padding(batch, bucket, max_blocks, f"random batch of {B}, bucket {bucket}, max_blocks {max_blocks}")

    def too_large():
        batch = random_batch(random.Random(ex.rng.randrange(2**31)))
        B = len(batch["token_ids"]) + 1
        batch = {k: v + [v[-1]] for k, v in batch.items()}
        try:
            got = pad_decode_batch(*batch.values(), B - 1, 5)
        except ValueError:
            return
        raise AssertionError(f"a batch of {B} padded to bucket {B - 1}: expected ValueError, got {_description(got)}")

    with exercise("10.2", "the bucket and the padding of a decode batch") as ex:
        ex.check("pick_bucket: the smallest bucket that holds the batch, for every batch size up to 20 (buckets "
                 "1, 2, 4, 8, 16, 20)", every_size)
        ex.check("pick_bucket: ValueError naming the batch size and the largest bucket when none fits, and for "
                 "batch_size 0", no_bucket_fits)
        ex.check("pick_bucket on fresh buckets (decode_buckets of a random max_num_seqs) and batch sizes",
                 fresh_buckets)
        ex.check("end to end: a tiny model decodes 3 sequences padded to bucket 8 over a real paged pool: the real "
                 "rows' logits are the unpadded batch's, and no pad row writes the pool",
                 lambda: end_to_end(random.Random(1002), 3, 8, 1))
        ex.check("the example above: pad rows (token 0, position 0, slot -1, context 1, a table of zeros), tables "
                 "padded to max_blocks", worked_example)
        ex.check("fresh batches: real rows untouched, pad rows exactly the fills, every list of the bucket's "
                 "length, every table max_blocks long, the inputs left as they were", fresh_padding)
        ex.check("a batch larger than its bucket raises ValueError", too_large)
        ex.check("end to end on a fresh batch: the real rows' logits and the pool outside their slots unchanged",
                 lambda: end_to_end(random.Random(ex.rng.randrange(2**31)), ex.rng.randint(1, 5),
                                    ex.rng.choice([5, 8]), ex.rng.randint(0, 2)))


# ---------------------------------------------------------------------------------------------------------------------
# Exercise 10.3: the bytes a fused add + RMSNorm saves.
# ---------------------------------------------------------------------------------------------------------------------


def _unfused_at(N: int, C: int, f: int, casts: bool) -> int:
    """The eager count with the fp32 intermediates taken at f bytes: names a learner's mistake in a message."""
    cast = 4 * N * C * f if casts else 0  # .float() and .to(dtype): N C read + N C written each
    return 10 * N * C * f + 6 * N * f + C * f + cast  # the table of minillm/fast/traffic.py with e = 4 -> f


def check_add_rmsnorm_traffic(fn: Callable) -> None:
    """Exercise 10.3. `fn(num_tokens, hidden_size, element_size) -> (unfused, fused, saved)`: the global-memory
    bytes read + written by eager PyTorch's ``x + attn`` then ``RMSNorm`` (one kernel per aten op, fp32
    intermediates), by one fused kernel (read x, residual, weight; write h, y), and their difference; same as
    ``minillm.fast.traffic.add_rmsnorm_traffic``.
    """
    from minillm.fast.traffic import add_rmsnorm_traffic

    def same(N, C, e):
        what = f"add_rmsnorm_traffic(num_tokens={N}, hidden_size={C}, element_size={e})"
        got = fn(N, C, e)
        if not isinstance(got, tuple) or len(got) != 3 or any(type(v) is not int for v in got):
            raise AssertionError(f"{what}: expected a tuple of 3 ints (unfused, fused, saved), got {_description(got)}")
        want = add_rmsnorm_traffic(N, C, e)
        if got == want:
            return
        (unfused, fused, saved), (want_unfused, want_fused, _) = got, want
        hint = ""
        if fused != want_fused:
            if fused == want_fused - C * e:
                hint = f"the fused kernel reads the weight too: C * e = {C * e} bytes"
            elif fused == want_fused - N * C * e:
                hint = f"the fused kernel writes h as well as y: N * C * e = {N * C * e} bytes"
            else:
                hint = "fused: read x, residual (N, C) and weight (C,) once, write h and y (N, C) once"
        elif unfused != want_unfused:
            if unfused == want_unfused - C * e:
                hint = f"the last mul (weight * y) reads the weight: C * e = {C * e} bytes"
            elif unfused == want_unfused - N * C * e:
                hint = f"the residual add writes h: N * C * e = {N * C * e} bytes"
            elif e != 4 and unfused in (_unfused_at(N, C, e, casts=True), _unfused_at(N, C, e, casts=False)):
                hint = "the intermediates after .float() are fp32, 4 bytes each whatever the activations' e"
            elif e == 4 and unfused - want_unfused == 16 * N * C:
                hint = "in fp32, .float() and .to(x.dtype) return the tensor itself and launch no kernel"
            else:
                hint = "unfused: every kernel of the table reads its inputs once and writes its output once"
        elif saved != want_unfused - want_fused:
            hint = "saved = unfused - fused"
        raise AssertionError(f"{what}: expected {want}, got {got}: {hint}")

    def fresh_cases():
        for _ in range(40):
            same(ex.rng.choice([1, ex.rng.randint(1, 256)]), ex.rng.randint(1, 8192), ex.rng.choice([2, 4]))

    with exercise("10.3", "the bytes a fused add + RMSNorm saves") as ex:
        ex.check("the example above: N=2, C=4, fp16 moves (392, 72, 320) bytes", lambda: same(2, 4, 2))
        ex.check("one decode token of SmolLM2 (N=1, C=576) in bf16", lambda: same(1, 576, 2))
        ex.check("fp32 (e = 4): no cast kernels", lambda: same(3, 64, 4))
        ex.check("a batch of 64 tokens: the weight is read once per kernel, not once per token",
                 lambda: same(64, 2048, 2))
        ex.check("fresh N, C and element sizes", fresh_cases)


# ---------------------------------------------------------------------------------------------------------------------
# Exercise 10.4: the largest gap in a kernel timeline.
# ---------------------------------------------------------------------------------------------------------------------


def _events(rows: list[tuple[str, float, float]]):
    import pandas as pd

    return pd.DataFrame(rows, columns=["name", "start_us", "dur_us"])


def _shuffled(events, seed: int):
    order = torch.randperm(len(events), generator=generator(seed)).tolist()
    return events.iloc[order].reset_index(drop=True)


def check_largest_gap(fn: Callable) -> None:
    """Exercise 10.4. `fn(events) -> (name_before, name_after, gap_us)`: the longest idle time between kernels of a
    table with columns name, start_us, dur_us (rows in any order, kernels may overlap or touch), measured from the
    end of the latest-ending kernel started before; the first one in start order on ties; ValueError for fewer than
    2 rows or a missing column. Same as ``minillm.fast.timeline.largest_gap``.
    """
    from minillm.fast.timeline import kernel_gaps, largest_gap

    def same(events, what):
        given = events.copy()
        got = fn(given)
        assert given.equals(events), (f"{what}: your function changed the events table (a column added, rows sorted "
                                      "in place?): work on a copy")
        if (not isinstance(got, tuple) or len(got) != 3 or not all(isinstance(v, str) for v in got[:2])
                or not isinstance(got[2], (int, float))):
            raise AssertionError(f"{what}: expected a tuple (name before, name after, gap in µs), got "
                                 f"{_description(got)}")
        want = largest_gap(events)
        if got[:2] == want[:2] and math.isclose(float(got[2]), want[2], rel_tol=1e-9, abs_tol=1e-9):
            return
        hint = ""
        gaps = kernel_gaps(events)
        ties = [(b, a) for b, a, g in zip(gaps["before"], gaps["after"], gaps["gap_us"]) if g == want[2]]
        starts = sorted(events["start_us"].tolist())
        if float(got[2]) < 0:
            hint = ": overlapping kernels leave no gap, 0, never a negative one"
        elif math.isclose(float(got[2]), want[2]) and tuple(got[:2]) in ties[1:]:
            hint = ": on ties, the first gap in start order"
        elif math.isclose(float(got[2]), want[2]):
            hint = (": the right gap, wrong pair: the kernel before it is the latest-ending one among those started "
                    "earlier, the kernel after it the next to start")
        elif any(math.isclose(float(got[2]), b - a) for a, b in zip(starts, starts[1:])) and float(got[2]) > want[2]:
            hint = ": that is start to start; the gap runs from the end of the kernels before to the next start"
        elif float(got[2]) > want[2]:
            hint = (": sort by start_us first, and measure from the latest end among the kernels started so far, "
                    "not the previous row's end (a long kernel may still run)")
        raise AssertionError(f"{what}: expected {want}, got {got}{hint}\nevents:\n{events.to_string(index=False)}")

    def raises(events, what):
        try:
            got = fn(events.copy())
        except ValueError:
            return
        raise AssertionError(f"{what}: expected ValueError, got {_description(got)}")

    example = _events([("a", 0.0, 10.0), ("b", 2.0, 3.0), ("c", 12.0, 1.0), ("d", 16.0, 1.0)])

    def fresh_cases():
        for _ in range(40):
            n = ex.rng.randint(2, 12)
            rows, t = [], 0.0
            for i in range(n):
                t += ex.rng.choice([-2.0, -0.5, 0.0, 0.25, 1.0, ex.rng.randint(0, 40) / 4])  # overlap, touch, gap
                rows.append((f"k{i}", max(t, 0.0), ex.rng.randint(1, 40) / 4))
                t = max(t, 0.0) + rows[-1][2]
            events = _events(rows)
            same(_shuffled(events, ex.rng.randrange(2**31)), f"random timeline of {n} kernels (rows shuffled)")

    with exercise("10.4", "the largest gap in a kernel timeline") as ex:
        ex.check("kernels in order, no overlap: the gap from one's end to the next one's start",
                 lambda: same(_events([("k1", 0.0, 2.0), ("k2", 5.0, 1.0), ("k3", 7.0, 3.0), ("k4", 14.0, 2.0)]),
                              "four kernels in order"))
        ex.check("rows in any order: sort by start first",
                 lambda: same(_events([("k2", 5.0, 1.0), ("k4", 14.0, 2.0), ("k1", 0.0, 2.0), ("k3", 7.0, 3.0)]),
                              "four kernels, rows not in start order"))
        ex.check("the example above: a long kernel still runs after a short one ends; measure from the latest end",
                 lambda: same(example, "a (0, 10), b (2, 3), c (12, 1), d (16, 1)"))
        ex.check("kernels that only overlap leave no gap: 0.0, for the first pair",
                 lambda: same(_events([("a", 0.0, 5.0), ("b", 3.0, 4.0), ("c", 6.0, 2.0), ("d", 7.5, 1.0)]),
                              "overlapping kernels"))
        ex.check("ties: the first largest gap in start order; touching kernels leave a gap of 0",
                 lambda: same(_events([("a", 0.0, 1.0), ("b", 3.0, 1.0), ("c", 4.0, 2.0), ("d", 8.0, 0.5)]),
                              "two gaps of 2 µs, and c touching b"))

        def errors():
            raises(_events([("a", 0.0, 1.0)]), "one kernel")
            raises(example.drop(columns="dur_us"), "a table without dur_us")

        ex.check("ValueError for fewer than 2 kernels or a missing column", errors)
        ex.check("fresh timelines with overlaps, touching kernels and gaps, rows shuffled", fresh_cases)
