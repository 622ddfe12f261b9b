"""Chapter 10, fast decoding: where a decode step's time goes and how engines win it back.

fused.py (Triton kernels for the small elementwise ops between matmuls), forward.py (the model's forward cut at
attention into pieces that can be fused or compiled), graphs.py (CUDA graphs for decode, per batch-size bucket),
buckets.py (the batch sizes graphs are captured for, and the padding up to them), execution.py (which of these
an ``LLM`` runs, chosen once, with fallbacks), profiler.py (one engine step split into Python, kernels and gaps) with
timeline.py (the gaps between kernels), traffic.py (the bytes a fusion saves), precision.py (fp32 vs bf16 vs fp16),
onnx_runtime.py (the same forward in a deployment runtime, for comparison). Notebook 10 explains them.
"""
