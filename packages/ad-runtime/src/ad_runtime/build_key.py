"""The build cache's key: a digest of everything that can change the graph a build produces (or its checks)."""

import hashlib
import json
import os
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ad_compiler.models.factory import ModelFactory
    from ad_config import LlmArgs

# Bump when the entry's layout or what is cached changes: old entries then miss instead of being misread.
FORMAT_VERSION = 1

# LlmArgs fields that cannot change the cached graph: they steer sampling, scheduling, the KV cache's size (all
# decided after the cached stages, at every build) or where files live. Every other field is part of the key, so a
# field added later is a key ingredient until someone shows it is runtime-only: a stale graph is never served.
RUNTIME_ONLY_FIELDS = frozenset({
    "yaml_default", "yaml_extra",  # their contents are in the resolved values
    "build_cache", "build_cache_dir", "cache_dir",  # where things live; the checkpoint's identity is keyed below
    "tokenizer", "tokenizer_kwargs", "skip_tokenizer_init",
    "sampling", "seed", "dist_timeout", "overlap_scheduler", "enable_chunked_prefill", "max_input_len",
    "kv_cache_config",
})

PACKAGES = ("ad-config", "ad-compiler", "ad-runtime", "torch", "transformers", "triton")
SOURCE_PACKAGES = ("ad_config", "ad_compiler", "ad_runtime")


def package_versions() -> dict[str, str]:
    """Installed versions of our packages and of the libraries whose code ends up in the graph."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


@cache
def source_digest() -> str:
    """Digest of our packages' source files.

    Their version numbers stay put while the code changes (editable installs, a checkout on PYTHONPATH), and a
    changed transform must not be answered with a graph the old code built. Reading ~200 small files costs ~20 ms.
    """
    import importlib

    h = hashlib.sha256()
    for pkg in SOURCE_PACKAGES:
        root = Path(importlib.import_module(pkg).__file__).parent
        for path in sorted(root.rglob("*")):
            if path.suffix in (".py", ".yaml") and "__pycache__" not in path.parts:
                h.update(str(path.relative_to(root)).encode())
                h.update(path.read_bytes())
    return h.hexdigest()


def checkpoint_fingerprint(folder: Path) -> list[list[Any]]:
    """Each file of the checkpoint folder as [relative path, size, mtime_ns] (symlinks followed: hub snapshots)."""
    entries = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            st = path.stat()
            entries.append([str(path.relative_to(folder)), st.st_size, st.st_mtime_ns])
    return entries


def device_kind(device: torch.device) -> str:
    """`cpu`, or the GPU's name and compute capability (kernels and dtypes differ between GPU generations)."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"cuda:{torch.cuda.get_device_name(device)}:sm{major}{minor}"
    return device.type


def key_ingredients(
    args: "LlmArgs", factory: "ModelFactory", device: torch.device, rank: int, world_size: int
) -> dict[str, Any]:
    """Everything the cached part of the build depends on, as JSON-ready values."""
    config = args.model_dump(mode="json", exclude=set(RUNTIME_ONLY_FIELDS))
    if args.skip_loading_weights:
        # Random weights depend on the seed, and the entry stands for a build whose checks passed with them.
        config["seed"] = args.seed
    folder = getattr(factory, "folder", None)
    if folder is None:
        # Without the checkpoint's identity a changed checkpoint would be answered with the old graph.
        raise ValueError(f"model factory {type(factory).__name__} names no checkpoint folder to fingerprint")
    return {
        "format": FORMAT_VERSION,
        "config": config,
        "factory": type(factory).__qualname__,
        "checkpoint": {"folder": str(folder), "files": checkpoint_fingerprint(Path(folder))},
        "rank": rank,
        "world_size": world_size,
        "device": device_kind(device),
        "versions": package_versions(),
        "source": source_digest(),
    }


def digest(ingredients: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(ingredients, sort_keys=True, default=str).encode()).hexdigest()
