"""minillm.fast.onnx_runtime: the exported prefill graph in ONNX Runtime gives minillm's logits at every shape.

Tolerance: ORT and torch sum the same fp32 products in different orders; on the tiny model (|logits| <= ~15) they
differ by ~1e-5, on SmolLM2 (|logits| <= ~30) by ~1e-4. We allow 1e-4 and 1e-3.
"""

import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnxruntime", reason="ONNX Runtime is not installed (pip install onnxruntime)")
pytest.importorskip("onnx", reason="onnx is not installed; the exporter needs it (pip install onnx)")

from conftest import varied_tiny_model  # noqa: E402

from minillm.fast.onnx_runtime import OnnxRunner, compare_logits, export_onnx, optimized_op_counts  # noqa: E402

TINY_ATOL = 1e-4
REAL_ATOL = 1e-3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A varied tiny model (its argmax depends on the layers, not only on the input token) and its export."""
    model = varied_tiny_model(seed=0)
    path = export_onnx(model, tmp_path_factory.mktemp("onnx") / "tiny.onnx", example_len=8)
    return model, OnnxRunner(path, num_threads=1)


@pytest.mark.parametrize("B", [1, 2, 3])
@pytest.mark.parametrize("T", [1, 2, 5, 8, 13])
def test_logits_match_minillm_on_odd_shapes(tiny, B, T):
    model, runner = tiny
    ids = torch.randint(0, model.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(B * 100 + T))
    result = compare_logits(model, runner, ids)
    assert result["max_abs_diff"] < TINY_ATOL, result
    assert result["argmax_agrees"] and result["argmax_agreement"] == 1.0, result
    assert runner(ids).shape == (B, T, model.config.vocab_size)


def test_batch_and_sequence_axes_are_symbolic(tiny):
    _, runner = tiny
    assert runner.session.get_inputs()[0].shape == ["B", "T"]
    assert runner.session.get_outputs()[0].shape[:2] == ["B", "T"]
    assert runner.vocab_size == 256


def test_ort_fuses_rmsnorm_and_silu_and_folds_constants(tiny):
    model, runner = tiny
    counts = optimized_op_counts(runner.path)
    num_layers = model.config.num_layers
    assert counts.get("SimplifiedLayerNormalization") == 2 * num_layers + 1, counts  # 2 per layer + the final norm
    assert counts.get("QuickGelu") == num_layers, counts  # silu(gate)
    assert counts.get("FusedMatMul") == num_layers, counts  # q k^T * scale
    assert "Constant" not in counts, counts


def test_missing_and_corrupt_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.onnx"):
        OnnxRunner(tmp_path / "nothing.onnx")
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07 not a protobuf at all" * 10)
    with pytest.raises(ValueError, match="corrupt.onnx"):
        OnnxRunner(corrupt)
    with pytest.raises(ValueError, match="corrupt.onnx"):
        optimized_op_counts(corrupt)


def test_truncated_export_is_named(tiny, tmp_path):
    _, runner = tiny
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(runner.path.read_bytes()[:5000])
    with pytest.raises(ValueError, match="truncated.onnx"):
        OnnxRunner(truncated)


def test_wrong_inputs_give_clear_errors(tiny):
    _, runner = tiny
    with pytest.raises(TypeError, match="int64"):
        runner(torch.zeros(1, 4, dtype=torch.int32))
    with pytest.raises(TypeError, match="torch.Tensor"):
        runner([[1, 2, 3]])
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        runner(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        runner(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        runner(torch.tensor([[1, 256]]))
    with pytest.raises(ValueError, match="num_threads"):
        OnnxRunner(runner.path, num_threads=0)


def test_export_rejects_what_it_cannot_export(tmp_path):
    model = varied_tiny_model(seed=1)
    with pytest.raises(ValueError, match="example_len"):
        export_onnx(model, tmp_path / "short.onnx", example_len=1)
    with pytest.raises(ValueError, match="bf16.onnx"):
        export_onnx(model.to(torch.bfloat16), tmp_path / "bf16.onnx")
    with pytest.raises(TypeError, match="plain.onnx"):
        export_onnx(torch.nn.Linear(2, 2), tmp_path / "plain.onnx")


def test_missing_onnxruntime_says_how_to_install(tiny, monkeypatch):
    _, runner = tiny
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` raise ImportError
    with pytest.raises(ImportError, match="pip install onnxruntime"):
        OnnxRunner(runner.path)


def test_missing_onnx_is_named_before_exporting(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # importlib.util.find_spec("onnx") -> None
    with pytest.raises(ImportError, match="pip install onnx"):
        export_onnx(varied_tiny_model(seed=1), tmp_path / "never.onnx")
    assert not (tmp_path / "never.onnx").exists()


@pytest.mark.sweep  # tens of seconds to export even the tiny model; the default exporter is the tracer
def test_dynamo_exporter_gives_the_same_logits(tmp_path):
    pytest.importorskip("onnxscript", reason="the dynamo exporter needs onnxscript (pip install onnxscript)")
    model = varied_tiny_model(seed=2)
    runner = OnnxRunner(export_onnx(model, tmp_path / "dynamo.onnx", example_len=4, dynamo=True), num_threads=1)
    for B, T in [(1, 1), (3, 13)]:
        ids = torch.randint(0, model.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(T))
        result = compare_logits(model, runner, ids)
        assert result["max_abs_diff"] < TINY_ATOL and result["argmax_agrees"], (B, T, result)


@pytest.mark.sweep  # ~75 s; notebook 10 checks the real model's ONNX logits in every CI run
def test_smollm_export_matches_minillm(smollm):
    """Slow (the real model): export SmolLM2-135M, then logits within 1e-3 and the same greedy text."""
    model, tok = smollm
    with tempfile.TemporaryDirectory() as folder:  # ~650 MB: removed at once, not kept with pytest's tmp dirs
        start = time.perf_counter()
        path = export_onnx(model, Path(folder) / "smollm2.onnx")
        export_s = time.perf_counter() - start
        start = time.perf_counter()
        runner = OnnxRunner(path)
        load_s = time.perf_counter() - start
        prompt = torch.tensor([tok("The capital of France is").input_ids])  # (1, T)
        on_prompt = compare_logits(model, runner, prompt)
        ids = torch.randint(0, model.config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(0))
        on_random = compare_logits(model, runner, ids)
        ort_ids, torch_ids = prompt, prompt
        with torch.no_grad():
            for _ in range(8):  # greedy, no cache: the graph recomputes the whole prefix each step
                ort_ids = torch.cat([ort_ids, runner(ort_ids)[:, -1:].argmax(-1)], dim=1)
                torch_ids = torch.cat([torch_ids, model(torch_ids)[:, -1:].argmax(-1)], dim=1)
    print(f"\nexport {export_s:.1f} s, session load {load_s:.1f} s; prompt {on_prompt}; random (2, 13) {on_random}; "
          f"greedy: {tok.decode(ort_ids[0])!r}")
    for result in (on_prompt, on_random):
        assert result["max_abs_diff"] < REAL_ATOL and result["argmax_agrees"], result
    assert torch.equal(ort_ids, torch_ids)
