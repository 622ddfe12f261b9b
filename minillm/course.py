"""Solutions -> exercises: build the exercise notebooks, check they are in sync, grade a learner's notebook.

``python -m minillm.course build``        write exercises/NN_*.ipynb from every solutions/NN_*.ipynb
``python -m minillm.course check``        exit 1, listing the exercise files that are missing or out of date
``python -m minillm.course grade PATH..`` grade notebooks or folders of them, one row per exercise (minillm/grader.py)
``python -m minillm.course sync``         install cells, Colab metadata, README badges (minillm/notebooks.py)
``python -m minillm.course run NB...``    execute notebooks in fresh kernels and store their outputs (`make notebooks`)

The conventions, in solutions/NN_topic.ipynb (the source of truth; exercises/ is generated, never edited):

- An **exercise cell** is a code cell whose top comment line (anywhere before its first marker) reads
  ``# Exercise N.M: title``, where N is the notebook's number NN and M counts exercises within it. The learner's
  part sits between a line ``### BEGIN SOLUTION`` and a line ``### END SOLUTION`` (a cell may hold several such
  regions; they do not nest). In the exercise, each region, markers included, becomes, at the indentation of its
  ``### BEGIN SOLUTION`` line::

      # YOUR CODE HERE
      raise NotImplementedError("Exercise N.M: title")

  The exercise cell's outputs are cleared and it carries ``metadata.minillm.exercise = "N.M"`` and the tag
  ``nbval-ignore-output`` (whatever the learner's cell prints is not compared).
- A **check cell** starts with ``# NBVAL_CHECK_OUTPUT`` and calls ``minillm.grading.check_<name>(fn)``, which prints
  ``Exercise N.M passed: k/k checks`` or raises. In the solution, nbval compares that line. In the exercise the
  check cell ships without the marker and without outputs: a learner sees no verdict before running it, and a
  failing check fails ``pytest --nbval-lax`` by raising. Every other cell keeps its stored outputs.
- The exercise opens with a markdown cell saying which solution it was generated from.

The build is deterministic (same bytes for the same solution): nbformat's JSON (sorted keys, one-space indent),
cell ids kept from the solution, a trailing newline. ``grade`` (minillm/grader.py) trusts nothing the learner saved
except the source of their exercise cells, matched by ``metadata.minillm.exercise`` or, failing that, by the
``# Exercise N.M:`` line.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat

from minillm import repo

BEGIN_SOLUTION = "### BEGIN SOLUTION"
END_SOLUTION = "### END SOLUTION"
EXERCISE_HEADER = re.compile(r"^\s*#\s*Exercise\s+(\d+)\.(\d+):\s*(\S.*?)\s*$")
NOTEBOOK_NAME = re.compile(r"^(\d\d)_\w+\.ipynb$")
NOTE_CELL_ID = "minillm-generated-note"
IGNORE_OUTPUT_TAG = "nbval-ignore-output"
CHECK_MARKER = "# NBVAL_CHECK_OUTPUT"
NOTEBOOK_TIMEOUT_S = 1200  # a safety net against a hung kernel, not a budget: a busy 2-core machine is slow
# Regexes that hide what legitimately varies between runs (addresses, timings, progress bars) before nbval compares.
SANITIZE_FILE = Path(__file__).resolve().parent / "grading" / "nbval_sanitize.cfg"
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


class CourseError(ValueError):
    """A solution notebook breaks the exercise conventions (see the module docstring)."""


def default_root() -> Path:
    """The course checkout: the folder above this package when it holds solutions/, else the working directory."""
    return repo.CHECKOUT if repo.in_checkout() else Path.cwd()


def exercise_header(source: str) -> tuple[str, str] | None:
    """("N.M", title) from the first `# Exercise N.M: title` line before any solution marker, else None."""
    for line in source.splitlines():
        if line.strip() == BEGIN_SOLUTION:
            return None
        match = EXERCISE_HEADER.match(line)
        if match:
            return f"{int(match[1])}.{int(match[2])}", match[3]
    return None


def is_check_cell(cell: nbformat.NotebookNode) -> bool:
    """A code cell that grades: it uses minillm.grading (a `check_<name>` or `exercise(...)`), and is no answer cell."""
    return cell.cell_type == "code" and "grading" in cell.source and exercise_header(cell.source) is None


def stub_source(source: str, number: str, title: str, where: str = "cell") -> str:
    """Replace every BEGIN/END SOLUTION region of `source` by a NotImplementedError at the region's indentation."""
    message = json.dumps(f"Exercise {number}: {title}", ensure_ascii=False)  # a valid Python string literal
    out: list[str] = []
    indent: str | None = None  # indentation of the open region's BEGIN line; None outside a region
    for line in source.splitlines():
        marker = line.strip()
        if marker == BEGIN_SOLUTION:
            if indent is not None:
                raise CourseError(f"{where}: nested {BEGIN_SOLUTION!r}")
            indent = line[: len(line) - len(line.lstrip())]
            out += [f"{indent}# YOUR CODE HERE", f"{indent}raise NotImplementedError({message})"]
        elif marker == END_SOLUTION:
            if indent is None:
                raise CourseError(f"{where}: {END_SOLUTION!r} without a {BEGIN_SOLUTION!r} before it")
            indent = None
        elif indent is None:
            out.append(line)
    if indent is not None:
        raise CourseError(f"{where}: {BEGIN_SOLUTION!r} without a matching {END_SOLUTION!r}")
    return "\n".join(out) + ("\n" if source.endswith("\n") else "")


def read_notebook(path: Path) -> nbformat.NotebookNode:
    # Not nbformat.read: its validation fills missing cell ids with random ones, which would break determinism.
    return nbformat.v4.reads(Path(path).read_text(encoding="utf-8"))


def render(nb: nbformat.NotebookNode) -> str:
    """The notebook as the bytes Jupyter would save: nbformat's JSON (sorted keys) plus a trailing newline."""
    return nbformat.writes(nb) + "\n"


def exercise_cells(nb: nbformat.NotebookNode) -> dict[str, int]:
    """Exercise number "N.M" -> cell index, for a built exercise notebook."""
    return {
        cell.metadata["minillm"]["exercise"]: i
        for i, cell in enumerate(nb.cells)
        if "exercise" in cell.metadata.get("minillm", {})
    }


def build_exercise(solution: nbformat.NotebookNode, solution_name: str) -> nbformat.NotebookNode:
    """The exercise notebook for `solution` (named `solution_name`, e.g. "01_llm_from_scratch.ipynb")."""
    name_match = NOTEBOOK_NAME.match(solution_name)
    if not name_match:
        raise CourseError(f"solutions/{solution_name}: expected a name like NN_topic.ipynb")
    chapter = int(name_match[1])
    nb = copy.deepcopy(solution)
    has_ids = (nb.nbformat, nb.nbformat_minor) >= (4, 5)
    seen: set[str] = set()
    for i, cell in enumerate(nb.cells):
        if has_ids and "id" not in cell:
            cell["id"] = f"cell-{i}"  # deterministic, unlike nbformat's random fill-in
        if cell.cell_type != "code" or BEGIN_SOLUTION not in cell.source:
            continue
        where = f"solutions/{solution_name} cell {i}"
        header = exercise_header(cell.source)
        if header is None:
            raise CourseError(f"{where}: a solution region needs a '# Exercise N.M: title' line above it")
        number, title = header
        if int(number.split(".")[0]) != chapter:
            raise CourseError(f"{where}: Exercise {number} in notebook {name_match[1]}: expected {chapter}.M")
        if number in seen:
            raise CourseError(f"{where}: Exercise {number} appears twice")
        seen.add(number)
        cell.source = stub_source(cell.source, number, title, where)
        cell.outputs = []
        cell.execution_count = None
        cell.metadata.setdefault("minillm", {})["exercise"] = number
        tags = cell.metadata.setdefault("tags", [])
        if IGNORE_OUTPUT_TAG not in tags:
            tags.append(IGNORE_OUTPUT_TAG)
    for cell in nb.cells:  # check cells show no verdict before the learner runs them; a failing check raises
        if is_check_cell(cell):
            cell.source = "\n".join(line for line in cell.source.splitlines() if line.strip() != CHECK_MARKER)
            cell.outputs = []
            cell.execution_count = None
    note = nbformat.v4.new_markdown_cell(
        f"> Generated from `solutions/{solution_name}` by `python -m minillm.course build`: in the repository, edit "
        f"the solution and rebuild; do not edit this file.\n>\n"
        f"> Fill in each cell marked `# Exercise N.M: ...` by replacing its `raise NotImplementedError(...)` line, "
        f"then run the notebook from the top. Each check cell prints `Exercise N.M passed: k/k checks` or raises "
        f"an error naming what failed; its random cases are new on every run, and a failure names the seed that "
        f"replays them. Grade the whole notebook with `python -m minillm.course grade exercises/{solution_name}`."
    )
    if has_ids:
        note["id"] = NOTE_CELL_ID
    else:
        del note["id"]
    nb.cells.insert(0, note)
    return nb


def _expected_exercises(root: Path) -> dict[Path, str]:
    """exercises/X.ipynb -> its text, for every solutions/NN_*.ipynb under `root`."""
    expected = {}
    for solution_path in sorted((root / "solutions").glob("[0-9][0-9]_*.ipynb")):
        nb = build_exercise(read_notebook(solution_path), solution_path.name)
        expected[root / "exercises" / solution_path.name] = render(nb)
    return expected


def _is_generated(path: Path) -> bool:
    cells = read_notebook(path).cells
    return bool(cells) and "by `python -m minillm.course build`" in cells[0].source


def build(root: Path | None = None) -> list[Path]:
    """Write every exercise whose text changed, remove generated exercises whose solution is gone; return them."""
    root = Path(root or default_root())
    expected = _expected_exercises(root)
    changed = []
    (root / "exercises").mkdir(exist_ok=True)
    for path, text in expected.items():
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
            changed.append(path)
    for path in sorted((root / "exercises").glob("*.ipynb")):
        if path not in expected and _is_generated(path):
            path.unlink()
            changed.append(path)
    return changed


def check(root: Path | None = None) -> list[str]:
    """Problems that `build` would fix: exercises missing, out of date, or left over from a removed solution."""
    root = Path(root or default_root())
    expected = _expected_exercises(root)
    problems = []
    for path, text in expected.items():
        rel = path.relative_to(root)
        if not path.exists():
            problems.append(f"{rel}: missing")
        elif path.read_text(encoding="utf-8") != text:
            problems.append(f"{rel}: out of sync with solutions/{path.name}")
    for path in sorted((root / "exercises").glob("*.ipynb")):
        if path not in expected:
            problems.append(f"{path.relative_to(root)}: no solutions/{path.name}")
    return problems


def nbval_env() -> dict[str, str]:
    """Environment for a notebook run: this minillm importable, no GUI backend.

    Nothing about Triton: minillm itself switches the interpreter on where there is no GPU, and the notebook runs
    must prove that a learner who sets nothing gets the kernels.
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    package_parent = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH")) if p)
    env["MPLBACKEND"] = "Agg"
    return env


def nbval_command(notebook: Path, lax: bool = False) -> list[str]:
    """pytest + nbval on one notebook: `lax` compares only # NBVAL_CHECK_OUTPUT cells (lecture notebooks)."""
    return [
        sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
        "--nbval-lax" if lax else "--nbval", "--nbval-current-env",
        "--nbval-sanitize-with", str(SANITIZE_FILE),
        "--nbval-cell-timeout", str(NOTEBOOK_TIMEOUT_S),
        str(notebook),
    ]  # fmt: skip


def run_nbval(notebook: Path, root: Path, lax: bool = False, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `notebook` under nbval in a subprocess; stdout and stderr are captured together in .stdout."""
    return subprocess.run(
        nbval_command(notebook, lax),
        cwd=cwd or root,
        env=nbval_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=NOTEBOOK_TIMEOUT_S,
    )


def splice_answers(pristine: nbformat.NotebookNode, learner: nbformat.NotebookNode) -> list[str]:
    """Copy the source of each of the learner's exercise cells into `pristine`; return the exercises not found."""
    missing = []
    for number, i in exercise_cells(pristine).items():
        candidates = [c for c in learner.cells if c.get("metadata", {}).get("minillm", {}).get("exercise") == number]
        candidates += [
            c for c in learner.cells if c.cell_type == "code" and (exercise_header(c.source) or ("",))[0] == number
        ]
        if not candidates:
            missing.append(number)
            continue
        pristine.cells[i].source = candidates[0].source
    return missing


def pristine_exercise(name: str, root: Path) -> nbformat.NotebookNode:
    """The exercise `name` as shipped: built from the solution in a checkout, else the copy the wheel carries."""
    solution_path = root / "solutions" / name
    if solution_path.exists():
        return build_exercise(read_notebook(solution_path), name)
    shipped = repo.repo_path("exercises") / name
    if not shipped.exists():
        raise CourseError(f"no exercise named {name!r} to grade against (neither {solution_path} nor a shipped copy)")
    return read_notebook(shipped)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minillm.course", description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=None, help="course checkout (default: this one)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("build", help="write exercises/ from solutions/")
    commands.add_parser("check", help="exit 1 if exercises/ is out of sync with solutions/")
    grade_parser = commands.add_parser(
        "grade", help="grade exercise notebooks (files or folders of them): one row per exercise (minillm/grader.py)"
    )
    grade_parser.add_argument("paths", type=Path, nargs="+", help="notebooks, or folders searched for *.ipynb")
    grade_parser.add_argument("--out", type=Path, default=None, help="folder for grades.csv and grades.json")
    grade_parser.add_argument("--timeout", type=int, default=600, help="seconds per notebook (default 600)")
    commands.add_parser("sync", help="install cells, Colab metadata and README badges from pyproject's Repository")
    run_parser = commands.add_parser("run", help="execute notebooks in fresh kernels and store their outputs")
    run_parser.add_argument("notebooks", type=Path, nargs="+")
    args = parser.parse_args(argv)
    root = args.root or default_root()
    if args.command in ("sync", "run"):
        from minillm import notebooks  # lazy: it imports this module

        if args.command == "sync":
            for path in notebooks.sync(root):
                print(f"wrote {path.relative_to(root)}")
            return 0
        os.environ.pop("MPLBACKEND", None)  # the kernels inherit it: figures must render inline, as a learner sees
        for path in args.notebooks:
            print(f"{path}: {notebooks.run_and_store(path):.0f} s", flush=True)
        return 0
    if args.command == "build":
        for path in build(root):
            print(f"{'wrote' if path.exists() else 'removed'} {path.relative_to(root)}")
        return 0
    if args.command == "check":
        problems = check(root)
        for problem in problems:
            print(problem)
        if problems:
            print("run `python -m minillm.course build` (or `make exercises`) to fix", file=sys.stderr)
            return 1
        print(f"exercises in sync with solutions ({len(_expected_exercises(root))} notebooks)")
        return 0
    from minillm import grader  # lazy: it imports this module

    rows = grader.grade(args.paths, root, out=args.out, timeout_s=args.timeout)
    return 0 if rows and all(r.passed for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
