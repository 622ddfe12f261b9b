"""The notebooks' shared furniture holds: one install cell and Colab metadata everywhere, README badges for every
lecture, all from pyproject's Repository; no machine paths and no stuck progress bars in any stored output."""

import re
from pathlib import Path

import nbformat
import pytest

from minillm import course, notebooks

ROOT = Path(__file__).resolve().parents[1]
ALL_NOTEBOOKS = sorted(ROOT.glob("[ens]*/[0-9][0-9]_*.ipynb"))  # exercises/, notebooks/, solutions/


def test_install_cells_metadata_and_badges_agree_with_pyproject():
    problems = notebooks.check_sync(ROOT)
    assert not problems, "run `python -m minillm.course sync`:\n" + "\n".join(problems)


def test_citation_names_the_same_repository():
    assert f'repository-code: "{notebooks.repository_url(ROOT)}"' in (ROOT / "CITATION.cff").read_text()


@pytest.mark.parametrize("path", ALL_NOTEBOOKS, ids=[f"{p.parent.name}/{p.name}" for p in ALL_NOTEBOOKS])
def test_stored_outputs_hold_no_machine_paths_and_no_progress_bars(path):
    nb = course.read_notebook(path)
    assert not notebooks.local_paths(nb), f"absolute paths in stored outputs: {notebooks.local_paths(nb)}"
    assert not notebooks.progress_bars(nb), f"progress bars in stored outputs: {notebooks.progress_bars(nb)}"


@pytest.mark.parametrize(
    "text", ["/home/ada/minillm/x.json", "in /tmp/venv/lib", "C:\\Users\\ada", "'/work/main/benchmarks'", "~/x"]
)
def test_local_path_detector_finds(text):
    assert notebooks.LOCAL_PATH.search(text)


@pytest.mark.parametrize(
    "text", ["https://github.com/home/x", "benchmarks/results/engine-cpu.json", "tokens/s", "1/2 checks", "a/b"]
)
def test_local_path_detector_ignores(text):
    assert not notebooks.LOCAL_PATH.search(text)


def test_drop_progress_bars_keeps_everything_else():
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("work()")
    cell.outputs = [
        nbformat.v4.new_output("stream", name="stderr", text="decoding:   0%|    | 0/272 [00:00<?, ?it/s]\r"
                                                             "decoding: 100%|####| 272/272 [00:02<00:00]\n"),
        nbformat.v4.new_output("stream", name="stderr", text="a real warning\n"),
        nbformat.v4.new_output(
            "display_data",
            data={"text/plain": "Loading:   0%|          | 0/272 [00:00<?, ?it/s]",
                  "application/vnd.jupyter.widget-view+json": {"model_id": "x", "version_major": 2}},
        ),
        nbformat.v4.new_output("stream", name="stdout", text="42\n"),
    ]
    nb.cells = [cell, nbformat.v4.new_markdown_cell("text")]
    notebooks.drop_progress_bars(nb)
    assert [o.get("text") for o in cell.outputs] == ["a real warning\n", "42\n"]
    assert not notebooks.progress_bars(nb)
    nbformat.validate(nb)  # a markdown cell gets no outputs key (it once did, and Jupyter calls that invalid)


@pytest.mark.parametrize("path", ALL_NOTEBOOKS, ids=[f"{p.parent.name}/{p.name}" for p in ALL_NOTEBOOKS])
def test_every_notebook_is_valid_nbformat(path):
    nbformat.validate(course.read_notebook(path))


KERNEL_CLAIM = re.compile(r"kernel[^\n]*(==|\bmatch)", re.IGNORECASE)
LECTURES = sorted(ROOT.glob("notebooks/[0-9][0-9]_*.ipynb"))


@pytest.mark.parametrize("path", LECTURES, ids=[p.name for p in LECTURES])
def test_a_kernel_claim_proves_the_kernel_ran(path):
    """A cell that prints that a kernel matches must count its launches: a path that never reached the kernel (a
    padded batch, a backend set to the reference) would make "kernel == reference" compare the reference with itself.
    Cells that print source code (``inspect.getsource``) claim nothing."""
    for i, cell in enumerate(course.read_notebook(path).cells):
        printed = "".join(o.get("text", "") for o in cell.get("outputs", []))
        if cell.cell_type == "code" and "inspect.getsource" not in cell.source and KERNEL_CLAIM.search(printed):
            assert "count_kernel_launches" in cell.source, f"cell {i} claims a kernel result: {printed[:200]!r}"


# A sentence that gives a quantity (a ratio, a percentage, a time, a rate) as observed "here" was typed from one run:
# the next run may contradict it. Such numbers are printed from the measurement (display(Markdown(f"..."))) or
# asserted in a `# NBVAL_CHECK_OUTPUT` cell, never typed; a sentence that states such a bound says so ("checked").
# Datasheet figures, formulas, settings and citations are not "here".
QUANTITY = re.compile(r"\d+(?:\.\d+)?\s?(?:×|x\b|%|ms\b|µs\b|tok/s|tokens/s|GB/s|TB/s|GFLOP/s|TFLOP/s)")
OBSERVED_HERE = re.compile(r"\b(?:here|this (?:machine|device|run|CPU|GPU|laptop))\b", re.IGNORECASE)


@pytest.mark.parametrize("path", LECTURES, ids=[p.name for p in LECTURES])
def test_no_measured_number_is_typed_into_the_text(path):
    typed = []
    for i, cell in enumerate(course.read_notebook(path).cells):
        if cell.cell_type == "markdown":
            for sentence in re.split(r"(?<=[.!?;])\s+", cell.source):
                if QUANTITY.search(sentence) and OBSERVED_HERE.search(sentence) and "checked" not in sentence:
                    typed.append(f"cell {i}: {' '.join(sentence.split())[:160]}")
    assert not typed, "numbers typed as measured here; print them from the result instead:\n" + "\n".join(typed)
