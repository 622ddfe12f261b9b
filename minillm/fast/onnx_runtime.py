"""ONNX Runtime: minillm's prefill forward exported to a graph and run by a deployment runtime, as a peer to compare.

In doing so, you will learn about:
  * exporting a PyTorch model to ONNX (https://onnx.ai): a file holding a graph of standard operators and the
    weights, that runtimes in other languages and on other hardware load without Python or minillm;
  * dynamic axes: the graph is traced once at one example shape, and the batch B and sequence T axes are left
    symbolic, so one file serves every (B, T) -- every other shape in it (C, H, D, V) is frozen;
  * what a graph runtime's optimizer does for you (onnxruntime.ai/docs/performance/model-optimizations/
    graph-optimizations.html). With ORT_ENABLE_ALL on the CPU provider, ``optimized_op_counts`` shows for SmolLM2:
    constant folding (its ~2700 Constant nodes fold away; the shape arithmetic on the dynamic B and T stays as ~1600
    tiny Shape/Gather/Unsqueeze/Concat nodes); RMSNorm -> one ``SimplifiedLayerNormalization`` node (61 of them);
    silu(x) = x * sigmoid(x) -> ``QuickGelu``; q k^T * scale -> ``FusedMatMul``. It does *not* fuse the residual
    add into the norm (``SkipSimplifiedLayerNormalization``) nor the attention block into one ``Attention`` /
    ``GroupQueryAttention`` node here: those patterns are matched by the offline ``onnxruntime.transformers.optimizer``
    or written directly by the onnxruntime-genai model builder.

What a graph runtime cannot do with this graph, and minillm's engine does: there is no KV cache (each new token would
recompute the whole prefix; a cache would have to be explicit graph inputs/outputs of shape (B, Hkv, S, D), copied
in and out every step, contiguous per sequence), so no paged KV cache (block tables are engine bookkeeping, not graph
operators) and no continuous batching (the input is one rectangular (B, T) batch, not a packed mix of prefill chunks
and decode tokens with per-sequence metadata). And a graph is fixed per shape class: dynamic axes stretch one graph
over B and T, but dtype, structure and every other size are baked in; TensorRT goes further and builds one engine
per optimization profile (min/opt/max shapes). TensorRT-LLM (NVIDIA, described here, not run: it needs an NVIDIA
GPU) closes the gap by building TensorRT engines with a paged KV cache and in-flight (continuous) batching inside
its runtime -- the same ideas as chapters 04-05, in C++ and CUDA plugins.

Exporter choice (torch 2.13, onnxruntime 1.32, 2 CPU cores): the TorchScript tracer (``dynamo=False``, the default
here) exports SmolLM2-135M in ~35 s, the tiny test model in ~0.3 s, and its graph gets ORT's RMSNorm fusion. The
torch.export-based exporter (``dynamo=True``, torch's default since 2.9; it needs ``onnxscript``) checks every
dynamic dimension symbolically, but took 78 s (163 s with its own graph optimizer) on SmolLM2 and ~7 s on the tiny
model, and writes RMSNorm as Sqrt + Reciprocal, which ORT does not fuse. Both give the same logits to ~1e-4 and the
same ORT speed. Tracing records only the path the example took; minillm's forward has no data-dependent branch (its
shape checks only compare fixed sizes), and the tests run the graph at other shapes. The tracer is deprecated in
torch: when it goes, pass ``dynamo=True``. Weights stay in the .onnx file (SmolLM2 fp32: 650 MB, the tied embedding
stored twice, once transposed for the lm_head) unless they pass protobuf's 2 GB limit, where both exporters write
them to an external data file beside it.
Notebook 10 (``10_fast_decoding``) compares it with minillm's forward.

Shapes: B batch, T tokens, V vocab.
"""

from __future__ import annotations

import collections
import importlib.util
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

PROTOBUF_LIMIT_BYTES = 2**31 - 1  # one ONNX protobuf file cannot exceed 2 GB; bigger weights go to external data


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as exc:
        raise ImportError("minillm.fast.onnx_runtime needs ONNX Runtime: pip install onnxruntime") from exc
    return onnxruntime


def _load_session(ort, path: Path, options):
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT's errors (InvalidProtobuf, NoSuchFile, Fail...) derive from Exception only
        raise ValueError(f"{path} is not a loadable ONNX model ({exc}); export it again with export_onnx") from exc


def export_onnx(model: torch.nn.Module, path: str | Path, example_len: int = 8, dynamo: bool = False) -> Path:
    """Export the no-cache forward, input_ids (B, T) int64 -> logits (B, T, V) fp32, with B and T dynamic.

    The graph is traced on a (2, example_len) batch of token ids (batch 2, not 1: an exporter may specialize a
    size-1 axis). ``model`` must be fp32 (ORT's CPU provider runs fp32). Returns the path written.
    """
    path = Path(path)
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"export_onnx({str(path)!r}): model must be a minillm Transformer, got {type(model).__name__}")
    param = next(model.parameters())
    if param.dtype != torch.float32:
        raise ValueError(f"export_onnx({str(path)!r}): model is {param.dtype}; export an fp32 model (model.float())")
    max_len = model.config.max_position_embeddings
    if not isinstance(example_len, int) or not 2 <= example_len <= max_len:
        raise ValueError(f"export_onnx({str(path)!r}): example_len must be an int in [2, {max_len}], "
                         f"got {example_len!r}")
    for package in ("onnx", "onnxscript") if dynamo else ("onnx",):  # torch imports them only mid-export
        if importlib.util.find_spec(package) is None:
            raise ImportError(f"exporting {path} needs {package} (dynamo=True also onnxscript): pip install {package}")
    path.parent.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)  # the example's values don't matter; keep the global RNG untouched
    example = torch.randint(0, model.config.vocab_size, (2, example_len), generator=generator).to(param.device)
    names = dict(input_names=["input_ids"], output_names=["logits"])
    try:
        with torch.no_grad():
            if dynamo:
                from torch.export import Dim

                dims = {"input_ids": {0: Dim("B", min=1), 1: Dim("T", min=1, max=max_len)}}
                num_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
                # optimize=False: ORT folds constants at load anyway, and the exporter's optimizer doubles export time.
                torch.onnx.export(model, (example,), str(path), dynamo=True, dynamic_shapes=dims, optimize=False,
                                  external_data=num_bytes >= PROTOBUF_LIMIT_BYTES, **names)
            else:
                with warnings.catch_warnings():
                    # The tracer is deprecated (see the module docstring), and it warns about every Python bool
                    # taken from a shape: minillm's checks on fixed sizes (H % Hkv, k.shape == v.shape).
                    warnings.simplefilter("ignore", DeprecationWarning)
                    warnings.simplefilter("ignore", torch.jit.TracerWarning)
                    torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=17,
                                      dynamic_axes={"input_ids": {0: "B", 1: "T"}, "logits": {0: "B", 1: "T"}},
                                      **names)
    except Exception as exc:  # the exporters raise many types; say which file failed and keep the cause
        raise RuntimeError(f"exporting the model to {path} failed: {type(exc).__name__}: {exc}") from exc
    return path


class OnnxRunner:
    """An ``onnxruntime.InferenceSession`` over an exported graph: ``runner(input_ids (B, T) int64) -> (B, T, V)``.

    CPUExecutionProvider with ORT_ENABLE_ALL graph optimizations (see the module docstring for what they fuse).
    ``num_threads=None`` lets ORT pick (one thread per physical core).
    """

    def __init__(self, path: str | Path, num_threads: int | None = None):
        ort = _import_onnxruntime()
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no ONNX model at {self.path}; write one with export_onnx(model, path)")
        if num_threads is not None and (not isinstance(num_threads, int) or num_threads < 1):
            raise ValueError(f"num_threads must be a positive int or None, got {num_threads!r}")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if num_threads is not None:
            options.intra_op_num_threads = num_threads
        self.session = _load_session(ort, self.path, options)
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or inputs[0].type != "tensor(int64)":
            raise ValueError(f"{self.path} must take one int64 input_ids tensor, its inputs are "
                             f"{[(i.name, i.type) for i in inputs]}; export it with export_onnx")
        self.input_name = inputs[0].name
        vocab = self.session.get_outputs()[0].shape[-1]
        self.vocab_size = vocab if isinstance(vocab, int) else None
        self.num_threads = num_threads

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (B, T) int64 -> logits (B, T, V) fp32, on input_ids' device (ORT itself runs on the CPU)."""
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
        if input_ids.dtype != torch.int64:
            raise TypeError(f"input_ids must be torch.int64 (the graph's input type), got {input_ids.dtype}")
        if input_ids.dim() != 2 or input_ids.numel() == 0:
            raise ValueError(f"input_ids must be a non-empty (B, T) tensor, got shape {tuple(input_ids.shape)}")
        if self.vocab_size is not None and not (0 <= int(input_ids.min()) and int(input_ids.max()) < self.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.vocab_size}), got min {int(input_ids.min())}, "
                             f"max {int(input_ids.max())}")
        (logits,) = self.session.run(None, {self.input_name: input_ids.cpu().numpy()})
        return torch.from_numpy(logits).to(input_ids.device)


@torch.no_grad()
def compare_logits(model: torch.nn.Module, runner: OnnxRunner, input_ids: torch.Tensor) -> dict[str, Any]:
    """minillm's ``model(input_ids)`` vs the runner's logits on the same (B, T) ids.

    Returns max_abs_diff and mean_abs_diff over all (B, T, V) logits, argmax_agrees (the top-1 token equal at every
    position) and argmax_agreement (the fraction of the B * T positions where it is).
    """
    expected = model(input_ids.to(next(model.parameters()).device)).float().cpu()  # (B, T, V)
    got = runner(input_ids.cpu()).float()  # (B, T, V)
    if got.shape != expected.shape:
        raise ValueError(f"{runner.path} gives logits of shape {tuple(got.shape)}, the model {tuple(expected.shape)}")
    diff = (got - expected).abs()
    same_top1 = got.argmax(-1) == expected.argmax(-1)  # (B, T)
    return {
        "max_abs_diff": diff.max().item(),
        "mean_abs_diff": diff.mean().item(),
        "argmax_agrees": bool(same_top1.all()),
        "argmax_agreement": same_top1.float().mean().item(),
    }


def optimized_op_counts(path: str | Path) -> dict[str, int]:
    """How many nodes of each operator type the graph has after ORT_ENABLE_ALL: the fusions, counted.

    ORT writes its optimized graph to a temporary folder (weights as external data beside it), read back with onnx.
    """
    ort, path = _import_onnxruntime(), Path(path)
    import onnx

    with tempfile.TemporaryDirectory() as folder:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = str(Path(folder) / "optimized.onnx")
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", "weights.bin")
        options.log_severity_level = 3  # hide "serialized graph may be hardware specific": we only count its nodes
        _load_session(ort, path, options)
        graph = onnx.load(options.optimized_model_filepath, load_external_data=False).graph
        return dict(collections.Counter(node.op_type for node in graph.node).most_common())
