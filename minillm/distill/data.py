"""Training text without a download: the calibration text minillm ships, plus text the teacher writes itself.

In doing so, you will learn about:
  * sequence-level distillation (Kim & Rush, "Sequence-Level Knowledge Distillation", arXiv 1606.07947, section 3.2):
    train the student on the teacher's own outputs. Sampled continuations are text the teacher finds likely, so they
    show the student the teacher's distribution where it puts its mass, and the supply is unlimited: a few seed
    prompts give as many tokens as there is time to generate. Generation runs through the course's engine,
    ``minillm.LLM`` (paged KV cache, continuous batching: every prompt is decoded in one batch);
  * caching derived data by content: the generated corpus is keyed by the teacher's weights, the tokenizer, the
    prompts and the sampling parameters, and written atomically (a private temporary file renamed into place), so a
    second run, or a notebook re-run, reads it back and two processes never see half a file;
  * keeping the yardstick clean: ``minillm/data/eval_text.txt`` is held out for perplexity; ``check_held_out``
    refuses training tokens that contain a passage of it, because a model trained on its test text scores well
    for the wrong reason.

Shapes: B batch, T tokens, N tokens in a stream.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

import torch
from torch import nn

from minillm.engine.llm import LLM
from minillm.engine.sampling import SamplingParams
from minillm.eval import load_calibration_text, load_eval_text
from minillm.loading import cache_dir

CORPUS_FORMAT_VERSION = 1  # bump when the cached file's layout changes
HELD_OUT_NGRAM = 32  # a shared run of this many tokens counts as a copied passage


def prompts_from_text(text: str | None = None, num_words: int = 12) -> list[str]:
    """The first `num_words` words of every paragraph of `text` (default: the shipped calibration text) that has
    more than that many, as seed prompts for the teacher. Headings (short paragraphs) are skipped."""
    text = load_calibration_text() if text is None else text
    paragraphs = [p.split() for p in text.split("\n\n")]
    return [" ".join(words[:num_words]) for words in paragraphs if len(words) > num_words]


def model_fingerprint(model: nn.Module) -> str:
    """A short hash of a model's config, parameter names and shapes, and a strided sample of every parameter.

    The sample (about 1000 values per tensor) tells apart any two checkpoints that differ beyond a few weights, at a
    cost of milliseconds rather than the seconds a hash of all the weights would take.
    """
    digest = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    for name, p in model.named_parameters():
        flat = p.detach().flatten()
        sample = flat[:: max(1, flat.numel() // 1024)].float().cpu()
        digest.update(f"{name}{tuple(p.shape)}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)  # one step: readers see the old file, the new one, or none
    finally:
        tmp.unlink(missing_ok=True)


def teacher_corpus(
    teacher: nn.Module,
    tokenizer: Any,
    prompts: list[str] | None = None,
    max_tokens: int = 128,
    temperature: float = 1.0,
    top_p: float = 1.0,
    num_samples: int = 1,
    seed: int = 0,
    cache: bool = True,
    progress: bool = True,
) -> list[str]:
    """Texts the teacher writes: each prompt followed by `num_samples` sampled continuations of up to `max_tokens`.

    prompts: default ``prompts_from_text()``. The defaults, temperature 1 and no top-p, draw from the teacher's own
    distribution, so the text shows the student what the teacher believes, no more confident than it is (and on a
    CPU the sort top-p needs costs more than the sampling). Kim & Rush decode with beam search, the teacher's mode;
    sampling gives more varied text from the same prompts. Sampling is seeded per continuation (``seed + i``), so
    the corpus is reproducible. Returns ``len(prompts) * num_samples`` strings (prompt + continuation). With
    `cache`, the result is read from / written to ``cache_dir()/distill/teacher-<key>.json``, keyed by everything
    that shapes it.
    """
    prompts = prompts_from_text() if prompts is None else list(prompts)
    if not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty strings")
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
    params = [
        SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed + i)
        for i in range(len(prompts) * num_samples)
    ]
    key_fields = {
        "version": CORPUS_FORMAT_VERSION, "teacher": model_fingerprint(teacher),
        "tokenizer": [getattr(tokenizer, "name_or_path", ""), len(tokenizer)], "prompts": prompts,
        "num_samples": num_samples, "max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "seed": seed,
    }
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir() / "distill" / f"teacher-{key}.json"
    if cache and path.exists():
        try:
            return json.loads(path.read_text(encoding="utf-8"))["texts"]
        except (OSError, ValueError, KeyError):  # a damaged entry is only a copy: generate it again
            pass
    llm = LLM(teacher, tokenizer=tokenizer, max_num_seqs=min(64, len(params)))
    all_prompts = [p for p in prompts for _ in range(num_samples)]
    outputs = llm.generate(all_prompts, params, use_tqdm=progress)
    texts = [prompt + out.text for prompt, out in zip(all_prompts, outputs)]
    if cache:
        _write_atomically(path, json.dumps({"key": key_fields, "texts": texts}, indent=1))
    return texts


def token_stream(tokenizer: Any, texts: list[str] | str | None = None) -> torch.Tensor:
    """Tokenize documents into one stream (N,) int64, an end-of-sequence token after each, for packed training.

    texts: default the shipped calibration text. Packing (no padding) makes every token of a batch a real one.
    """
    texts = [load_calibration_text()] if texts is None else [texts] if isinstance(texts, str) else list(texts)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"] + eos
    return torch.tensor(ids, dtype=torch.long)


def check_held_out(stream: torch.Tensor, tokenizer: Any, eval_text: str | None = None) -> None:
    """Raise ValueError if the training `stream` (N,) contains any run of ``HELD_OUT_NGRAM`` tokens of the held-out
    evaluation text (default: the shipped one)."""
    eval_text = load_eval_text("offline") if eval_text is None else eval_text
    n = HELD_OUT_NGRAM
    held = tokenizer(eval_text, add_special_tokens=False)["input_ids"]
    held_ngrams = {tuple(held[i : i + n]) for i in range(len(held) - n + 1)}
    ids = stream.tolist()
    for i in range(len(ids) - n + 1):
        if tuple(ids[i : i + n]) in held_ngrams:
            raise ValueError(
                f"the training data contains a {n}-token passage of the held-out evaluation text (at token {i}: "
                f"{tokenizer.decode(ids[i : i + n])[:80]!r}...); train on other text, or perplexity measures memory"
            )


def sample_batch(stream: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """`batch_size` random windows of `seq_len` tokens of the stream (N,) -> (B, T), drawn with `generator`."""
    if stream.numel() < seq_len:
        raise ValueError(f"the training stream has {stream.numel()} tokens, fewer than seq_len={seq_len}")
    starts = torch.randint(0, stream.numel() - seq_len + 1, (batch_size,), generator=generator)  # (B,)
    return stream[starts[:, None] + torch.arange(seq_len)]  # (B, T)
