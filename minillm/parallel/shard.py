"""One rank's piece of the model: which slice of every weight it holds, read straight from the checkpoint.

``plan_shards(config, W)`` says, for each rank, its query and KV heads (``heads.py``), its slice of the MLP's hidden
width and its slice of the vocabulary. ``build_shard(config, read, plan, group)`` builds a ``Transformer`` whose
attention and MLP are that rank's slices: its config says ``num_heads = len(q_heads)`` and so on, so the model
code and the paged KV pool (which only holds this rank's KV heads) need no change; the projections are the parallel
layers of ``layers.py``.

``read(name, dim, start, end)`` returns rows (dim 0) or columns (dim 1) [start, end) of one checkpoint tensor.
``checkpoint_reader`` answers it from safetensors files with ``get_slice``, which reads only those bytes: a rank
never holds the full model, not even while loading. ``model_reader`` slices a model already in memory (tests,
notebook 11).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from minillm.config import ModelConfig
from minillm.model import Transformer
from minillm.parallel.heads import HeadShard, assign_heads, split_evenly
from minillm.parallel.layers import ColumnParallelLinear, ParallelLMHead, RowParallelLinear, VocabParallelEmbedding

Reader = Callable[[str, int, int, int], torch.Tensor]


@dataclass(frozen=True)
class RankShard:
    """Rank `rank`'s slices: heads, the MLP's hidden features [mlp_start, mlp_end), vocabulary rows
    [vocab_start, vocab_start + vocab_rows) (the last rank's may run past the vocabulary: those rows are zeros)."""

    rank: int
    world_size: int
    heads: HeadShard
    mlp_start: int
    mlp_end: int
    vocab_start: int
    vocab_rows: int


def plan_shards(config: ModelConfig, world_size: int) -> list[RankShard]:
    heads = assign_heads(config.num_heads, config.num_kv_heads, world_size)
    mlp = split_evenly(config.intermediate_size, world_size)
    # Equal vocabulary slices (all-gather wants equal sizes), the last one padded.
    rows = -(-config.vocab_size // world_size)
    starts = [sum(mlp[:r]) for r in range(world_size)]
    return [RankShard(r, world_size, heads[r], starts[r], starts[r] + mlp[r], r * rows, rows)
            for r in range(world_size)]


def local_config(config: ModelConfig, shard: RankShard) -> ModelConfig:
    """The config this rank's model sees: its own head counts and MLP width (vocabulary and hidden size stay)."""
    return dataclasses.replace(
        config, num_heads=len(shard.heads.q_heads), num_kv_heads=len(shard.heads.kv_heads),
        intermediate_size=shard.mlp_end - shard.mlp_start, head_dim=config.head_dim,
    )


def build_shard(config: ModelConfig, read: Reader, shard: RankShard, group=None, device="cpu",
                dtype: torch.dtype = torch.float32) -> Transformer:
    """The Transformer of one rank, its weights read slice by slice with `read` (see the module docstring)."""
    cfg, D, C = local_config(config, shard), config.head_dim, config.hidden_size
    q0, q1 = shard.heads.q_heads[0] * D, (shard.heads.q_heads[-1] + 1) * D  # rows of q_proj, columns of o_proj
    kv0, kv1 = shard.heads.kv_heads[0] * D, (shard.heads.kv_heads[-1] + 1) * D
    m0, m1 = shard.mlp_start, shard.mlp_end

    def load(name, dim=0, start=None, end=None):
        if start is None:
            return read(name, 0, 0, -1).to(device=device, dtype=dtype, copy=True)
        return read(name, dim, start, end).to(device=device, dtype=dtype, copy=True)

    with torch.device("meta"):
        model = Transformer(cfg)
    bias = config.attention_bias
    for i, layer in enumerate(model.layers):
        p = f"layers.{i}."
        attn, mlp = layer.self_attn, layer.mlp
        attn.q_proj = ColumnParallelLinear(C, q1 - q0, bias, q0)
        attn.k_proj = ColumnParallelLinear(C, kv1 - kv0, bias, kv0)
        attn.v_proj = ColumnParallelLinear(C, kv1 - kv0, bias, kv0)
        attn.o_proj = RowParallelLinear(q1 - q0, C, False, q0, group)
        mlp.gate_proj = ColumnParallelLinear(C, m1 - m0, False, m0)
        mlp.up_proj = ColumnParallelLinear(C, m1 - m0, False, m0)
        mlp.down_proj = RowParallelLinear(m1 - m0, C, False, m0, group)
        state = {
            "self_attn.q_proj.weight": load(p + "self_attn.q_proj.weight", 0, q0, q1),
            "self_attn.k_proj.weight": load(p + "self_attn.k_proj.weight", 0, kv0, kv1),
            "self_attn.v_proj.weight": load(p + "self_attn.v_proj.weight", 0, kv0, kv1),
            "self_attn.o_proj.weight": load(p + "self_attn.o_proj.weight", 1, q0, q1),
            "mlp.gate_proj.weight": load(p + "mlp.gate_proj.weight", 0, m0, m1),
            "mlp.up_proj.weight": load(p + "mlp.up_proj.weight", 0, m0, m1),
            "mlp.down_proj.weight": load(p + "mlp.down_proj.weight", 1, m0, m1),
            "input_layernorm.weight": load(p + "input_layernorm.weight"),
            "post_attention_layernorm.weight": load(p + "post_attention_layernorm.weight"),
        }
        if bias:
            for name, (a, b) in [("q_proj", (q0, q1)), ("k_proj", (kv0, kv1)), ("v_proj", (kv0, kv1))]:
                state[f"self_attn.{name}.bias"] = load(f"{p}self_attn.{name}.bias", 0, a, b)
        layer.load_state_dict(state, assign=True)
    model.norm.load_state_dict({"weight": load("norm.weight")}, assign=True)

    V, v0, rows = config.vocab_size, shard.vocab_start, shard.vocab_rows
    model.embed_tokens = VocabParallelEmbedding(rows, C, v0, V, group)
    embedding = load("embed_tokens.weight", 0, v0, min(v0 + rows, V))  # (rows or fewer, C)
    model.embed_tokens.weight = torch.nn.Parameter(_padded_rows(embedding, rows))
    if config.tie_word_embeddings:
        head = model.embed_tokens.weight
    else:
        head = torch.nn.Parameter(_padded_rows(load("lm_head.weight", 0, v0, min(v0 + rows, V)), rows))
    model.lm_head = ParallelLMHead(head, V, group)
    model.inv_freq = model.inv_freq.to(device)
    model.requires_grad_(False)
    return model.eval()


def _padded_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """(r, C) -> (rows, C), zeros below: the last rank's vocabulary slice padded to the common size."""
    if x.shape[0] == rows:
        return x
    return torch.cat([x, x.new_zeros(rows - x.shape[0], x.shape[1])])


# ---------------------------------------------------------------------------------------------------------------
# Readers


def model_reader(model: torch.nn.Module) -> Reader:
    """Slices of a model already in memory (its state dict, Hugging Face names)."""
    state = model.state_dict()
    if "lm_head.weight" not in state:
        state["lm_head.weight"] = model.lm_head.weight

    def read(name: str, dim: int, start: int, end: int) -> torch.Tensor:
        t = state[name]
        return t if end == -1 else t.narrow(dim, start, end - start)

    return read


def checkpoint_reader(files: list[Path], prefix: str = "") -> Reader:
    """Slices read from safetensors files without loading whole tensors (``safe_open(...).get_slice``)."""
    from safetensors import safe_open

    handles = [safe_open(str(f), framework="pt") for f in files]
    where = {key.removeprefix(prefix): (h, key) for h in handles for key in h.keys()}

    def read(name: str, dim: int, start: int, end: int) -> torch.Tensor:
        if name not in where:
            raise ValueError(f"the checkpoint ({', '.join(str(f) for f in files)}) has no tensor {name!r}")
        handle, key = where[name]
        if end == -1:
            return handle.get_tensor(key)
        piece = handle.get_slice(key)
        return piece[start:end] if dim == 0 else piece[:, start:end]

    return read


def checkpoint_source(name_or_path: str) -> tuple[ModelConfig, list[Path], str, object]:
    """(config, safetensors files, key prefix, tokenizer) of a model name or path, without loading its weights.

    A GGUF model (the embedded ones included) is read from the weight cache's safetensors entry, converted once
    here if it is not there yet; a Hugging Face folder from its own safetensors files; a hub id after download.
    """
    from minillm import loading
    from minillm.weight_cache import cache_dir, content_key

    path = Path(str(name_or_path)).expanduser()
    gguf = None
    if str(name_or_path) in loading.EMBEDDED_MODELS:
        gguf = loading.embedded_gguf_path(str(name_or_path))
    elif path.is_file() and path.suffix == ".gguf":
        gguf = path
    if gguf is not None:
        folder = cache_dir() / f"{gguf.stem}-{content_key(gguf)}"
        if not (folder / "model.safetensors").exists():
            loading.load_gguf(gguf)  # converts and writes the entry
        config = ModelConfig(**json.loads((folder / "minillm_config.json").read_text()))
        return config, [folder / "model.safetensors"], "", loading.load_tokenizer(folder)
    if not path.is_dir():
        if str(name_or_path).count("/") != 1 or path.exists():
            raise ValueError(
                f"unknown model {str(name_or_path)!r}: not one of the embedded models "
                f"{sorted(loading.EMBEDDED_MODELS)}, not an existing .gguf file or folder, and not a hub id like "
                "'org/name'"
            )
        path = loading.download_from_hub(str(name_or_path))
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} has no *.safetensors weights; minillm loads safetensors only")
    return loading._read_hf_config(path / "config.json"), files, "model.", loading.load_tokenizer(path)
