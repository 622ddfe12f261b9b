"""A learner's first cell, as Colab runs it: from a wheel of this checkout into an environment that has only what
Colab preinstalls (plus PyPI's unrelated `minillm`, which also installs `import minillm`), then a whole notebook.

No network beyond the package index: the wheel is built here and handed to the install cell through
MINILLM_COURSE_SOURCE (on Colab the cell installs from the repository instead); the model is the embedded one.
"""

import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest
import torch

import minillm

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = "00_setup_and_roofline.ipynb"
# What a Colab runtime already has, as far as this course cares (Colab's torch is a CUDA build with triton).
COLAB_PREINSTALLED = [
    f"torch=={torch.__version__.split('+')[0]}", "transformers", "accelerate", "safetensors", "tqdm", "numpy",
    "pandas", "matplotlib", "ipywidgets", "ipykernel", "nbformat", "nbclient", "triton; platform_system == 'Linux'",
]
EXECUTE = """
import sys, nbclient, nbformat
nb = nbformat.read(sys.argv[1], as_version=4)
nbclient.NotebookClient(nb, timeout=900, kernel_name="python3").execute()
nbformat.write(nb, sys.argv[1])
"""
INSPECT = """
import json, minillm
from pathlib import Path
from minillm import course, repo
exercise = course.pristine_exercise("01_llm_from_scratch.ipynb", Path.cwd())
print(json.dumps({"distribution": minillm.__distribution__, "in_checkout": repo.in_checkout(),
                  "results": [p.name for p in repo.stored_results("engine")],
                  "exercise_cells": len(exercise.cells), "sanitize": course.SANITIZE_FILE.exists()}))
"""


def run(*args, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(args, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{' '.join(map(str, args))[:200]}\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
    return result


@pytest.mark.slow
def test_first_cell_installs_the_course_from_a_wheel_and_a_notebook_runs(tmp_path):
    dist = tmp_path / "dist"
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(dist), str(ROOT), timeout=600)
    (wheel,) = dist.glob("minillm_course-*.whl")

    env_dir = tmp_path / "colab"
    venv.create(env_dir, with_pip=True)
    python = str(env_dir / "bin" / "python")
    run(python, "-m", "pip", "install", "--quiet", *COLAB_PREINSTALLED, timeout=900)
    run(python, "-m", "pip", "install", "--quiet", "--no-deps", "minillm==2.1", timeout=300)  # PyPI's other minillm

    workdir = tmp_path / "content"  # Colab's working folder: no checkout in sight
    workdir.mkdir()
    notebook = workdir / NOTEBOOK
    notebook.write_text((ROOT / "notebooks" / NOTEBOOK).read_text())
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET", "VIRTUAL_ENV")}
    env.update(MINILLM_COURSE_SOURCE=wheel.as_uri(), MPLBACKEND="Agg")
    run(python, "-c", EXECUTE, str(notebook), cwd=workdir, env=env, timeout=1500)

    import nbformat

    executed = nbformat.read(notebook, as_version=4)
    errors = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    doctor = "".join(o.get("text", "") for c in executed.cells for o in c.get("outputs", []) if "minillm doctor" in
                     o.get("text", ""))
    assert f"{minillm.__version__} (installed)" in doctor and "interpreter" in doctor, doctor

    info = json.loads(run(python, "-c", INSPECT, cwd=workdir, env=env, timeout=300).stdout.strip().splitlines()[-1])
    committed = sorted(p.name for p in (ROOT / "benchmarks" / "results").glob("engine-*.json"))
    assert info == {"distribution": "minillm-course", "in_checkout": False, "results": committed,
                    "exercise_cells": info["exercise_cells"], "sanitize": True}
    assert info["exercise_cells"] > 3
    files = run(python, "-m", "pip", "show", "--files", "minillm-course", env=env).stdout
    assert "minillm/config.py" in files
    other = subprocess.run([python, "-m", "pip", "show", "minillm"], capture_output=True, text=True, env=env)
    assert other.returncode != 0, "the unrelated minillm is still installed"
