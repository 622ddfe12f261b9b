"""Saving a pruned, distilled student as a Hugging Face folder that ``minillm.load_model`` and ``minillm.LLM`` read.

In doing so, you will learn about:
  * what a checkpoint is: a ``config.json`` that gives the shape (here the pruned one: ``num_hidden_layers``,
    ``num_attention_heads``, ``num_key_value_heads``, ``head_dim``, ``intermediate_size``), the weights under their
    Hugging Face names in ``model.safetensors``, and the tokenizer files, so any Llama loader (transformers, vLLM,
    minillm's own ``loading.load_hf_folder``) rebuilds the model without the code that pruned it;
  * why ``head_dim`` must be written out: after head pruning ``num_heads * head_dim`` (6 x 64 = 384 for SmolLM2)
    no longer equals ``hidden_size`` (576), and a loader that derives ``head_dim = hidden_size / num_heads`` would
    build the wrong shapes;
  * safetensors (no pickle: loading a checkpoint runs no code) and tied embeddings: the LM head that shares the
    embedding matrix is stored once, as the embedding, and ``tie_word_embeddings`` tells the loader to tie it again.

Each file is written to a temporary name and renamed into place, so a crash never leaves a half-written file.
Notebook 08 (``08_distillation``) saves the distilled student and serves it with ``minillm.LLM``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from minillm.config import ModelConfig


def hf_config(config: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    """The ``config.json`` of a LlamaForCausalLM with this shape (``ModelConfig.from_hf_config`` reads it back)."""
    eos = config.eos_token_ids
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": config.rope_scaling,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        "attention_bias": config.attention_bias,
        "mlp_bias": False,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights under Hugging Face names (``model.layers.0.self_attn.q_proj.weight``, ``lm_head.weight``); a
    tied LM head is left out, as transformers does."""
    state = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            if not model.config.tie_word_embeddings:
                state[name] = tensor.detach().cpu().contiguous()
        else:
            state[f"model.{name}"] = tensor.detach().cpu().contiguous()
    return state


def _replace_file(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def save_checkpoint(model: nn.Module, tokenizer: Any, folder: str | Path) -> Path:
    """Write `model` (any minillm Transformer, pruned or not) and `tokenizer` into `folder` as config.json,
    model.safetensors and the tokenizer files; return the folder. ``minillm.load_model(folder)`` loads it back."""
    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    dtype = next(model.parameters()).dtype
    with tempfile.TemporaryDirectory(dir=folder, prefix=".tokenizer-") as tmp:
        tokenizer.save_pretrained(tmp)
        for file in Path(tmp).iterdir():
            os.replace(file, folder / file.name)
    _replace_file(folder / "model.safetensors",
                  lambda tmp: save_file(hf_state_dict(model), tmp, metadata={"format": "pt"}))
    config_text = json.dumps(hf_config(model.config, dtype), indent=2) + "\n"
    _replace_file(folder / "config.json", lambda tmp: Path(tmp).write_text(config_text))
    return folder
