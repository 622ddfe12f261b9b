"""N:M semi-structured sparsity: keep N of every M consecutive input weights, and 2:4 on NVIDIA sparse tensor cores.

In doing so, you will learn about:
- why unstructured zeros do not make a GEMM faster (the hardware still multiplies them) while a fixed pattern can:
  since Ampere, NVIDIA tensor cores skip half the work when every group of 4 consecutive values along the reduction
  dimension holds at most 2 non-zeros. The matrix is stored compressed (the 2 values plus 2-bit indices), halving
  the math and the weight bytes (Mishra et al., "Accelerating Sparse Deep Neural Networks", arXiv 2104.08378);
- that the pattern costs accuracy: inside each group of 4 you must drop 2 weights even if all 4 matter, which is why
  2:4 loses more than 50% unstructured, and 4:8 (more freedom per group) sits in between (Wanda, arXiv 2306.11695,
  table 3);
- how PyTorch exposes it: ``torch.sparse.to_sparse_semi_structured`` turns a 2:4 fp16/bf16 CUDA weight into a tensor
  subclass that ``F.linear`` dispatches to cuSPARSELt or CUTLASS sparse kernels.

On CPU, or on GPUs older than Ampere, a 2:4-pruned model simply keeps its zeros in dense weights: the same numbers,
no speedup. Notebook 07 (``07_pruning``) measures the speedup against the dense matmul on a GPU.
"""

from __future__ import annotations

import re

import torch
from torch import nn

# Minimum shape both sparse backends accept for fp16/bf16 weights (cuSPARSELt wants multiples of 16, CUTLASS of 32
# rows and 64 columns); multiples of 64 on both sides satisfy both.
SEMI_STRUCTURED_MULTIPLE = 64
SEMI_STRUCTURED_DTYPES = (torch.float16, torch.bfloat16)


def parse_pattern(pattern: str) -> tuple[int, int]:
    """``"2:4"`` -> ``(2, 4)``: keep N of every M. Raises ValueError on anything else (N must be in 1..M-1)."""
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", pattern) if isinstance(pattern, str) else None
    if match is None:
        raise ValueError(f"pattern must be a string 'N:M' such as '2:4' or '4:8', got {pattern!r}")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise ValueError(f"pattern {pattern!r}: need 0 < N < M (keep N of every M weights), got N={n}, M={m}")
    return n, m


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask keeping the N highest scores in every group of M consecutive entries along the last dim.

    `score` is (out, in) with ``in % m == 0``; the mask has exactly ``n`` True values per group, so its sparsity is
    exactly ``1 - n / m``. Ties are broken by position (stable sort).
    """
    if score.dim() != 2:
        raise ValueError(f"score must be 2-D (out_features, in_features), got shape {tuple(score.shape)}")
    out_features, in_features = score.shape
    if in_features % m != 0:
        raise ValueError(f"pattern {n}:{m} needs in_features divisible by {m}, got in_features={in_features}")
    groups = score.reshape(out_features, in_features // m, m)  # (out, in/M, M)
    order = torch.sort(groups, dim=-1, stable=True).indices  # ascending: the first M-N are dropped
    mask = torch.ones_like(groups, dtype=torch.bool)
    mask.scatter_(-1, order[..., : m - n], False)
    return mask.reshape(out_features, in_features)


def is_nm_sparse(weight: torch.Tensor, n: int, m: int) -> bool:
    """Does every group of M consecutive inputs of `weight` (out, in) hold at most N non-zeros?"""
    out_features, in_features = weight.shape
    if in_features % m != 0:
        return False
    nonzeros = (weight != 0).reshape(out_features, in_features // m, m).sum(dim=-1)
    return bool((nonzeros <= n).all())


def semi_structured_supported(weight: torch.Tensor) -> bool:
    """Can `weight` become a hardware 2:4 sparse tensor here? CUDA, compute capability >= 8.0 (Ampere), fp16/bf16,
    both dims multiples of 64, and already 2:4 sparse."""
    if not weight.is_cuda or weight.dtype not in SEMI_STRUCTURED_DTYPES or weight.dim() != 2:
        return False
    if torch.cuda.get_device_capability(weight.device) < (8, 0):
        return False
    rows, cols = weight.shape
    if rows % SEMI_STRUCTURED_MULTIPLE or cols % SEMI_STRUCTURED_MULTIPLE:
        return False
    return is_nm_sparse(weight, 2, 4)


def to_sparse_24(weight: torch.Tensor) -> torch.Tensor:
    """Compress a 2:4-sparse CUDA weight into PyTorch's semi-structured tensor (cuSPARSELt, else CUTLASS)."""
    if not semi_structured_supported(weight):
        raise ValueError(
            f"weight of shape {tuple(weight.shape)}, dtype {weight.dtype} on {weight.device} cannot be converted: "
            "2:4 sparse tensors need a 2:4-pruned fp16/bf16 CUDA weight on an Ampere-or-newer GPU with both dims "
            f"multiples of {SEMI_STRUCTURED_MULTIPLE}"
        )
    from torch.sparse import SparseSemiStructuredTensorCUTLASS, to_sparse_semi_structured

    weight = weight.detach().contiguous()
    if torch.backends.cusparselt.is_available():
        return to_sparse_semi_structured(weight)
    return SparseSemiStructuredTensorCUTLASS.from_dense(weight)


def to_semi_structured(model: nn.Module) -> list[str]:
    """Swap every 2:4-sparse linear weight in ``model.layers`` for its compressed semi-structured form, in place.

    Layers that cannot be converted (CPU, fp32, old GPU, odd shapes, not 2:4 sparse) keep their dense weights with
    zeros, so this is always safe to call. Returns the names of the converted linear layers (empty off-GPU).
    Inference only: the converted weights do not train.
    """
    converted = []
    for name, module in model.layers.named_modules():
        if isinstance(module, nn.Linear) and semi_structured_supported(module.weight):
            module.weight = nn.Parameter(to_sparse_24(module.weight), requires_grad=False)
            converted.append(f"layers.{name}")
    return converted
