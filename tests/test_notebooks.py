"""Every notebook runs under nbval, exercises are in sync with solutions, and every shipped exercise fails.

Lecture notebooks and exercises run under `--nbval-lax` (any error fails; only `# NBVAL_CHECK_OUTPUT` cells are
compared), solutions under `--nbval` (all outputs compared, sanitized by minillm/grading/nbval_sanitize.cfg, except
`# NBVAL_IGNORE_OUTPUT` cells). Each notebook runs in its own pytest subprocess, as a learner would run it, with
Triton's interpreter when there is no GPU. A notebook with no exercises yet is fine: the parametrizations are empty.
"""

import re
from pathlib import Path

import pytest

from minillm import course

ROOT = Path(__file__).resolve().parents[1]
LECTURES = sorted((ROOT / "notebooks").glob("*.ipynb"))
SOLUTIONS = sorted((ROOT / "solutions").glob("*.ipynb"))
EXERCISES = sorted((ROOT / "exercises").glob("*.ipynb"))


def _report(result) -> str:
    return course.ANSI_ESCAPE.sub("", result.stdout)[-6000:]


@pytest.mark.slow
@pytest.mark.parametrize("notebook", LECTURES, ids=[p.name for p in LECTURES])
def test_lecture_notebook_runs(notebook: Path):
    result = course.run_nbval(notebook, ROOT, lax=True)
    assert result.returncode == 0, _report(result)


@pytest.mark.slow
@pytest.mark.parametrize("notebook", SOLUTIONS, ids=[p.name for p in SOLUTIONS])
def test_solution_notebook_matches_its_outputs(notebook: Path):
    result = course.run_nbval(notebook, ROOT)
    assert result.returncode == 0, _report(result)


def test_exercises_in_sync_with_solutions():
    problems = course.check(ROOT)
    assert not problems, "run `make exercises` (python -m minillm.course build):\n" + "\n".join(problems)


@pytest.mark.slow
@pytest.mark.parametrize("notebook", EXERCISES, ids=[p.name for p in EXERCISES])
def test_shipped_exercise_fails_in_its_check_cells(notebook: Path):
    numbers = course.exercise_cells(course.read_notebook(notebook))
    assert numbers, f"{notebook.name} has no exercise cells"
    result = course.run_nbval(notebook, ROOT, lax=True)  # as a learner grades it: the checks raise
    assert result.returncode != 0, f"{notebook.name} passes without any answer filled in"
    report = course.ANSI_ESCAPE.sub("", result.stdout)
    for number in numbers:
        assert re.search(rf"Exercise {re.escape(number)} \(.*\): not implemented yet", report), (
            f"no check cell failed with 'Exercise {number} ...: not implemented yet':\n{_report(result)}"
        )


@pytest.mark.parametrize("notebook", EXERCISES, ids=[p.name for p in EXERCISES])
def test_shipped_exercise_shows_no_verdict(notebook: Path):
    """A learner must not see "passed" under a check they have not run."""
    for cell in course.read_notebook(notebook).cells:
        printed = "".join(o.get("text", "") for o in cell.get("outputs", []))
        assert "passed" not in printed, f"{notebook.name} stores a verdict: {printed!r}"
