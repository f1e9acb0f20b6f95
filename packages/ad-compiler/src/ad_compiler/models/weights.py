"""Fill a (possibly sharded) module's meta parameters from safetensors files, or randomly, through load hooks."""

import json
import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn as nn
from tqdm import tqdm

from ..errors import CompileError

logger = logging.getLogger(__name__)


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    # Only floating tensors follow the model dtype; integer/quantised payloads keep theirs.
    return t.to(dtype) if dtype is not None and t.is_floating_point() and t.dtype != dtype else t


def _add_tied(sd: dict[str, torch.Tensor], tied: dict[str, str], expected: set[str]) -> None:
    """Give tied targets (lm_head.weight) the source tensor when the file holds only the source."""
    for target, source in tied.items():
        if source in sd and target not in sd and target in expected:
            sd[target] = sd[source]


def _finish(model: nn.Module, device: torch.device) -> None:
    """Move buffers (computed at build time, not in checkpoints) to `device`; no tensor may stay on meta."""
    for mod_name, mod in model.named_modules():
        for name, buf in list(mod._buffers.items()):
            if buf is not None and buf.device != device and buf.device.type != "meta":
                mod._buffers[name] = buf.to(device)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if left:
        raise CompileError(f"no value for {len(left)} tensors after loading: {_first_few(left)}")


def _first_few(names: list[str]) -> str:
    return ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")


def checkpoint_renamer(folder: Path) -> Callable[[str], str]:
    """Checkpoint key -> model key by the plain renames transformers applies when it loads this model type.

    NemotronH checkpoints (and HF's save_pretrained of one) name weights `backbone.*`; the module says `model.*`.
    GPT-NeoX checkpoints call the LM head `embed_out`; multimodal Qwen3.5 checkpoints nest the text model under
    `model.language_model.` (loaded here into the text-only model, the vision tower is not used).
    Converters that merge tensors are not applied here (the ExpertStacker stacks Mixtral-style experts).
    """
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return lambda key: key
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import WeightRenaming

    # Mappings are registered by architecture class (GPTNeoXForCausalLM: embed_out -> lm_head), by model type and
    # by the text model's type (qwen3_5_text: a multimodal checkpoint's model.language_model.* -> model.*).
    text_type = (config.get("text_config") or {}).get("model_type")
    names = [*(config.get("architectures") or []), config.get("model_type"), text_type]
    renames = [t for name in dict.fromkeys(n for n in names if n)
               for t in get_checkpoint_conversion_mapping(name) or [] if isinstance(t, WeightRenaming)]

    def rename(key: str) -> str:
        for t in renames:
            key = t.rename_source_key(key)[0]
        return key

    return rename


def checkpoint_files(folder: Path) -> list[Path]:
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise CompileError(f"no *.safetensors checkpoint in {folder} (other formats are not supported)")
    return files


def load_checkpoint_into(
    model: nn.Module,
    folder: Path,
    device: str | torch.device,
    dtype: torch.dtype | None = None,
    tied: dict[str, str] | None = None,
    num_experts: int | None = None,
) -> None:
    """Load every safetensors file of `folder` straight onto `device`, one file at a time.

    Goes through `model.load_state_dict(strict=False, assign=True)` so load_state_dict pre-hooks (the
    sharding executor's) see full checkpoint tensors and can slice them; assign keeps the hooks' result
    instead of copying into meta parameters.
    """
    from safetensors.torch import load_file

    from .moe_keys import ExpertStacker

    device = torch.device(device)
    tied = tied or {}
    expected = set(model.state_dict().keys())
    stacker = ExpertStacker(expected, num_experts)
    rename = checkpoint_renamer(folder)
    loaded: set[str] = set()
    unexpected: set[str] = set()
    for path in tqdm(checkpoint_files(folder), desc="Loading weights", unit="file", disable=None):
        # A key the model already has is never renamed (a rename meant for another layout must not move it).
        sd = {k if k in expected else rename(k): _cast(v, dtype)
              for k, v in load_file(str(path), device=str(device)).items()}
        sd = stacker.convert(sd)
        _add_tied(sd, tied, expected)
        result = model.load_state_dict(sd, strict=False, assign=True)
        loaded |= set(sd) & expected
        unexpected |= set(result.unexpected_keys)
        del sd
    if stacker.leftover():
        raise CompileError(f"checkpoint {folder} has incomplete experts for {', '.join(stacker.leftover())}")
    missing = sorted(expected - loaded)
    if missing:
        raise CompileError(f"checkpoint {folder} lacks {len(missing)} weights of the model: {_first_few(missing)}")
    if unexpected:
        # Tensors of layers the model does not have are what model_kwargs asked for (fewer layers): say so
        # at info level; anything else may be a naming mismatch worth a warning.
        have = {m.group(1) for k in expected if (m := _LAYER_INDEX.search(k))}
        level = logging.INFO if all(_is_dropped_layer(k, have) for k in unexpected) else logging.WARNING
        logger.log(level, "ignored %d checkpoint tensors the model does not use (e.g. %s)", len(unexpected),
                   min(unexpected))
    _finish(model, device)


def random_tensors(
    reference: dict[str, torch.Tensor], dtype: torch.dtype | None, seed: int, std: float,
    device: str | torch.device = "cpu",
) -> Iterator[tuple[str, torch.Tensor]]:
    """Full-size random tensors shaped like `reference`, one at a time, identical for a given seed on every rank.

    Drawn on `device` in sorted key order with one generator of that device: the same values on every rank of
    a device kind. A GPU draws them itself: the CPU took 59 s of an H200 build for an 8B model's 8e9 values.
    CPU and GPU values differ for the same seed.
    1-D weights (norms) are ones, biases zeros, everything else normal(0, std).
    """
    device = torch.device(device)
    gen = torch.Generator(device).manual_seed(seed)
    for key in sorted(reference):
        ref = reference[key]
        dt = dtype if ref.is_floating_point() and dtype is not None else ref.dtype
        if not ref.is_floating_point() or key.endswith("bias"):
            yield key, torch.zeros(ref.shape, dtype=dt, device=device)
        elif ref.dim() == 1:
            yield key, torch.ones(ref.shape, dtype=dt, device=device)
        else:
            yield key, (torch.randn(ref.shape, generator=gen, dtype=torch.float32, device=device) * std).to(dt)


def random_init(
    model: nn.Module,
    reference: dict[str, torch.Tensor],
    device: str | torch.device,
    dtype: torch.dtype | None,
    seed: int,
    std: float,
    tied: dict[str, str] | None = None,
) -> None:
    """Random weights through the same load path as a checkpoint, so sharding hooks slice them alike."""
    device = torch.device(device)
    expected = set(model.state_dict().keys())
    targets: dict[str, list[str]] = {}
    for target, source in (tied or {}).items():
        targets.setdefault(source, []).append(target)
    # One full tensor at a time: a rank's peak is its shard plus the largest full tensor, as with a checkpoint
    # (sharding hooks slice each tensor while it loads), not the whole unsharded model.
    draw_on = device if device.type == "cuda" else torch.device("cpu")  # meta or CPU targets draw on the CPU
    for key, value in random_tensors(reference, dtype, seed, std, draw_on):
        keys = [k for k in (key, *targets.get(key, [])) if k in expected]
        if keys:
            value = value.to(device)
            model.load_state_dict(dict.fromkeys(keys, value), strict=False, assign=True)
    _finish(model, device)


_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


def _is_dropped_layer(key: str, layer_indices: set[str]) -> bool:
    """True for a checkpoint tensor of a layer index the (shrunk) model does not have."""
    m = _LAYER_INDEX.search(key)
    return m is not None and m.group(1) not in layer_indices
