"""Distillation (notebook 08): prune a model, then win its quality back by training it to imitate the original.

``kd_loss`` / ``next_token_loss`` / ``mixed_loss`` are the losses; ``teacher_corpus`` and ``token_stream`` make
training text without a download; ``block_influence`` / ``drop_layers`` cut whole layers and ``depth_student`` /
``width_student`` build students (the width cuts are chapter 07's ``prune_heads`` / ``prune_mlp_channels``);
``distill`` trains the student and returns its history; ``save_checkpoint`` writes a folder that
``minillm.load_model`` and ``minillm.LLM`` load.
"""

from minillm.distill.checkpoint import hf_config, hf_state_dict, save_checkpoint
from minillm.distill.data import (
    check_held_out,
    model_fingerprint,
    prompts_from_text,
    sample_batch,
    teacher_corpus,
    token_stream,
)
from minillm.distill.depth import block_influence, drop_layers, layers_to_drop
from minillm.distill.losses import (
    hidden_state_loss,
    kd_loss,
    mixed_loss,
    next_token_loss,
)
from minillm.distill.students import depth_student, parameter_fraction, student_config, width_student
from minillm.distill.train import (
    DistillHistory,
    capture_layer_outputs,
    check_student_teacher,
    distill,
    lr_at,
)

__all__ = [
    "DistillHistory",
    "block_influence",
    "capture_layer_outputs",
    "check_held_out",
    "check_student_teacher",
    "depth_student",
    "distill",
    "drop_layers",
    "hf_config",
    "hf_state_dict",
    "hidden_state_loss",
    "kd_loss",
    "layers_to_drop",
    "lr_at",
    "mixed_loss",
    "model_fingerprint",
    "next_token_loss",
    "parameter_fraction",
    "prompts_from_text",
    "sample_batch",
    "save_checkpoint",
    "student_config",
    "teacher_corpus",
    "token_stream",
    "width_student",
]
