"""Checks for the graded exercises: each runs a few sub-checks and prints one deterministic line, or raises.

An exercise notebook asks the learner to rewrite a function the package already has; its check cell calls
``minillm.grading.check_<name>(learner_fn)``, which tests the function against the package's reference on seeded
random inputs and on properties (shapes, dtypes, invariants). A check either prints exactly

    Exercise 1.1 passed: 3/3 checks

or raises ``AssertionError`` naming the first sub-check that failed and what went wrong (expected vs got, shapes).
It raises rather than only printing because a learner who saves the notebook overwrites its stored outputs: the
exception is what makes ``pytest --nbval`` fail, whatever was saved (see ``minillm/course.py`` for grading that does
not trust saved outputs at all).

Writing a check::

    def check_rmsnorm(fn: Callable) -> None:
        x = randn(3, 5, 64, seed=0)
        w = randn(64, seed=1)
        with exercise("1.1", "RMSNorm") as ex:
            ex.check("matches the reference", lambda: assert_close(fn(x, w, 1e-6), rms_norm(x, w, 1e-6), what="output"))
            ex.check("keeps the input dtype", lambda: assert_equal(fn(x.half(), w.half(), 1e-6).dtype, torch.float16))

The stub the learner starts from raises ``NotImplementedError``; ``ex.check`` turns that into an AssertionError that
says "not implemented yet". Any other exception raised by the learner's code (a shape error, say) also fails the
sub-check, with the exception named. A check runs fixed cases (``randn``/``generator`` with fixed seeds, drawn on the
CPU: the same on every machine) and fresh random cases drawn from ``ex.randn``/``ex.randint``/``ex.rng``, new on
every run: odd and size-1 shapes, lengths around block boundaries, degenerate rows. A failure names the seed
(``MINILLM_GRADING_SEED`` replays it); the printed line on success is the same whatever the seed.

The framework is in ``framework.py``; each chapter's checks live in ``chNN_topic.py``, re-exported here. Every check has
plausible wrong answers in ``tests/answers/chNN_topic.py`` that it must reject.
"""

# Each chapter module lists its checks in __all__: minillm.grading.check_<name> for every one.
from minillm.grading.ch01_llm_from_scratch import *  # noqa: F401,F403
from minillm.grading.ch02_attention import *  # noqa: F401,F403
from minillm.grading.ch03_kv_cache import *  # noqa: F401,F403
from minillm.grading.ch04_paged_attention import *  # noqa: F401,F403
from minillm.grading.ch05_continuous_batching import *  # noqa: F401,F403
from minillm.grading.ch06_quantization import *  # noqa: F401,F403
from minillm.grading.ch07_pruning import *  # noqa: F401,F403
from minillm.grading.ch08_distillation import *  # noqa: F401,F403
from minillm.grading.ch09_speculative_decoding import *  # noqa: F401,F403
from minillm.grading.ch10_fast_decoding import *  # noqa: F401,F403
from minillm.grading.ch11_tensor_parallelism import *  # noqa: F401,F403
from minillm.grading.ch12_serving import *  # noqa: F401,F403
from minillm.grading.framework import (  # noqa: F401
    SEED_VARIABLE,
    Exercise,
    assert_close,
    assert_equal,
    assert_shape,
    exercise,
    generator,
    randint,
    randn,
)
