"""The grading framework: `exercise(...)` runs sub-checks and prints one line; fresh random cases; readable asserts.

See the package docstring (``minillm/grading/__init__.py``) for how a check is written.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

SEED_VARIABLE = "MINILLM_GRADING_SEED"


def fresh_seed() -> int:
    """The seed of one check's random cases: $MINILLM_GRADING_SEED when set (to replay a failure), else a new one."""
    value = os.environ.get(SEED_VARIABLE)
    if value is None:
        return random.SystemRandom().randrange(2**31)
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{SEED_VARIABLE} must be an integer seed, got {value!r}") from None


class Exercise:
    """Runs the sub-checks of one exercise in order and stops at the first failure.

    Besides its fixed cases, a check draws fresh random cases on every run from ``ex.randn``, ``ex.randint`` and
    ``ex.rng`` (a ``random.Random``), all seeded by ``ex.seed``; a failure message names the seed, so the learner
    can replay exactly those inputs with ``MINILLM_GRADING_SEED``. The verdict line on success does not depend on it.
    """

    def __init__(self, number: str, title: str):
        self.number = number
        self.title = title
        self.num_passed = 0
        self.seed = fresh_seed()
        self.rng = random.Random(self.seed)
        self._generator = torch.Generator(device="cpu").manual_seed(self.seed)

    def randn(self, *shape: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
              ) -> torch.Tensor:
        """A fresh standard normal tensor from this check's seed, drawn on the CPU and then moved."""
        return torch.randn(*shape, generator=self._generator).to(device=device, dtype=dtype)

    def randint(self, low: int, high: int, *shape: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Fresh integers in [low, high) of `shape` (int64) from this check's seed."""
        return torch.randint(low, high, shape, generator=self._generator).to(device)

    @property
    def name(self) -> str:
        return f"Exercise {self.number} ({self.title})"

    def check(self, description: str, test: Callable[[], Any]) -> Any:
        """Run one sub-check; `test` raises AssertionError (or anything else) when it fails. Returns its result."""
        index = self.num_passed + 1
        try:
            result = test()
        except NotImplementedError:
            raise AssertionError(
                f"{self.name}: not implemented yet. Replace the `raise NotImplementedError(...)` line in your "
                f"function with your code, run that cell, then run this check again."
            ) from None  # the stub's own traceback would only add noise
        except AssertionError as e:
            raise AssertionError(f"{self.name}, check {index} failed: {description}\n{e}{self._replay}") from None
        except Exception as e:  # the learner's code crashed: report it as this sub-check failing
            raise AssertionError(
                f"{self.name}, check {index} failed: {description}\n"
                f"your code raised {type(e).__name__}: {e}{self._replay}"
            ) from e
        self.num_passed += 1
        return result

    @property
    def _replay(self) -> str:
        return f"\n(random cases from seed {self.seed}: set {SEED_VARIABLE}={self.seed} to draw them again)"


@contextmanager
def exercise(number: str, title: str) -> Iterator[Exercise]:
    """Group the sub-checks of exercise `number` ("N.M"); print the verdict line when all of them passed."""
    ex = Exercise(number, title)
    try:
        yield ex
    except NotImplementedError:
        # The check called the learner's function outside ex.check (e.g. to build inputs for later sub-checks).
        raise AssertionError(f"{ex.name}: not implemented yet.") from None
    assert ex.num_passed > 0, f"{ex.name}: the check ran no sub-checks"
    print(f"Exercise {number} passed: {ex.num_passed}/{ex.num_passed} checks")


# ---------------------------------------------------------------------------------------------------------------------
# Generic helpers: seeded inputs and comparisons with readable messages.
# ---------------------------------------------------------------------------------------------------------------------


def generator(seed: int = 0) -> torch.Generator:
    """A CPU random generator with a fixed seed, so a check draws the same inputs on every machine and every run."""
    return torch.Generator(device="cpu").manual_seed(seed)


def randn(
    *shape: int,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Standard normal tensor of `shape`, drawn on the CPU from `seed` and then moved: identical on any device."""
    return torch.randn(*shape, generator=generator(seed), dtype=torch.float32).to(device=device, dtype=dtype)


def randint(
    low: int,
    high: int,
    *shape: int,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Integers in [low, high) of `shape` (int64), drawn on the CPU from `seed`."""
    return torch.randint(low, high, shape, generator=generator(seed)).to(device)


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"Tensor(shape={tuple(x.shape)}, dtype={x.dtype}, device={x.device})"
    return f"{type(x).__name__} {x!r}"


def assert_shape(got: Any, shape: Sequence[int], what: str = "output") -> None:
    """`got` is a tensor of exactly `shape`."""
    if not isinstance(got, torch.Tensor):
        raise AssertionError(f"{what}: expected a torch.Tensor of shape {tuple(shape)}, got {_describe(got)}")
    if tuple(got.shape) != tuple(shape):
        raise AssertionError(f"{what}: expected shape {tuple(shape)}, got {tuple(got.shape)}")


def assert_close(
    got: Any,
    expected: torch.Tensor | float,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    what: str = "output",
    check_dtype: bool = True,
) -> None:
    """`got` matches `expected` elementwise within |got - expected| <= atol + rtol * |expected|.

    The message names `what`, the shapes or dtypes when they differ, else the worst element: its index, both values,
    the error, and how many elements are off.
    """
    if not isinstance(expected, torch.Tensor):
        expected = torch.tensor(expected, dtype=torch.float64)
        check_dtype = False
        if isinstance(got, (int, float)):
            got = torch.tensor(got, dtype=torch.float64)
    if not isinstance(got, torch.Tensor):
        raise AssertionError(f"{what}: expected {_describe(expected)}, got {_describe(got)}")
    if got.shape != expected.shape:
        raise AssertionError(f"{what}: expected shape {tuple(expected.shape)}, got {tuple(got.shape)}")
    if check_dtype and got.dtype != expected.dtype:
        raise AssertionError(f"{what}: expected dtype {expected.dtype}, got {got.dtype}")
    g = got.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    if torch.isnan(g).any() and not torch.isnan(e).any():
        raise AssertionError(f"{what}: contains NaN at {int(torch.isnan(g).sum())} of {g.numel()} elements")
    ok = torch.isclose(g, e, rtol=rtol, atol=atol, equal_nan=True)
    if bool(ok.all()):
        return
    err = (g - e).abs().nan_to_num(nan=float("inf"))
    worst = int(err.argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), g.shape)) if g.dim() else ()
    raise AssertionError(
        f"{what}: {int((~ok).sum())} of {g.numel()} elements differ (atol={atol:g}, rtol={rtol:g}); "
        f"worst at index {index}: got {g.flatten()[worst].item():.6g}, expected {e.flatten()[worst].item():.6g} "
        f"(abs error {err.flatten()[worst].item():.3g})"
    )


def assert_equal(got: Any, expected: Any, what: str = "output") -> None:
    """Exact equality, for token ids, shapes, dtypes, block tables: tensors compare by shape, dtype and values."""
    if isinstance(expected, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            raise AssertionError(f"{what}: expected {_describe(expected)}, got {_describe(got)}")
        if got.shape != expected.shape:
            raise AssertionError(f"{what}: expected shape {tuple(expected.shape)}, got {tuple(got.shape)}")
        if got.dtype != expected.dtype:
            raise AssertionError(f"{what}: expected dtype {expected.dtype}, got {got.dtype}")
        diff = (got.cpu() != expected.cpu()).nonzero()
        if len(diff):
            first = tuple(int(i) for i in diff[0])
            raise AssertionError(
                f"{what}: {len(diff)} of {got.numel()} elements differ; first at index {first}: "
                f"got {got.cpu()[first].item()!r}, expected {expected.cpu()[first].item()!r}"
            )
        return
    if got != expected:
        raise AssertionError(f"{what}: expected {expected!r}, got {got!r}")


def triton_device(what: str) -> str:
    """Where a kernel exercise runs: CUDA when present, else the CPU in Triton's interpreter (which importing minillm
    switches on there); a clear failure, naming the exercise, where Triton cannot run at all."""
    from minillm._triton import triton_available
    from minillm.doctor import triton_status

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not triton_available(device):
        raise AssertionError(
            f"{what}: Triton cannot run here: {triton_status(torch.device(device))}. Triton exists for Linux only "
            "(pip install triton); on a CPU, minillm runs kernels in Triton's interpreter unless TRITON_INTERPRET=0 "
            "is set. Or use a GPU runtime."
        )
    return device


def call_kernel(fn: Callable, *args: Any) -> Any:
    """Call a learner's kernel launcher; the stub's NotImplementedError comes out as itself."""
    try:
        return fn(*args)
    except Exception as e:
        # Triton wraps what a kernel raises (InterpreterError on CPU, CompilationError on GPU): unwrap the stub's.
        if "NotImplementedError" in f"{e!r} {e.__cause__!r}":
            raise NotImplementedError(str(e)) from e
        raise
