"""Making a student: a copy of the teacher cut narrower (heads, MLP channels) or shallower (whole layers).

In doing so, you will learn about:
  * the two axes of Minitron (Muralidharan et al., arXiv 2407.14679): width pruning reuses chapter
    07's ``prune_heads`` / ``prune_mlp_channels`` (Wanda-style activation scores); depth pruning drops the layers of
    least block influence (``depth.py``, ShortGPT arXiv 2403.03853). Both start from the teacher's weights, which
    is why a short retraining wins back much of the loss: the student already knows almost everything;
  * counting what a cut saves: SmolLM2-135M's tied embedding (V x C = 49152 x 576 = 28.3M parameters, 21% of the
    model) is untouched by both cuts, so "the student has 70% of the parameters" depends on whether it is counted;
    ``parameter_fraction`` says which (scaling-law papers count without it, Kaplan et al., arXiv 2001.08361;
    model names count it).

The teacher is never modified: every student starts as ``copy.deepcopy(teacher)``.
Notebook 08 (``08_distillation``) builds both students from SmolLM2.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
from torch import nn

from minillm.config import ModelConfig
from minillm.distill.depth import block_influence, drop_layers, layers_to_drop
from minillm.prune import count_parameters, prune_heads, prune_mlp_channels


def width_student(
    teacher: nn.Module,
    head_fraction: float,
    mlp_fraction: float,
    calibration: torch.Tensor | str | None = None,
    tokenizer: Any = None,
) -> nn.Module:
    """A copy of `teacher` with `head_fraction` of the query heads of every KV group and `mlp_fraction` of the MLP
    channels of every layer removed (chapter 07's Wanda scores on `calibration`, as in ``prune_heads``)."""
    student = copy.deepcopy(teacher)
    if head_fraction > 0:
        prune_heads(student, head_fraction, unit="query_head", calibration=calibration, tokenizer=tokenizer)
    if mlp_fraction > 0:
        prune_mlp_channels(student, mlp_fraction, calibration=calibration, tokenizer=tokenizer)
    return student


def depth_student(teacher: nn.Module, num_drop: int, calibration: torch.Tensor) -> tuple[nn.Module, list[int]]:
    """A copy of `teacher` without its `num_drop` layers of least block influence on `calibration` (B, T) ids.

    Returns the student and the kept teacher layer of each student layer (the ``layer_map`` of ``distill``).
    """
    influence = block_influence(teacher, calibration)
    student = copy.deepcopy(teacher)
    kept = drop_layers(student, layers_to_drop(influence, num_drop))
    return student, kept


def parameter_fraction(student: nn.Module, teacher: nn.Module, count_embedding: bool = True) -> float:
    """The student's parameters as a fraction of the teacher's: all of them (tied embedding counted once), or
    without the embedding (and an untied LM head of the same shape)."""

    def count(model: nn.Module) -> int:
        if count_embedding:
            return count_parameters(model)
        head = model.lm_head.weight
        untied = 0 if head is model.embed_tokens.weight else head.numel()
        return count_parameters(model) - model.embed_tokens.weight.numel() - untied

    return count(student) / count(teacher)


def student_config(config: ModelConfig, num_drop: int = 0, head_fraction: float = 0.0,
                   mlp_fraction: float = 0.0) -> ModelConfig:
    """The shape the cuts give, without building the model: `num_drop` fewer layers, ``round(head_fraction * G)``
    query heads fewer in every KV group of G, ``round(mlp_fraction * I)`` MLP channels fewer (the rounding of
    chapter 07's ``prune_heads(unit="query_head")`` and ``prune_mlp_channels``). Notebook 08's widget sizes
    students with it; its parameter count and ``bench.roofline.decode_bytes_table`` give their cost."""
    group = config.num_heads // config.num_kv_heads
    heads_cut, channels_cut = round(head_fraction * group), round(mlp_fraction * config.intermediate_size)
    if not 0 <= num_drop < config.num_layers:
        raise ValueError(f"num_drop must be in [0, {config.num_layers}) (keep at least one layer), got {num_drop}")
    if not (0 <= heads_cut < group and 0 <= channels_cut < config.intermediate_size):
        raise ValueError(f"head_fraction and mlp_fraction must keep at least one head per group and one channel, "
                         f"got {head_fraction} and {mlp_fraction}")
    return dataclasses.replace(
        config, num_layers=config.num_layers - num_drop, num_heads=config.num_kv_heads * (group - heads_cut),
        intermediate_size=config.intermediate_size - channels_cut, head_dim=config.head_dim,
    )
