"""Typed configuration of graph transforms: the keys every transform has, the registry of per-transform config
classes (defined in transform_configs_compiler.py and transform_configs_runtime.py) and `transforms:` parsing."""

import difflib
from enum import Enum
from pydantic import BaseModel, ConfigDict, Field

from .errors import ConfigError


class Stage(str, Enum):
    """Pipeline stages in execution order."""

    FACTORY = "factory"
    EXPORT = "export"
    POST_EXPORT = "post_export"
    PATTERN_MATCHER = "pattern_matcher"
    SHARDING = "sharding"
    WEIGHT_LOAD = "weight_load"
    POST_LOAD_FUSION = "post_load_fusion"
    VISUALIZE = "visualize"
    CACHE_INIT = "cache_init"
    COMPILE = "compile"

    @property
    def order(self) -> int:
        return list(Stage).index(self)


class TransformConfig(BaseModel):
    """Keys every transform has. Subclasses add their own; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_enum_values=False)

    stage: Stage = Field(description="Pipeline stage the transform runs in (transforms run in stage order, then "
                                     "in YAML order).")
    enabled: bool = Field(default=True, description="Run this transform; false skips it.")
    skip_on_error: bool = Field(default=False, description="On an error, log a warning and keep the graph as it "
                                                           "was instead of failing the build.")
    run_graph_cleanup: bool = Field(default=True, description="Canonicalise the graph (dead code, lint, "
                                                              "recompile) after the transform changed it.")
    run_shape_prop: bool = Field(default=False, description="Propagate fake tensors through the graph after the "
                                                            "transform (refreshes node shapes and dtypes).")
    requires_clean_graph: bool = Field(default=True, description="Canonicalise the graph before the transform if "
                                                                 "an earlier one left it unclean.")
    requires_shape_prop: bool = Field(default=False, description="Propagate shapes before the transform if they "
                                                                 "are stale.")

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: object) -> None:
        # A subclass that only changes a common key's default (`stage: Stage = Stage.EXPORT`) keeps its description.
        super().__pydantic_init_subclass__(**kwargs)
        for name, field in cls.model_fields.items():
            base = TransformConfig.model_fields.get(name)
            if base is not None and not field.description:
                field.description = base.description


TRANSFORM_CONFIGS: dict[str, type[TransformConfig]] = {}


def register_transform_config(name: str):
    """Class decorator: register `cls` as the config model of transform `name`."""

    def wrap(cls: type[TransformConfig]) -> type[TransformConfig]:
        if name in TRANSFORM_CONFIGS:
            raise ValueError(f"transform config {name!r} registered twice")
        TRANSFORM_CONFIGS[name] = cls
        return cls

    return wrap


def closest_name(name: str, choices: list[str]) -> str | None:
    """The most similar valid name, for 'did you mean' hints."""
    match = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    return match[0] if match else None


def transform_config_class(name: str) -> type[TransformConfig]:
    """The config model of transform `name`; a ConfigError with a suggestion if unknown."""
    try:
        return TRANSFORM_CONFIGS[name]
    except KeyError:
        hint = closest_name(name, sorted(TRANSFORM_CONFIGS))
        extra = f" (did you mean {hint!r}?)" if hint else ""
        raise ConfigError(f"unknown transform {name!r}{extra}") from None


def parse_transforms(raw: dict) -> dict[str, TransformConfig]:
    """Validate a `transforms:` mapping into typed configs, keeping its order."""
    out: dict[str, TransformConfig] = {}
    for name, value in (raw or {}).items():
        cls = transform_config_class(name)
        if isinstance(value, TransformConfig):
            value = value.model_dump()
        out[name] = cls.model_validate(value or {})
    return out


# The concrete configs register themselves on import; imported last because they build on the classes above.
from .transform_configs_compiler import DetectShardingConfig, ExportToGmConfig  # noqa: E402, F401
from .transform_configs_runtime import CompileBackend, CompileModelConfig, KernelBackend  # noqa: E402, F401
