"""The `AutoModelForCausalLM` factory: hub id, local folder, GGUF file or the bundled SmolLM2, built on meta."""

import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from ad_config.model_source import model_path_problem

from ..errors import CompileError
from .bundled import bundled_model_dir, convert_gguf
from .config_overrides import apply_model_kwargs
from .factory import ModelConfigError, ModelFactory, ModelFactoryRegistry, check_model_config
from .weights import load_checkpoint_into, random_init

logger = logging.getLogger(__name__)

# Experts implementation used at export. "batched_mm" exports to plain aten ops (index the stacked
# expert weights per token, bmm) that match_moe_pattern rewrites into torch_moe. "eager" loops over
# the experts hit (data-dependent: export fails) and "grouped_mm" exports an opaque transformers op.
EXPORT_EXPERTS_IMPLEMENTATION = "batched_mm"

_HALF = (torch.float16, torch.bfloat16)


class CausalLMExportWrapper(nn.Module):
    """`forward(input_ids, position_ids) -> logits` over a HF causal LM, without a cache.

    Its children are the HF model's own children (not the model itself), so parameter names and
    hence exported state-dict keys equal the checkpoint's (`model.layers.0...`, `lm_head.weight`).
    """

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        for name, child in hf_model.named_children():
            self.add_module(name, child)
        # Kept out of the module tree on purpose: registering it would prefix every key.
        object.__setattr__(self, "_hf_model", hf_model)
        self.config = hf_model.config

    @property
    def hf_model(self) -> nn.Module:
        return self._hf_model

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        out = self._hf_model(input_ids=input_ids, position_ids=position_ids, use_cache=False)
        return out.logits


def _parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise CompileError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return value


@ModelFactoryRegistry.register("AutoModelForCausalLM")
class AutoModelForCausalLMFactory(ModelFactory):
    """Hugging Face causal LMs through `transformers.AutoModelForCausalLM`.

    `model`: a local HF folder (config.json + safetensors), a `.gguf` file (dequantised once into the
    cache folder, see `models.bundled`), a hub id (needs the hub or its local cache), or None for the
    bundled SmolLM2-135M-Instruct.
    `model_kwargs`: recursive config overrides, see `config_overrides.apply_model_kwargs` (unknown keys
    are an error).
    `dtype`: "auto"/None is the checkpoint's dtype (float32 if it names none), except that half
    precision becomes float32 when the factory is given `device="cpu"` (CPU half kernels are slow and
    inexact); an explicit dtype always wins.
    `seed` (extra keyword, default 0): random init with `skip_loading_weights` is deterministic.
    `cache_dir` (extra keyword): where converted GGUF checkpoints live; None: `models.bundled.cache_root()`.
    """

    def __init__(self, model: str | None = None, **kwargs: Any):
        super().__init__(model=model, **kwargs)
        self._folder: Path | None = None
        self._config: Any = None
        self.seed: int = int(self.extra_kwargs.get("seed", 0))
        self.device_hint: str | None = self.extra_kwargs.get("device")
        cache_dir = self.extra_kwargs.get("cache_dir")
        self.cache_dir: Path | None = Path(cache_dir).expanduser() if cache_dir else None

    # ---- where the checkpoint lives -----------------------------------------------------------------

    @property
    def folder(self) -> Path:
        """Local folder with config.json, tokenizer files and safetensors (resolved on first use)."""
        if self._folder is None:
            self._folder = self._resolve_folder()
        return self._folder

    def _resolve_folder(self) -> Path:
        name = self.model_name
        if name is None:
            return bundled_model_dir(self.cache_dir)
        problem = model_path_problem(name)
        if problem is not None:
            raise CompileError(problem)
        path = Path(name).expanduser()
        if path.is_file() and path.suffix == ".gguf":
            return convert_gguf(path, self.cache_dir)
        return path if path.is_dir() else self._download(name)

    def _download(self, repo_id: str) -> Path:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py", "*.tiktoken"]
        try:
            return Path(snapshot_download(repo_id, allow_patterns=patterns))
        except Exception as e:  # noqa: BLE001 - offline, unknown repo, gated: all the same answer
            raise CompileError(
                f"could not get model {repo_id!r} from the Hugging Face hub ({type(e).__name__}); "
                "pass a local folder or .gguf file as model, or run where the hub is reachable"
            ) from None

    # ---- config and model --------------------------------------------------------------------------

    @property
    def config(self) -> Any:
        """The model config with `model_kwargs` applied.

        Checked before transformers sees it (`check_model_config`): a count or size that is not a positive
        integer, or head counts that do not divide, is a ModelConfigError when `model_kwargs` set it and a
        CompileError naming config.json otherwise.
        """
        if self._config is None:
            from transformers import AutoConfig

            source = self.folder / "config.json"
            check_model_config(_read_config_json(source), self.model_kwargs, str(source))
            try:
                base = AutoConfig.from_pretrained(self.folder, trust_remote_code=self.trust_remote_code)
            except _HF_CONFIG_ERRORS as e:
                raise CompileError(f"{source}: not a usable model config: {_one_line(e)}") from e
            try:
                self._config = apply_model_kwargs(base, self.model_kwargs)
            except ModelConfigError:
                raise
            except CompileError as e:  # an unknown key: a configuration mistake like any other
                raise ModelConfigError(str(e)) from None
            except _HF_CONFIG_ERRORS as e:
                raise ModelConfigError(f"model_kwargs: the model config they give is not usable: {_one_line(e)}") from e
        return self._config

    @property
    def torch_dtype(self) -> torch.dtype:
        requested = _parse_dtype(self.dtype)
        if requested is not None:
            return requested
        ckpt = getattr(self.config, "dtype", None)
        ckpt = _parse_dtype(ckpt) if ckpt is not None else torch.float32
        if ckpt in _HALF and self.device_hint is not None and str(self.device_hint).startswith("cpu"):
            return torch.float32
        return ckpt or torch.float32

    def attn_implementation(self) -> str:
        """sdpa, except eager where sdpa would drop an attention logit soft-cap (Gemma 2) or where the model class
        has no sdpa path (pure state-space models such as Mamba2, which have no attention at all)."""
        if getattr(self.config, "attn_logit_softcapping", None):
            return "eager"
        from transformers import AutoModelForCausalLM

        cls = AutoModelForCausalLM._model_mapping.get(type(self.config), None)
        return "sdpa" if cls is None or getattr(cls, "_supports_sdpa", True) else "eager"

    def build_model(self, device: str | torch.device) -> nn.Module:
        from transformers import AutoModelForCausalLM

        device = torch.device(device)
        kwargs: dict[str, Any] = {
            "attn_implementation": self.attn_implementation(),
            "dtype": self.torch_dtype,
            "trust_remote_code": self.trust_remote_code,
        }
        if _num_experts(self.config) is not None:
            kwargs["experts_implementation"] = EXPORT_EXPERTS_IMPLEMENTATION
        if device.type == "meta":
            from accelerate import init_empty_weights

            # Parameters on meta (weights come later); computed buffers such as rotary inv_freq stay
            # real on the CPU because no checkpoint holds them.
            with init_empty_weights(include_buffers=False):
                hf_model = AutoModelForCausalLM.from_config(self.config, **kwargs)
        else:
            with torch.device(device):
                hf_model = AutoModelForCausalLM.from_config(self.config, **kwargs)
        hf_model.eval()
        return CausalLMExportWrapper(hf_model)

    def get_example_inputs(self) -> dict[str, torch.Tensor]:
        # Batch 2 and sequence 4: size-1 dims would be specialised by export.
        batch, seq = 2, 4
        return {
            "input_ids": torch.ones(batch, seq, dtype=torch.long),
            "position_ids": torch.arange(seq, dtype=torch.long).expand(batch, seq).contiguous(),
        }

    # ---- weights ------------------------------------------------------------------------------------

    def load_or_random_init(self, model: nn.Module, device: str | torch.device) -> None:
        if self.skip_loading_weights:
            # Full (unsharded) shapes come from a fresh meta build; hooks slice them like checkpoint tensors.
            reference = self.build_model("meta").state_dict()
            random_init(model, reference, device, self.torch_dtype, self.seed, self._init_std(), self.tied_weights())
            return
        tied, num_experts = self.tied_weights(), _num_experts(self.config)
        load_checkpoint_into(model, self.folder, device, dtype=self.torch_dtype, tied=tied, num_experts=num_experts)

    def _init_std(self) -> float:
        return float(getattr(self.config, "initializer_range", 0.02))

    def tied_weights(self) -> dict[str, str]:
        """Target key -> source key for tied parameters (lm_head.weight -> model.embed_tokens.weight)."""
        if not any(getattr(c, "tie_word_embeddings", False) for c in (_text_config(self.config), self.config)):
            return {}
        from transformers import AutoModelForCausalLM

        cls = AutoModelForCausalLM._model_mapping.get(type(self.config), None)
        tied = getattr(cls, "_tied_weights_keys", None) or {"lm_head.weight": "model.embed_tokens.weight"}
        return dict(tied) if isinstance(tied, dict) else {"lm_head.weight": "model.embed_tokens.weight"}

    # ---- tokenizer and sharding ---------------------------------------------------------------------

    def init_tokenizer(self) -> Any | None:
        if self.skip_tokenizer_init:
            return None
        from transformers import AutoTokenizer

        source = self.tokenizer_name or self.folder
        if self.tokenizer_name and Path(self.tokenizer_name).suffix == ".gguf":
            source = convert_gguf(Path(self.tokenizer_name), self.cache_dir)
        try:
            return AutoTokenizer.from_pretrained(source, trust_remote_code=self.trust_remote_code,
                                                 **self.tokenizer_kwargs)
        except OSError as e:
            raise CompileError(f"could not load the tokenizer from {source}: {e}") from None

    def get_sharding_config(self) -> dict[str, Any]:
        text_config = _text_config(self.config)
        head_dim = getattr(text_config, "head_dim", None) or (
            text_config.hidden_size // text_config.num_attention_heads
        )
        return {"head_dim": head_dim, "tp_plan": dict(getattr(text_config, "base_model_tp_plan", None) or {})}

    @property
    def vocab_size(self) -> int | None:
        return getattr(_text_config(self.config), "vocab_size", None)


# What transformers raises for a config it cannot use (its strict validators raise ValueError subclasses).
_HF_CONFIG_ERRORS = (ValueError, TypeError, ZeroDivisionError, KeyError, AttributeError)


def _one_line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_config_json(path: Path) -> dict[str, Any]:
    """The raw config.json as a dict; CompileError naming the file when it cannot be read as a JSON object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise CompileError(f"{path}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise CompileError(f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise CompileError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(data, dict):
        raise CompileError(f"{path}: must hold a JSON object, not {type(data).__name__}")
    return data


def _text_config(config: Any) -> Any:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _num_experts(config: Any) -> int | None:
    """The routed-expert count of an MoE config (its first set key of the known names), None for a dense model."""
    text_config = _text_config(config)
    keys = ("num_local_experts", "num_experts", "n_routed_experts")
    return next((n for k in keys if (n := getattr(text_config, k, None))), None)
