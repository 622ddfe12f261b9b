"""Pruning (notebook 07): zero weights by magnitude or Wanda, unstructured or N:M, and remove heads and channels.

``prune_model`` zeroes weights in place; ``sparsity_report`` checks the result; ``to_semi_structured`` turns 2:4
zeros into a GPU speedup; ``prune_heads`` / ``prune_mlp_channels`` shrink the matrices; ``sensitivity_scan`` finds
the layers that suffer most.
"""

from minillm.eval import calibration_batch
from minillm.prune.magnitude import magnitude_mask, magnitude_score, row_mask
from minillm.prune.pruning import PRUNE_METHODS, model_sparsity, prunable_linears, prune_model, sparsity_report
from minillm.prune.semistructured import (
    is_nm_sparse,
    nm_mask,
    parse_pattern,
    semi_structured_supported,
    to_semi_structured,
)
from minillm.prune.sensitivity import sensitivity_scan
from minillm.prune.structured import StructuredPruneResult, count_parameters, prune_heads, prune_mlp_channels
from minillm.prune.wanda import InputNormCollector, wanda_score

__all__ = [
    "PRUNE_METHODS",
    "InputNormCollector",
    "StructuredPruneResult",
    "calibration_batch",
    "count_parameters",
    "is_nm_sparse",
    "magnitude_mask",
    "magnitude_score",
    "model_sparsity",
    "nm_mask",
    "parse_pattern",
    "prunable_linears",
    "prune_heads",
    "prune_mlp_channels",
    "prune_model",
    "row_mask",
    "semi_structured_supported",
    "sensitivity_scan",
    "sparsity_report",
    "to_semi_structured",
    "wanda_score",
]
