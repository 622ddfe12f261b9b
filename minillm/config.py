"""The shape of a Llama-family model, in one small dataclass.

Everything the forward pass needs to know about a checkpoint fits in a dozen numbers: widths, head counts, the
RoPE base and the normalization epsilon. They come from a Hugging Face ``config.json`` or from the metadata of a
GGUF file (llama.cpp's format), and both are mapped here onto one ``ModelConfig``.
Notebook 01 (``01_llm_from_scratch``) walks through each field on the real SmolLM2 model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# Hugging Face architectures whose weights follow the Llama layout (RMSNorm, RoPE, GQA, SwiGLU).
SUPPORTED_HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
# GGUF `general.architecture` values we read; qwen2 adds biases to q/k/v.
SUPPORTED_GGUF_ARCHITECTURES = ("llama", "mistral", "qwen2")


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int  # C
    intermediate_size: int  # width of the SwiGLU MLP
    num_layers: int
    num_heads: int  # H, query heads
    num_kv_heads: int  # Hkv, key/value heads (H % Hkv == 0: grouped-query attention)
    head_dim: int | None = None  # D; None means hidden_size // num_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # e.g. Llama 3's {"rope_type": "llama3", "factor": 8.0, ...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2 has biases on q/k/v
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    name: str = "llama"

    def __post_init__(self):
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
            value = getattr(self, key)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{key} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads}) "
                "for grouped-query attention"
            )
        if self.head_dim is None:
            if self.hidden_size % self.num_heads != 0:
                raise ValueError(
                    f"hidden_size ({self.hidden_size}) is not divisible by num_heads ({self.num_heads}); "
                    "give head_dim explicitly"
                )
            self.head_dim = self.hidden_size // self.num_heads
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.rms_norm_eps <= 0 or self.rope_theta <= 0:
            raise ValueError(f"rms_norm_eps and rope_theta must be positive, got {self.rms_norm_eps}, {self.rope_theta}")

    @classmethod
    def tiny(cls, **overrides) -> ModelConfig:
        """A small random Llama for fast tests: 2 layers, C=64, H=4, Hkv=2, D=16, V=256."""
        values = dict(
            vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
            max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=1, eos_token_ids=[2], name="tiny",
        )
        values.update(overrides)
        return cls(**values)

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> ModelConfig:
        """Map a Hugging Face ``config.json`` (already parsed) of a Llama-family model."""
        archs = hf.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_HF_ARCHITECTURES), None)
        if arch is None:
            raise ValueError(
                f"unsupported architecture {archs or hf.get('model_type')!r}; "
                f"minillm runs {sorted(SUPPORTED_HF_ARCHITECTURES)}"
            )
        # transformers 5 writes `rope_parameters` (theta and scaling together); older configs `rope_theta` + `rope_scaling`.
        rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
        rope_theta = hf.get("rope_theta") or rope.get("rope_theta", 10000.0)
        rope_scaling = rope if rope.get("rope_type", rope.get("type", "default")) != "default" else None
        eos = hf.get("eos_token_id")
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            head_dim=hf.get("head_dim"),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            attention_bias=hf.get("attention_bias", SUPPORTED_HF_ARCHITECTURES[arch] == "qwen2"),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
            name=hf.get("_name_or_path") or SUPPORTED_HF_ARCHITECTURES[arch],
        )

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any], has_output_tensor: bool, has_qkv_bias: bool) -> ModelConfig:
        """Map GGUF metadata (keys like ``llama.block_count``) onto a config."""
        arch = meta.get("general.architecture")
        if arch not in SUPPORTED_GGUF_ARCHITECTURES:
            raise ValueError(f"unsupported GGUF architecture {arch!r}; minillm reads {list(SUPPORTED_GGUF_ARCHITECTURES)}")
        num_heads = meta[f"{arch}.attention.head_count"]
        hidden = meta[f"{arch}.embedding_length"]
        eos = meta.get("tokenizer.ggml.eos_token_id")
        vocab = meta.get(f"{arch}.vocab_size") or len(meta["tokenizer.ggml.tokens"])
        return cls(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=meta[f"{arch}.feed_forward_length"],
            num_layers=meta[f"{arch}.block_count"],
            num_heads=num_heads,
            num_kv_heads=meta.get(f"{arch}.attention.head_count_kv", num_heads),
            head_dim=meta.get(f"{arch}.attention.key_length"),
            rms_norm_eps=meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5),
            rope_theta=meta.get(f"{arch}.rope.freq_base", 10000.0),
            max_position_embeddings=meta.get(f"{arch}.context_length", 2048),
            tie_word_embeddings=not has_output_tensor,
            attention_bias=has_qkv_bias,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=[] if eos is None else [eos],
            name=meta.get("general.name", arch),
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def num_parameters(self) -> int:
        """Parameter count (tied embeddings counted once)."""
        C, D = self.hidden_size, self.head_dim
        qkv_out = (self.num_heads + 2 * self.num_kv_heads) * D
        attn = C * qkv_out + self.num_heads * D * C + (qkv_out if self.attention_bias else 0)
        mlp = 3 * C * self.intermediate_size
        per_layer = attn + mlp + 2 * C
        head = 0 if self.tie_word_embeddings else self.vocab_size * C
        return self.vocab_size * C + self.num_layers * per_layer + C + head
