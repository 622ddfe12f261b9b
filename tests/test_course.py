"""The solutions -> exercises tooling on a toy course: stub generation, determinism, sync check, and grading."""

import csv
import json
from pathlib import Path

import nbformat
import pytest

from minillm import course

EXERCISE_CELL = '''# Exercise 1.1: square a tensor
def square(x):
    """Elementwise x**2."""
    ### BEGIN SOLUTION
    y = x * x
    return y
    ### END SOLUTION'''

CHECK_CELL = """# NBVAL_CHECK_OUTPUT
from minillm.grading import assert_close, exercise, randn

x = randn(3, 4, seed=0)
with exercise("1.1", "square a tensor") as ex:
    ex.check("matches x * x", lambda: assert_close(square(x), x * x, what="square(x)"))
    ex.check("works on a scalar", lambda: assert_close(square(x[0, 0]), x[0, 0] ** 2, what="square(scalar)"))"""


def toy_solution() -> nbformat.NotebookNode:
    """A solution notebook with stored outputs, as `jupyter nbconvert --execute` would leave it."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_markdown_cell("# Toy chapter", id="intro"),
        nbformat.v4.new_code_cell("print(6 * 7)", id="warmup", execution_count=1),
        nbformat.v4.new_code_cell(EXERCISE_CELL, id="ex-1-1", execution_count=2),
        nbformat.v4.new_code_cell(CHECK_CELL, id="check-1-1", execution_count=3),
    ]
    nb.cells[1].outputs = [nbformat.v4.new_output("stream", name="stdout", text="42\n")]
    nb.cells[3].outputs = [
        nbformat.v4.new_output("stream", name="stdout", text="Exercise 1.1 passed: 2/2 checks\n")
    ]
    return nb


@pytest.fixture
def toy_root(tmp_path: Path) -> Path:
    (tmp_path / "solutions").mkdir()
    (tmp_path / "solutions" / "01_toy.ipynb").write_text(course.render(toy_solution()))
    return tmp_path


def test_stub_keeps_indentation_and_names_the_exercise():
    stub = course.stub_source(EXERCISE_CELL, "1.1", "square a tensor")
    assert stub.splitlines() == [
        "# Exercise 1.1: square a tensor",
        "def square(x):",
        '    """Elementwise x**2."""',
        "    # YOUR CODE HERE",
        '    raise NotImplementedError("Exercise 1.1: square a tensor")',
    ]


def test_several_regions_in_one_cell():
    source = "# Exercise 2.3: two\ndef f():\n  ### BEGIN SOLUTION\n  return 1\n  ### END SOLUTION\n\n"
    source += "### BEGIN SOLUTION\nx = f()\n### END SOLUTION\nprint(x)"
    stub = course.stub_source(source, "2.3", "two")
    assert stub.count("raise NotImplementedError") == 2
    assert '  raise NotImplementedError("Exercise 2.3: two")' in stub.splitlines()
    assert 'raise NotImplementedError("Exercise 2.3: two")' in stub.splitlines()
    assert stub.endswith("print(x)")


@pytest.mark.parametrize(
    "source, error",
    [
        ("### BEGIN SOLUTION\nx = 1", "without a matching"),
        ("x = 1\n### END SOLUTION", "without a '### BEGIN SOLUTION'"),
        ("### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION", "nested"),
    ],
)
def test_unbalanced_markers_are_rejected(source, error):
    with pytest.raises(course.CourseError, match=error):
        course.stub_source(source, "1.1", "t")


def test_build_exercise_cells_outputs_and_note():
    ex = course.build_exercise(toy_solution(), "01_toy.ipynb")
    note, intro, warmup, cell, check = ex.cells
    assert note.cell_type == "markdown" and "solutions/01_toy.ipynb" in note.source
    assert intro.source == "# Toy chapter"
    assert warmup.outputs[0].text == "42\n", "cells without solutions keep their outputs"
    assert "raise NotImplementedError" in cell.source and "x * x" not in cell.source
    assert cell.outputs == [] and cell.execution_count is None
    assert cell.metadata["minillm"] == {"exercise": "1.1"}
    assert "nbval-ignore-output" in cell.metadata["tags"]
    assert check.outputs == [] and check.execution_count is None, "no verdict before the learner runs the check"
    assert "NBVAL_CHECK_OUTPUT" not in check.source and "exercise(\"1.1\"" in check.source
    assert course.exercise_cells(ex) == {"1.1": 3}


@pytest.mark.parametrize(
    "source, name, error",
    [
        ("def f():\n    ### BEGIN SOLUTION\n    pass\n    ### END SOLUTION", "01_toy.ipynb", "needs a '# Exercise"),
        (EXERCISE_CELL, "02_toy.ipynb", "expected 2.M"),
        (EXERCISE_CELL, "toy.ipynb", "NN_topic"),
    ],
)
def test_build_rejects_broken_conventions(source, name, error):
    nb = toy_solution()
    nb.cells[2].source = source
    with pytest.raises(course.CourseError, match=error):
        course.build_exercise(nb, name)


def test_duplicate_exercise_numbers_are_rejected():
    nb = toy_solution()
    nb.cells.append(nbformat.v4.new_code_cell(EXERCISE_CELL, id="again"))
    with pytest.raises(course.CourseError, match="twice"):
        course.build_exercise(nb, "01_toy.ipynb")


def test_build_is_deterministic_and_check_finds_drift(toy_root: Path):
    assert course.check(toy_root) == ["exercises/01_toy.ipynb: missing"]
    assert course.build(toy_root) == [toy_root / "exercises" / "01_toy.ipynb"]
    first = (toy_root / "exercises" / "01_toy.ipynb").read_bytes()
    assert course.build(toy_root) == [], "an unchanged solution rewrites nothing"
    assert course.check(toy_root) == []
    (toy_root / "exercises" / "01_toy.ipynb").unlink()
    course.build(toy_root)
    assert (toy_root / "exercises" / "01_toy.ipynb").read_bytes() == first

    # An edited solution, a hand-edited exercise, and a stray exercise are all reported.
    (toy_root / "exercises" / "99_stray.ipynb").write_text(course.render(nbformat.v4.new_notebook()))
    nb = toy_solution()
    nb.cells[0].source = "# Toy chapter, revised"
    (toy_root / "solutions" / "01_toy.ipynb").write_text(course.render(nb))
    assert course.check(toy_root) == [
        "exercises/01_toy.ipynb: out of sync with solutions/01_toy.ipynb",
        "exercises/99_stray.ipynb: no solutions/99_stray.ipynb",
    ]
    assert course.main(["--root", str(toy_root), "check"]) == 1


def test_build_removes_generated_exercises_without_solution(toy_root: Path):
    course.build(toy_root)
    (toy_root / "solutions" / "01_toy.ipynb").rename(toy_root / "solutions" / "02_toy.ipynb")
    nb = toy_solution()
    nb.cells[2].source = EXERCISE_CELL.replace("1.1", "2.1")
    (toy_root / "solutions" / "02_toy.ipynb").write_text(course.render(nb))
    course.build(toy_root)
    assert sorted(p.name for p in (toy_root / "exercises").iterdir()) == ["02_toy.ipynb"]


def test_missing_cell_ids_get_deterministic_ones():
    nb = toy_solution()
    for cell in nb.cells:
        del cell["id"]
    assert course.render(course.build_exercise(nb, "01_toy.ipynb")) == course.render(
        course.build_exercise(nb, "01_toy.ipynb")
    )


def _learner_copy(root: Path, answer: str | None, name: str = "01_toy.ipynb", extra: str = "") -> Path:
    """The built exercise as a learner saved it: their answer in the exercise cell (None: cell deleted), `extra`
    code appended to it, and a forged verdict stored under the check cell."""
    nb = course.read_notebook(root / "exercises" / "01_toy.ipynb")
    i = course.exercise_cells(nb)["1.1"]
    nb.cells[i + 1].outputs = [nbformat.v4.new_output("stream", name="stdout", text="Exercise 1.1 passed: 2/2 checks\n")]
    if answer is None:
        del nb.cells[i]
    else:
        stub = '    # YOUR CODE HERE\n    raise NotImplementedError("Exercise 1.1: square a tensor")'
        assert stub in nb.cells[i].source
        nb.cells[i].source = nb.cells[i].source.replace(stub, answer) + extra
    path = root / "submissions" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(course.render(nb))
    return path


@pytest.mark.slow
def test_nbval_solution_passes_and_stub_fails(toy_root: Path):
    course.build(toy_root)
    solved = course.run_nbval(toy_root / "solutions" / "01_toy.ipynb", toy_root)
    assert solved.returncode == 0, solved.stdout
    stub = course.run_nbval(toy_root / "exercises" / "01_toy.ipynb", toy_root, lax=True)
    assert stub.returncode != 0
    assert "Exercise 1.1 (square a tensor): not implemented yet" in stub.stdout


# An answer cell that disarms the checks it can reach: the comparison used by the check cell becomes a no-op.
FORGED_CHECK = """
import minillm.grading
minillm.grading.assert_close = minillm.grading.framework.assert_close = lambda *args, **kwargs: None
"""


@pytest.mark.slow
def test_grade_a_class(toy_root: Path, capsys):
    """Right, wrong, forged, missing, renamed, endless, broken and absent submissions: one row each, never a hang."""
    course.build(toy_root)
    _learner_copy(toy_root, "    return x ** 2", "01_toy.ipynb")
    _learner_copy(toy_root, "    return 2 * x", "01_toy_wrong.ipynb")
    _learner_copy(toy_root, "    return 2 * x", "01_toy_forged.ipynb", extra=FORGED_CHECK)
    _learner_copy(toy_root, None, "01_toy_missing.ipynb")
    _learner_copy(toy_root, "    return x * x", "01_toy (1).ipynb")
    _learner_copy(toy_root, "    return x * x", "01_toy_endless.ipynb", extra="\nwhile True:\n    pass\n")
    (toy_root / "submissions" / "01_toy_broken.ipynb").write_text('{"cells": [')
    out = toy_root / "grades"
    status = course.main(["--root", str(toy_root), "grade", str(toy_root / "submissions"),
                          str(toy_root / "01_gone.ipynb"), "--out", str(out), "--timeout", "30"])
    assert status == 1
    rows = {r["notebook"]: r for r in json.loads((out / "grades.json").read_text())}
    assert rows["01_toy.ipynb"]["passed"] and rows["01_toy (1).ipynb"]["passed"]
    assert "check 1 failed: matches x * x" in rows["01_toy_wrong.ipynb"]["message"]
    assert not rows["01_toy_forged.ipynb"]["passed"], "a forged check changed the verdict"
    assert "no answer cell" in rows["01_toy_missing.ipynb"]["message"]
    assert rows["01_toy_endless.ipynb"]["message"] == "timed out after 30 s"
    assert "01_toy_broken.ipynb: not a readable notebook" in rows["01_toy_broken.ipynb"]["message"]
    assert "01_gone.ipynb: no such file" in rows["01_gone.ipynb"]["message"]
    with open(out / "grades.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    assert "2/8 exercises passed" in capsys.readouterr().out


def test_grader_environment_holds_no_secrets(monkeypatch):
    from minillm import grader

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "hunter2")
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    env = grader.minimal_environment()
    assert "AWS_SECRET_ACCESS_KEY" not in env and "HF_TOKEN" not in env and "PATH" in env
