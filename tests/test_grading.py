"""The grading framework, and every exercise check against right answers, plausible wrong ones, and the stub.

The answers live in tests/answers/chNN_topic.py, one module per chapter. To register a check there:

    RIGHT_ANSWERS += [pytest.param(grading.check_rmsnorm, minillm.model.rms_norm, id="1.1-reference")]
    WRONG_ANSWERS += [pytest.param(grading.check_rmsnorm, rmsnorm_without_eps, id="1.1-no-eps")]

where a wrong answer is a mistake a learner would plausibly make (forgetting eps, softmax over the wrong axis,
an off-by-one in a block table), written as a small function in that module. Every check in either list is also
run against a stub that raises NotImplementedError, as the shipped exercise does.
"""

import importlib
import re
from pathlib import Path

import pytest
import torch

from minillm import grading
from minillm.grading import assert_close, assert_equal, assert_shape, exercise, randint, randn

ANSWERS = Path(__file__).parent / "answers"
CHAPTERS = [importlib.import_module(f"answers.{p.stem}") for p in sorted(ANSWERS.glob("ch*.py"))]


# A toy exercise "0.1: softmax over the last axis", as a chapter would write its check in minillm/grading/.
def check_softmax(fn):
    x = randn(4, 7, seed=0)
    with exercise("0.1", "softmax") as ex:
        ex.check("returns a tensor of the input's shape", lambda: assert_shape(fn(x), x.shape, what="softmax(x)"))
        ex.check("matches torch.softmax", lambda: assert_close(fn(x), torch.softmax(x, -1), what="softmax(x)"))
        ex.check("is stable for large inputs", lambda: assert_close(fn(x + 100), torch.softmax(x + 100, -1)))


def softmax_right(x):
    e = (x - x.amax(-1, keepdim=True)).exp()
    return e / e.sum(-1, keepdim=True)


def softmax_wrong_axis(x):
    return x.exp() / x.exp().sum(0, keepdim=True)


def softmax_unstable(x):
    return x.exp() / x.exp().sum(-1, keepdim=True)


def stub(*args, **kwargs):
    raise NotImplementedError("Exercise N.M: the shipped stub")


RIGHT_ANSWERS = [pytest.param(check_softmax, softmax_right, id="toy-softmax")]
WRONG_ANSWERS = [
    pytest.param(check_softmax, softmax_wrong_axis, id="toy-softmax-wrong-axis"),
    pytest.param(check_softmax, softmax_unstable, id="toy-softmax-no-max-subtraction"),
]
# A chapter may name checks that are slow to run once (they generate text or train a model) in SLOW_CHECK_SEEDS,
# check -> seeds: the seed sweeps below run them on that many seeds instead of 20.
SEEDS: dict = {}
for chapter in CHAPTERS:
    RIGHT_ANSWERS += chapter.RIGHT_ANSWERS
    WRONG_ANSWERS += chapter.WRONG_ANSWERS
    SEEDS.update(getattr(chapter, "SLOW_CHECK_SEEDS", {}))


VERDICT = re.compile(r"^Exercise \d+\.\d+ passed: (\d+)/\1 checks$")


@pytest.mark.parametrize("check, answer", RIGHT_ANSWERS)
def test_right_answer_passes_with_one_line(check, answer, capsys):
    check(answer)
    out = capsys.readouterr().out
    assert VERDICT.match(out.strip()), f"a check must print exactly one verdict line, printed {out!r}"
    check(answer)
    assert capsys.readouterr().out == out, "the verdict line must be deterministic"


@pytest.mark.slow
@pytest.mark.parametrize("check, answer", RIGHT_ANSWERS)
def test_right_answer_passes_on_20_seeds(check, answer, monkeypatch, capsys):
    """The random cases never reject a right answer: 20 seeds, the same verdict line each time."""
    verdicts = set()
    for seed in range(SEEDS.get(check, 20)):
        monkeypatch.setenv("MINILLM_GRADING_SEED", str(seed))
        check(answer)
        verdicts.add(capsys.readouterr().out)
    assert len(verdicts) == 1, verdicts


@pytest.mark.parametrize("check, answer", WRONG_ANSWERS)
def test_wrong_answer_fails(check, answer, capsys):
    with pytest.raises(AssertionError, match=r"Exercise \d+\.\d+ .*check \d+ failed"):
        check(answer)
    assert "passed" not in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("check, answer", WRONG_ANSWERS)
def test_wrong_answer_fails_on_20_seeds(check, answer, monkeypatch, capsys):
    """A wrong answer fails whatever the seed, so a verdict never depends on the luck of the draw."""
    for seed in range(SEEDS.get(check, 20)):
        monkeypatch.setenv("MINILLM_GRADING_SEED", str(seed))
        with pytest.raises(AssertionError, match=r"check \d+ failed"):
            check(answer)
    assert "passed" not in capsys.readouterr().out


ALL_CHECKS = sorted({p.values[0] for p in RIGHT_ANSWERS + WRONG_ANSWERS}, key=lambda f: f.__qualname__)


@pytest.mark.parametrize("check", ALL_CHECKS, ids=[f.__name__ for f in ALL_CHECKS])
def test_stub_fails_as_not_implemented(check):
    with pytest.raises(AssertionError, match="not implemented yet"):
        check(stub)


# The framework itself.


def test_first_failing_sub_check_is_named_and_later_ones_do_not_run():
    ran = []
    with pytest.raises(AssertionError) as info:
        with exercise("2.1", "toy") as ex:
            ex.check("first", lambda: ran.append(1))
            ex.check("second", lambda: assert_equal(1, 2, what="answer"))
            ex.check("third", lambda: ran.append(3))
    assert str(info.value).startswith("Exercise 2.1 (toy), check 2 failed: second\nanswer: expected 2, got 1\n")
    assert ran == [1]


def test_a_failure_names_the_seed_that_replays_its_random_cases(monkeypatch):
    def draw_and_fail():
        with exercise("2.5", "toy") as ex:
            drawn = ex.randn(3)
            ex.check("fails", lambda: assert_equal(1, 2))
        return drawn

    with pytest.raises(AssertionError) as info:
        draw_and_fail()
    seed = int(re.search(r"set MINILLM_GRADING_SEED=(\d+) to draw them again", str(info.value))[1])
    monkeypatch.setenv("MINILLM_GRADING_SEED", str(seed))
    with exercise("2.5", "toy") as ex:
        ex.check("same seed, same draws", lambda: None)
    assert ex.seed == seed
    assert torch.equal(ex.randn(3), grading.Exercise("2.5", "toy").randn(3))
    monkeypatch.setenv("MINILLM_GRADING_SEED", "abc")
    with pytest.raises(ValueError, match="MINILLM_GRADING_SEED must be an integer seed, got 'abc'"):
        grading.Exercise("2.5", "toy")


def test_fresh_seeds_differ_between_runs(monkeypatch):
    monkeypatch.delenv("MINILLM_GRADING_SEED", raising=False)
    assert len({grading.Exercise("2.6", "toy").seed for _ in range(5)}) > 1


def test_a_crash_in_learner_code_fails_the_sub_check():
    with pytest.raises(AssertionError, match="check 1 failed: shapes\nyour code raised RuntimeError"):
        with exercise("2.2", "toy") as ex:
            ex.check("shapes", lambda: torch.zeros(2, 3) @ torch.zeros(2, 3))


def test_not_implemented_outside_a_sub_check():
    with pytest.raises(AssertionError, match=r"Exercise 2.3 \(toy\): not implemented yet"):
        with exercise("2.3", "toy"):
            stub()


def test_check_returns_the_sub_check_result(capsys):
    with exercise("2.4", "toy") as ex:
        assert ex.check("value", lambda: 5) == 5
    assert capsys.readouterr().out == "Exercise 2.4 passed: 1/1 checks\n"


def test_assert_close_messages():
    expected = torch.zeros(2, 3)
    with pytest.raises(AssertionError, match=r"^out: expected shape \(2, 3\), got \(3, 2\)$"):
        assert_close(torch.zeros(3, 2), expected, what="out")
    with pytest.raises(AssertionError, match="expected dtype torch.float32, got torch.float16"):
        assert_close(expected.half(), expected)
    assert_close(expected.half(), expected, check_dtype=False)
    with pytest.raises(AssertionError, match="expected Tensor.*got list"):
        assert_close([0.0, 0.0], torch.zeros(2))
    got = expected.clone()
    got[1, 2] = 0.5
    with pytest.raises(AssertionError, match=r"1 of 6 elements differ.*index \(1, 2\): got 0.5, expected 0"):
        assert_close(got, expected)
    with pytest.raises(AssertionError, match="contains NaN"):
        assert_close(torch.full((2, 3), float("nan")), expected)
    assert_close(1.0 + 1e-7, 1.0)
    assert_close(torch.tensor(2.0), 2.0)


def test_assert_equal_messages():
    assert_equal(torch.tensor([1, 2, 3]), torch.tensor([1, 2, 3]))
    with pytest.raises(AssertionError, match=r"ids: 1 of 3 elements differ; first at index \(2,\): got 4, expected 3"):
        assert_equal(torch.tensor([1, 2, 4]), torch.tensor([1, 2, 3]), what="ids")
    with pytest.raises(AssertionError, match="expected dtype torch.int64, got torch.int32"):
        assert_equal(torch.tensor([1], dtype=torch.int32), torch.tensor([1]))
    with pytest.raises(AssertionError, match=r"blocks: expected \[0, 1\], got \[1, 0\]"):
        assert_equal([1, 0], [0, 1], what="blocks")


def test_seeded_inputs_are_reproducible():
    assert torch.equal(randn(3, 4, seed=7), randn(3, 4, seed=7))
    assert not torch.equal(randn(3, 4, seed=7), randn(3, 4, seed=8))
    assert randn(2, seed=0, dtype=torch.float16).dtype == torch.float16
    ids = randint(0, 10, 5, seed=1)
    assert ids.dtype == torch.int64 and ids.shape == (5,) and torch.equal(ids, randint(0, 10, 5, seed=1))
    assert grading.generator(3).initial_seed() == 3
