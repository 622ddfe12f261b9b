"""The from-scratch model against transformers: the real GGUF model, and tiny random Llama/Qwen2 folders."""

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import minillm
from minillm.config import ModelConfig
from minillm.model import Transformer

PROMPTS = ["The quick brown fox jumps over the lazy dog.", "def fibonacci(n):", "Paris is the capital of"]


@torch.no_grad()
def test_real_model_logits_match_transformers(smollm, hf_smollm):
    model, tok = smollm
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        ours, theirs = model(ids), hf_smollm(ids).logits
        assert (ours - theirs).abs().max().item() < 1e-4, prompt


def test_real_model_config(smollm):
    cfg = smollm[0].config
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size) == (
        30, 576, 9, 3, 64, 49152,
    )
    assert cfg.tie_word_embeddings and smollm[0].lm_head.weight is smollm[0].embed_tokens.weight


def _save_hf(model, folder):
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@torch.no_grad()
@pytest.mark.parametrize("kind", ["llama-untied", "llama3-rope", "qwen2-bias"])
def test_hf_folder_matches_transformers(tmp_path, kind):
    torch.manual_seed(0)
    common = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
                  num_key_value_heads=2, max_position_embeddings=256)
    if kind == "qwen2-bias":
        hf = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=False))
        for layer in hf.model.layers:  # random biases, so a missing bias would show
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_()
    elif kind == "llama3-rope":
        rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64, "rope_theta": 500000.0}
        hf = LlamaForCausalLM(LlamaConfig(**common, rope_scaling=rope, rope_theta=500000.0, tie_word_embeddings=True))
    else:
        hf = LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=False))
    hf = hf.float().eval()
    folder = _save_hf(hf, tmp_path / kind)
    model, _ = minillm.load_model(str(folder), device="cpu", dtype=torch.float32) if (folder / "tokenizer.json").exists() else (
        _load_without_tokenizer(folder)
    )
    ids = torch.randint(0, 97, (2, 150))
    assert (model(ids) - hf(ids).logits).abs().max().item() < 1e-4


def _load_without_tokenizer(folder):
    from minillm.loading import build_model, load_file

    config = ModelConfig.from_hf_config(json.loads((folder / "config.json").read_text()))
    state = {}
    for f in folder.glob("*.safetensors"):
        state.update({k.removeprefix("model."): v for k, v in load_file(str(f)).items()})
    return build_model(config, state, torch.device("cpu"), torch.float32), None


def test_reference_and_triton_backends_agree(tiny_model):
    from minillm.attention.backends import NoCacheAttention, resolve_kernel

    ids = torch.randint(0, 256, (2, 37))
    ref = tiny_model(ids)
    torch.testing.assert_close(tiny_model(ids, attention=NoCacheAttention("triton")), ref, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="unknown attention kernel"):
        NoCacheAttention("cuda-magic")
    with pytest.raises(ValueError, match="unknown attention backend 'cuda-magic'"):
        resolve_kernel("cuda-magic", "cpu")
    assert resolve_kernel("auto", "cpu") == "reference" and resolve_kernel("triton", "cpu") == "triton"  # interpreter


def test_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown model 'no-such-model'"):
        minillm.load_model("no-such-model")
    with pytest.raises(ValueError, match="no CUDA GPU"):
        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
        minillm.load_model("smollm2-135m", device="cuda")
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        minillm.load_model("smollm2-135m", dtype="float8")
    with pytest.raises(FileNotFoundError, match="config.json"):
        minillm.load_model(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="unsupported model file"):
        minillm.load_model(str(tmp_path / "weights.bin"))
    with pytest.raises(ValueError, match="unsupported architecture"):
        ModelConfig.from_hf_config({"architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        ModelConfig.tiny(num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match=r"input_ids must be \(B, T\)"):
        Transformer(ModelConfig.tiny())(torch.zeros(5, dtype=torch.long))


def test_second_load_is_fast(smollm):
    import time

    start = time.perf_counter()
    minillm.load_model("smollm2-135m", device="cpu", dtype=torch.float32)
    # Not a timing assertion on speed of the machine: the cache must be hit (a conversion takes 10+ s).
    assert time.perf_counter() - start < 8.0
