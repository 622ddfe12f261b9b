"""Grading exercise notebooks for one learner or a whole class: ``python -m minillm.course grade PATH...``.

Nothing the learner saved is trusted except the source of their answer cells:

1. Each submission (a notebook, or every ``*.ipynb`` under a folder) is matched to its chapter by the ``NN_`` at the
   start of its name, so a renamed copy ("05_continuous_batching (1).ipynb") still finds its exercise.
2. Its answer cells (``# Exercise N.M: ...``) are spliced into a pristine copy of that exercise
   (`course.splice_answers`).
3. Every check cell is rewritten to import the checks afresh from the installed package just before it runs
   (`fresh_check_source`): an answer cell that replaces ``grading.check_...`` with a function that prints "passed"
   replaced a module that is gone by then.
4. The notebook runs top to bottom in a fresh kernel, in a child process with a minimal environment (no inherited
   secrets, tokens or keys) and a time limit per notebook; a timeout is a failure, not a hang.
5. Each exercise gets one row: passed when its check cell printed ``Exercise N.M passed`` and raised nothing.

This runs the learner's code on your machine, with your user's rights: grade submissions you would run yourself,
or inside a container or VM.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import nbformat

from minillm import course, repo

CHAPTER_PREFIX = re.compile(r"^(\d\d)_")
# The only variables a learner's kernel sees: enough to find Python, its packages, the model cache and a temp dir.
KEPT_VARIABLES = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "MINILLM_CACHE", "MINILLM_GRADING_SEED",
                  "CUDA_VISIBLE_DEVICES", "VIRTUAL_ENV")
FRESH_IMPORT = """\
# Graded copy: the checks are imported afresh from the installed package, so no answer cell can replace them.
import sys as _sys
for _module in [name for name in _sys.modules if name.startswith("minillm.grading")]:
    del _sys.modules[_module]
import minillm.grading as grading
"""


@dataclass
class Row:
    notebook: str
    exercise: str
    passed: bool
    message: str


def fresh_check_source(source: str) -> str:
    """A check cell's source as the grader runs it: re-import `minillm.grading`, drop the nbval marker."""
    body = "\n".join(line for line in source.splitlines() if line.strip() != "# NBVAL_CHECK_OUTPUT")
    return FRESH_IMPORT + body


def check_cells(nb: nbformat.NotebookNode) -> dict[str, int]:
    """Exercise "N.M" -> index of its check cell: the first cell after the exercise cell that calls a check."""
    found = {}
    for number, i in course.exercise_cells(nb).items():
        for j in range(i + 1, len(nb.cells)):
            if course.is_check_cell(nb.cells[j]):
                found[number] = j
                break
    return found


def minimal_environment() -> dict[str, str]:
    env = {k: os.environ[k] for k in KEPT_VARIABLES if k in os.environ}
    if repo.in_checkout():  # this minillm, importable from the checkout
        env["PYTHONPATH"] = str(repo.CHECKOUT)
    env["MPLBACKEND"] = "Agg"
    return env


def pristine_for(path: Path, root: Path) -> nbformat.NotebookNode:
    """The pristine exercise of the chapter `path` belongs to, by the NN_ its name starts with."""
    match = CHAPTER_PREFIX.match(path.name)
    if not match:
        raise course.CourseError(f"{path}: cannot tell the chapter; the file name must start with NN_ (e.g. 05_...)")
    names = sorted(p.name for p in (root / "solutions").glob(f"{match[1]}_*.ipynb"))
    names = names or sorted(p.name for p in repo.repo_path("exercises").glob(f"{match[1]}_*.ipynb"))
    if not names:
        raise course.CourseError(f"{path}: no exercise notebook for chapter {match[1]}")
    return course.pristine_exercise(names[0], root)


def graded_copy(path: Path, root: Path) -> tuple[nbformat.NotebookNode, dict[str, int], list[Row]]:
    """The notebook to run for submission `path`, its check cells by exercise, and rows already failed."""
    try:
        learner = course.read_notebook(path)
    except FileNotFoundError:
        raise course.CourseError(f"{path}: no such file") from None
    except (ValueError, nbformat.reader.NotJSONError) as e:  # json.JSONDecodeError is a ValueError
        raise course.CourseError(f"{path}: not a readable notebook ({type(e).__name__}: {e})") from None
    if not isinstance(learner.get("cells"), list):
        raise course.CourseError(f"{path}: JSON, but not a notebook (no list of cells)")
    nb = pristine_for(path, root)
    missing = course.splice_answers(nb, learner)
    checks = check_cells(nb)
    for i in checks.values():
        nb.cells[i].source = fresh_check_source(nb.cells[i].source)
    rows = [Row(path.name, number, False, "no answer cell (keep the '# Exercise N.M: ...' line at its top)")
            for number in missing]
    return nb, {n: i for n, i in checks.items() if n not in missing}, rows


def verdict(cell: nbformat.NotebookNode, number: str) -> tuple[bool, str]:
    """(passed, message) from one executed check cell."""
    for output in cell.outputs:
        if output.output_type == "error":
            return False, f"{output.ename}: {output.evalue}".strip()
    printed = "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")
    line = next((ln for ln in printed.splitlines() if ln.startswith(f"Exercise {number} passed")), None)
    return (True, line) if line else (False, "the check cell printed no verdict")


def execute(nb: nbformat.NotebookNode, timeout_s: int) -> nbformat.NotebookNode:
    """Run `nb` in a fresh kernel in a child process (minimal environment, own process group); raise on timeout."""
    with tempfile.TemporaryDirectory(prefix="minillm-grade-") as tmp:
        path = Path(tmp) / "graded.ipynb"
        path.write_text(course.render(nb), encoding="utf-8")
        child = subprocess.Popen([sys.executable, "-m", "minillm.grader", str(path)], cwd=tmp,
                                 env=minimal_environment(), start_new_session=True,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            _, stderr = child.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)  # the kernel too: it is in the child's process group
            child.wait()
            raise TimeoutError(f"timed out after {timeout_s} s") from None
        if child.returncode != 0:
            raise RuntimeError(f"the notebook could not run: {stderr.strip().splitlines()[-1:] or 'no message'}")
        return course.read_notebook(path)


def grade_one(path: Path, root: Path, timeout_s: int) -> list[Row]:
    try:
        nb, checks, rows = graded_copy(path, root)
    except course.CourseError as e:
        return [Row(path.name, "-", False, str(e))]
    try:
        executed = execute(nb, timeout_s)
    except (TimeoutError, RuntimeError) as e:
        return rows + [Row(path.name, number, False, str(e)) for number in checks]
    return rows + [Row(path.name, n, *verdict(executed.cells[i], n)) for n, i in checks.items()]


def submissions(paths: list[Path]) -> list[Path]:
    """Notebook files: each path itself, or every *.ipynb below a folder (checkpoints skipped), in order."""
    found = []
    for path in paths:
        if path.is_dir():
            found += sorted(p for p in path.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)
        else:
            found.append(path)
    return found


def grade(paths: list[Path], root: Path, out: Path | None = None, timeout_s: int = 600) -> list[Row]:
    """Grade every submission; print one line per exercise and a total; write grades.csv/json into `out`."""
    rows = []
    for path in submissions(paths):
        for row in grade_one(path, root, timeout_s):
            print(f"{'PASS' if row.passed else 'FAIL'}  {row.notebook}  {row.exercise}  "
                  f"{row.message.splitlines()[0] if row.message else ''}", flush=True)
            rows.append(row)
    print(f"{sum(r.passed for r in rows)}/{len(rows)} exercises passed")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "grades.json").write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n")
        with open(out / "grades.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["notebook", "exercise", "passed", "message"])
            writer.writeheader()
            writer.writerows(asdict(r) for r in rows)
    return rows


def _run(path: Path) -> None:
    """The child: execute the graded copy at `path` in place; cell errors are recorded, not raised."""
    from nbclient import NotebookClient

    nb = course.read_notebook(path)
    NotebookClient(nb, timeout=None, kernel_name="python3", allow_errors=True, store_widget_state=True,
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    path.write_text(course.render(nb), encoding="utf-8")


if __name__ == "__main__":
    _run(Path(sys.argv[1]))
