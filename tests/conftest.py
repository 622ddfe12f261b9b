"""Shared test setup: Triton runs in its CPU interpreter when there is no GPU, and the real model loads once."""

import os

import torch

if not torch.cuda.is_available():
    # Must happen before anything imports triton.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

REAL_MODEL_FIXTURES = {"smollm", "hf_smollm"}


def pytest_collection_modifyitems(config, items):
    """Every test that loads the real model is slow (out of `make test-fast`); GPU tests skip without a GPU."""
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if REAL_MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def smollm():
    """The real embedded model (SmolLM2-135M-Instruct), fp32 on CPU, and its tokenizer."""
    import minillm

    return minillm.load_model("smollm2-135m", device="cpu", dtype=torch.float32)


@pytest.fixture
def tiny_model():
    """A small random Llama (seeded) for fast unit tests."""
    from minillm.config import ModelConfig
    from minillm.model import Transformer

    torch.manual_seed(0)
    return Transformer(ModelConfig.tiny()).eval()


@pytest.fixture(scope="session")
def hf_smollm():
    """transformers' own LlamaForCausalLM built from the same GGUF file: the parity reference."""
    from transformers import AutoModelForCausalLM

    from minillm.loading import embedded_gguf_path

    path = embedded_gguf_path("smollm2-135m")
    return AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, trust_remote_code=False
    ).eval()


def varied_tiny_model(seed: int = 0, **overrides):
    """A tiny random Llama whose layers matter: with the default init the tied embedding (std 1) dominates the
    residual stream and every position predicts its own token almost surely, whatever the layers do (prompt lookup
    would always guess right, a pruned layer would change nothing)."""
    from minillm.config import ModelConfig
    from minillm.model import Transformer

    torch.manual_seed(seed)
    model = Transformer(ModelConfig.tiny(**overrides)).eval()
    with torch.no_grad():
        model.embed_tokens.weight.normal_(0, 0.3)
        for p in model.layers.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1)
    return model


@pytest.fixture
def varied_model():
    """``varied_tiny_model()``: varied greedy text, so speculative guesses are accepted and rejected."""
    return varied_tiny_model()
