"""DynamicYamlMixInForSettings: settings layered from code defaults, YAML files, environment and init kwargs."""

import logging
import os
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Self

from pydantic import PrivateAttr, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from .error_format import format_validation_error
from .errors import ConfigError
from .field_paths import is_model, resolve, type_value, unwrap
from .merge import Path, deep_merge_dicts, dotted, get_path, leaf_paths, set_path
from .origins import OriginMap, leaf_labels
from .transform_config import closest_name
from .yaml_files import describe_file, load_yaml_file

log = logging.getLogger(__name__)

YAML_FIELDS = ("yaml_default", "yaml_extra")
# Module names ad_compiler.plugins imports as plugins, comma-separated (README, under `ad-export`): an AD_
# variable that is no setting, so the environment layer passes it by without a warning.
PLUGINS_ENV = "AD_PLUGINS"
NOT_SETTINGS = frozenset({PLUGINS_ENV})
_ABSENT = object()  # get_path's default where no value is given (None is a value given)


@dataclass
class _Request:
    """How the next settings object is being built: labels of its init kwargs, whether to read env."""

    init_origins: dict[Path, str] | None
    read_env: bool = True
    prefix: Path = ()  # where this object sits in an outer configuration, for messages


@dataclass
class _Resolution:
    """One settings object being resolved: the origin labels of each source layer."""

    owner: type
    read_env: bool = True
    init: dict[Path, str] = field(default_factory=dict)
    env: dict[Path, str] = field(default_factory=dict)
    yaml: OriginMap = field(default_factory=OriginMap)
    derived: OriginMap = field(default_factory=OriginMap)

    def combined(self) -> OriginMap:
        out = OriginMap(dict(self.yaml.items()))
        out.overlay(self.env)
        out.overlay(self.init)
        out.overlay(dict(self.derived.items()))
        return out


_request: ContextVar[_Request | None] = ContextVar("ad_config_request", default=None)
_active: ContextVar[_Resolution | None] = ContextVar("ad_config_active", default=None)


def active_resolution(owner: type) -> _Resolution | None:
    """The resolution in progress for an object of class `owner` (for validators that derive values)."""
    res = _active.get()
    return res if res is not None and res.owner is owner else None


class _Source(PydanticBaseSettingsSource):
    """A layer that reads its source itself in __call__ and records the origin labels in `resolution`."""

    def __init__(self, settings_cls: type[BaseSettings], resolution: _Resolution) -> None:
        super().__init__(settings_cls)
        self.resolution = resolution

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ reads the source itself


def _nested_settings(cls: type[BaseSettings]) -> list[tuple[str, type[BaseSettings]]]:
    """(field name, class) of the settings objects nested in `cls` (LlmArgs inside ExperimentConfig)."""
    return [(name, ann) for name, info in cls.model_fields.items()
            if is_model(ann := unwrap(info.annotation)) and issubclass(ann, DynamicYamlMixInForSettings)]


class _EnvSource(_Source):
    """`AD_<FIELD>[__<SUB>...]` variables, typed like command-line text.

    A name that is not a field of this class but of a nested settings field (LlmArgs inside
    ExperimentConfig) is forwarded there, so `AD_WORLD_SIZE` means the same for every command.
    """

    def _forward(self, name: str) -> list[str] | None:
        if name in self.settings_cls.model_fields:
            return [name]
        nested = _nested_settings(self.settings_cls)
        return next(([f, name] for f, cls in nested if name in cls.model_fields and name not in YAML_FIELDS), None)

    def __call__(self) -> dict[str, Any]:
        if not self.resolution.read_env:
            return {}
        prefix = (self.config.get("env_prefix") or "").upper()
        delimiter = self.config.get("env_nested_delimiter") or "__"
        data: dict[str, Any] = {}
        for var in sorted(os.environ):
            if not var.upper().startswith(prefix) or len(var) == len(prefix) or var.upper() in NOT_SETTINGS:
                continue
            parts = var[len(prefix) :].lower().split(delimiter)
            target = self._forward(parts[0])
            if target is None:
                nested = [n for _, cls in _nested_settings(self.settings_cls) for n in cls.model_fields]
                hint = closest_name(parts[0], list(self.settings_cls.model_fields) + nested)
                log.warning("ignoring %s: no field %r%s", var, parts[0], f" (did you mean {hint!r}?)" if hint else "")
                continue
            path, ann = resolve(self.settings_cls, target + parts[1:], f"environment {var}")
            value = type_value(ann, [os.environ[var]], f"environment {var}")
            set_path(data, path, value)
            self.resolution.env.update(leaf_labels(path, value, f"environment {var}"))
        return data


class _YamlFilesSource(_Source):
    """`yaml_default` then each `yaml_extra` file, deep-merged in order (later files win)."""

    def _files(self) -> list[tuple[str, str]]:
        """(path, who named it) for every file to read, in order."""
        fields = self.settings_cls.model_fields
        state = self.current_state
        default = state.get("yaml_default", fields["yaml_default"].default)
        extra = state.get("yaml_extra", fields["yaml_extra"].get_default(call_default_factory=True))
        if isinstance(extra, str):
            extra = [extra]
        if not isinstance(extra, (list, tuple)) or not all(isinstance(x, str) for x in extra):
            raise ConfigError(f"yaml_extra: expected a list of file paths, got {extra!r}")
        origins = self.resolution.combined()
        files = [(default, origins.get(("yaml_default",)) or "built-in default")] if default else []
        return files + [(f, origins.get(("yaml_extra",)) or "yaml_extra") for f in extra]

    def __call__(self) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for path, named_by in self._files():
            try:
                data, lines = load_yaml_file(path)
            except ConfigError as e:
                raise ConfigError(f"{e} (named by {named_by})") from None
            name = describe_file(path)
            for key in YAML_FIELDS:
                if key in data:
                    line = lines.get((key,), 1)
                    raise ConfigError(
                        f"{name}:{line}: {key} cannot be set inside a YAML file; name files on the command line"
                    )
            merged = deep_merge_dicts(merged, data)
            self.resolution.yaml.overlay({p: f"{name}:{n}" for p, n in lines.items()})
        return merged


class DynamicYamlMixInForSettings(BaseSettings):
    """Settings read, lowest priority first, from code defaults, `yaml_default`, `yaml_extra` files
    (deep-merged, later wins), `AD_` environment variables and keyword arguments.

    Errors a user can cause raise ConfigError naming the key and where its value came from.
    `origins()` tells where every value not left at its code default came from.
    """

    model_config = SettingsConfigDict(
        extra="forbid", env_prefix="AD_", env_nested_delimiter="__", validate_default=True
    )

    yaml_default: str | None = None
    yaml_extra: list[str] = []

    _origins: OriginMap = PrivateAttr(default_factory=OriginMap)

    def __init__(self, **values: Any) -> None:
        request = _request.get() or _Request(None)
        # Anything given without a label (LLM(**kwargs), tests) is a keyword argument; given labels win, for
        # the values actually given.
        labels = {**{p: f"keyword argument {p[0]}" for p in leaf_paths(values)}, **(request.init_origins or {})}
        init = {p: label for p, label in labels.items() if get_path(values, p, _ABSENT) is not _ABSENT}
        resolution = _Resolution(owner=type(self), read_env=request.read_env, init=init)
        req_token, res_token = _request.set(None), _active.set(resolution)
        try:
            super().__init__(**values)
        except ValidationError as e:
            raise ConfigError(format_validation_error(e, type(self), resolution.combined(), request.prefix)) from None
        finally:
            _request.reset(req_token)
            _active.reset(res_token)
        origins = resolution.combined()
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, DynamicYamlMixInForSettings):
                origins.replace_subtree((name,), dict(value._origins.items()))
        self._origins = origins

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        resolution = _active.get()
        assert resolution is not None, "settings sources are built inside __init__"
        return (
            init_settings,
            _EnvSource(settings_cls, resolution),
            _YamlFilesSource(settings_cls, resolution),
        )

    @classmethod
    def build(
        cls,
        values: dict[str, Any],
        init_origins: dict[Path, str] | None = None,
        read_env: bool = True,
        prefix: Path = (),
    ) -> Self:
        """Construct with labelled init kwargs (`init_origins`: leaf path -> where it came from).

        `read_env=False` when an outer settings object already read the environment for this one;
        `prefix` is this object's key path in the outer configuration, used in error messages.
        """
        token = _request.set(_Request(init_origins, read_env, prefix))
        try:
            return cls(**values)
        finally:
            _request.reset(token)

    def origins(self) -> dict[str, str]:
        """Dotted key -> where its value came from, for every value not left at its code default."""
        return {dotted(p): label for p, label in self._origins.items()}

    @property
    def origin_map(self) -> OriginMap:
        return self._origins

