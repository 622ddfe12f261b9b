"""The weight cache: a GGUF model converted once, then read back as safetensors.

Decoding the embedded model's Q4_1 blocks takes seconds; mapping a safetensors file takes milliseconds. Each entry
is a folder under ``~/.cache/minillm`` (or ``$MINILLM_CACHE``) holding ``model.safetensors``,
``minillm_config.json`` and the tokenizer files, named by the GGUF file's *content*, so copies of one file in several
clones or venvs share one entry. Entries appear in one rename (readers see a whole entry or none, two processes
converting at once both succeed), and a broken entry is named in a warning and rebuilt. Used by ``loading.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from minillm.config import ModelConfig

CACHE_FORMAT_VERSION = 1  # bump when the converted layout changes, so stale caches are rebuilt
CACHE_SAMPLE_BYTES = 1 << 20  # the content key reads three samples of this size


def cache_dir() -> Path:
    return Path(os.environ.get("MINILLM_CACHE", Path.home() / ".cache" / "minillm"))




def content_key(path: Path) -> str:
    """A cheap fingerprint of a file's content: its size and three 1 MiB samples (start, middle, end).

    Not path + modification time: then every clone, venv or copy of one file converted again and left another
    half-GB entry. Not a hash of the whole file: that reads all of it on every load (0.3 s for the 98 MB embedded
    model with a warm page cache, seconds from a cold disk), while the samples take milliseconds. The first MiB
    holds the header (architecture, sizes, the start of the vocabulary) and the other two are weights, so another
    model, quantization or fine-tune gets another key; only an edit that keeps the size and misses all three
    samples goes unnoticed.
    """
    size = path.stat().st_size
    digest = hashlib.sha256(f"{CACHE_FORMAT_VERSION}:{size}".encode())
    with open(path, "rb") as f:
        for offset in (0, max(size // 2 - CACHE_SAMPLE_BYTES // 2, 0), max(size - CACHE_SAMPLE_BYTES, 0)):
            f.seek(offset)
            digest.update(f.read(CACHE_SAMPLE_BYTES))
    return digest.hexdigest()[:16]


def read_entry(folder: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], object] | None:
    """The entry in `folder`, or None when there is none; a broken entry is named in a warning and removed."""
    from minillm.loading import load_tokenizer  # here, not at the top: loading.py imports this module

    if not folder.exists():
        return None
    try:
        config = ModelConfig(**json.loads((folder / "minillm_config.json").read_text()))
        # load_file checks that the file covers every tensor its header lists. No check_weight: the entry holds
        # weights that passed it when they were converted, and a pass over them would double a cache hit's time.
        state = load_file(str(folder / "model.safetensors"))
        return config, state, load_tokenizer(folder)
    except Exception as err:  # whatever broke (a cut-off file, a missing one, bad JSON), the entry is only a copy
        warnings.warn(f"the weight cache entry {folder} is unreadable ({type(err).__name__}: {err}); rebuilding it")
        remove_entry(folder)
        return None


def write_entry(folder: Path, config: ModelConfig, state: dict[str, torch.Tensor], tokenizer) -> None:
    """Write the entry into a folder private to this process, then rename it into place in one step.

    Readers see a whole entry or none. Two processes converting at once each write their own folder; the second
    rename finds the first one's entry in place, and that process drops its copy.
    """
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"))
        tokenizer.save_pretrained(str(tmp))
        (tmp / "minillm_config.json").write_text(json.dumps(config.to_dict(), indent=1))
        os.replace(tmp, folder)  # fails when another process's entry is already there
    except OSError as err:
        if not folder.exists():  # a full disk or a read-only cache: loading still works, only slower next time
            warnings.warn(f"could not write the weight cache entry {folder} ({err}); set MINILLM_CACHE to a "
                          "writable folder to skip the conversion next time")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_entry(folder: Path) -> None:
    trash = folder.with_name(f".{folder.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.trash")
    try:
        os.replace(folder, trash)  # one step, so no other process reads a half-deleted entry
    except FileNotFoundError:  # another process removed it first
        return
    shutil.rmtree(trash, ignore_errors=True)
