"""The KV memory calculator: how many bytes a cached token costs, and what a contiguous cache reserves.

In doing so, you will learn about:
  * the cost of one cached token: every layer stores a key and a value of Hkv heads of D numbers,
    2 x L x Hkv x D x bytes per element; grouped-query attention (arXiv:2305.13245) shrinks it by H / Hkv;
  * the reservation of a contiguous cache: batch x max_len tokens, claimed before a single token is generated;
  * its waste for a realistic mix of request lengths: every request reserves the longest it could get, most stop
    far earlier. Kwon et al. (PagedAttention, arXiv:2309.06180, section 3) measured that only 20-38% of KV memory
    held real tokens in such systems; paging (chapter 04) reserves one block of BS tokens at a time instead.
Explained in notebooks/03_kv_cache.ipynb. Pure arithmetic: no tensors are allocated here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from minillm.config import ModelConfig

# Public shapes (from each checkpoint's config.json) for the calculator: small to large, MHA vs GQA.
KV_PRESETS: dict[str, ModelConfig] = {
    "SmolLM2-135M": ModelConfig(49152, 576, 1536, 30, 9, 3, tie_word_embeddings=True, name="SmolLM2-135M"),
    "SmolLM2-360M": ModelConfig(49152, 960, 2560, 32, 15, 5, tie_word_embeddings=True, name="SmolLM2-360M"),
    "SmolLM2-1.7B": ModelConfig(49152, 2048, 8192, 24, 32, 32, tie_word_embeddings=True, name="SmolLM2-1.7B"),
    "Llama-2-7B": ModelConfig(32000, 4096, 11008, 32, 32, 32, name="Llama-2-7B"),
    "Llama-3.1-8B": ModelConfig(128256, 4096, 14336, 32, 32, 8, name="Llama-3.1-8B"),
    "Llama-3.1-70B": ModelConfig(128256, 8192, 28672, 80, 64, 8, name="Llama-3.1-70B"),
}


def as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A torch dtype, or its name ("float16", "bfloat16", "float32", "int8", ...) -> the torch dtype."""
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"unknown dtype name {dtype!r}; use a torch dtype name such as 'float16' or 'int8'")
        dtype = getattr(torch, dtype)
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype or its name, got {type(dtype).__name__} {dtype!r}")
    return dtype


def dtype_bytes(dtype: torch.dtype | str) -> int:
    """Bytes per element of a torch dtype, or of its name."""
    return torch.empty((), dtype=as_dtype(dtype)).element_size()


def kv_bytes_per_token(config: ModelConfig, dtype: torch.dtype | str = torch.float16, int8: bool = False) -> int:
    """Bytes of K and V that one token leaves in the cache: 2 x L x Hkv x D x bytes per element.

    ``int8=True`` (chapter 06): D int8 codes plus one fp16 scale per vector, whatever the compute dtype. The paged
    pools size their blocks with this count, so a pool and this number cannot disagree.
    """
    if int8:
        from minillm.quant.kv import KV_SCALE_DTYPE

        per_vector = config.head_dim + KV_SCALE_DTYPE.itemsize
    else:
        per_vector = config.head_dim * dtype_bytes(dtype)
    return 2 * config.num_layers * config.num_kv_heads * per_vector


def weight_bytes(config: ModelConfig, dtype: torch.dtype | str = torch.float16) -> int:
    """Bytes of the model's weights (embeddings, attention, MLP, norms; the LM head once more unless tied)."""
    C, I, D = config.hidden_size, config.intermediate_size, config.head_dim
    H, Hkv, L = config.num_heads, config.num_kv_heads, config.num_layers
    attention = C * H * D + 2 * C * Hkv * D + H * D * C  # q, k, v, o projections
    if config.attention_bias:
        attention += H * D + 2 * Hkv * D
    per_layer = attention + 3 * C * I + 2 * C  # + SwiGLU MLP + two RMSNorm weights
    params = config.vocab_size * C * (1 if config.tie_word_embeddings else 2) + L * per_layer + C
    return params * dtype_bytes(dtype)


def contiguous_reservation_bytes(
    config: ModelConfig, batch_size: int, max_len: int, dtype: torch.dtype | str = torch.float16
) -> int:
    """What a contiguous cache claims up front: batch_size x max_len tokens, used or not."""
    if batch_size < 1 or max_len < 1:
        raise ValueError(f"batch_size and max_len must be positive, got {batch_size} and {max_len}")
    return batch_size * max_len * kv_bytes_per_token(config, dtype)


def waste_fraction(reserved_tokens: int, used_tokens: int) -> float:
    """Fraction of reserved KV slots that never hold a token (0.0 for an empty reservation).

    The one definition behind every waste figure in chapters 03-05: the calculator here, the memory maps, a contiguous
    engine's stats and a paged engine's peak.
    """
    if not 0 <= used_tokens <= reserved_tokens:
        raise ValueError(f"used tokens must lie in [0, reserved={reserved_tokens}], got {used_tokens}")
    return 1.0 - used_tokens / reserved_tokens if reserved_tokens else 0.0


@dataclass
class Reservation:
    """Tokens a cache reserved for a set of requests, how many of them hold real K/V, and the bytes of both."""

    reserved_tokens: int
    used_tokens: int
    bytes_per_token: int

    @property
    def reserved_bytes(self) -> int:
        return self.reserved_tokens * self.bytes_per_token

    @property
    def used_bytes(self) -> int:
        return self.used_tokens * self.bytes_per_token

    @property
    def waste(self) -> float:
        """Fraction of the reservation that never holds a token."""
        return waste_fraction(self.reserved_tokens, self.used_tokens)


def _check_lengths(lengths: list[int]) -> None:
    if not lengths or any(not isinstance(n, int) or n < 1 for n in lengths):
        raise ValueError(f"lengths must be a non-empty list of positive token counts, got {lengths!r}")


def contiguous_reservation(
    lengths: list[int], max_len: int, config: ModelConfig, dtype: torch.dtype | str = torch.float16
) -> Reservation:
    """A contiguous cache for requests that end up `lengths` tokens long (prompt + output), each reserving max_len."""
    _check_lengths(lengths)
    if max(lengths) > max_len:
        raise ValueError(f"a request of {max(lengths)} tokens does not fit max_len={max_len}")
    return Reservation(len(lengths) * max_len, sum(lengths), kv_bytes_per_token(config, dtype))


def paged_reservation(
    lengths: list[int], block_size: int, config: ModelConfig, dtype: torch.dtype | str = torch.float16
) -> Reservation:
    """The same requests in a paged cache: each holds ceil(length / BS) blocks, so at most BS - 1 slots are idle."""
    _check_lengths(lengths)
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    reserved = sum(-(-n // block_size) * block_size for n in lengths)
    return Reservation(reserved, sum(lengths), kv_bytes_per_token(config, dtype))


def available_bytes(device: torch.device | str) -> int | None:
    """Bytes a new allocation can still take on ``device``: free GPU memory, or Linux's MemAvailable; None if unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024  # reported in KiB
        except OSError:  # not Linux: nothing cheap and reliable to ask
            return None
    return None


def check_fits(num_bytes: int, device: torch.device | str, what: str, advice: str) -> None:
    """Refuse an allocation that cannot fit, before trying it: a tensor too big for RAM gets the process killed, not
    a Python error."""
    available = available_bytes(device)
    if available is not None and num_bytes > available:
        raise ValueError(
            f"{what} needs {format_bytes(num_bytes)} but {torch.device(device)} has {format_bytes(available)} "
            f"available; {advice}"
        )


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'; binary units, as memory is sold."""
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    i = 0
    while abs(n) >= 1024 and i < len(units) - 1:
        n /= 1024
        i += 1
    return f"{n:.0f} B" if i == 0 else f"{n:.1f} {units[i]}"
