"""ad_config: typed, layered configuration (YAML files, environment, dot-notation CLI); imports no torch."""

from .backends import gpu_only_problems, refuse_gpu_only_backends
from .command import load_experiment_config, load_llm_args, render_yaml, run_command
from .dynamic_yaml import DynamicYamlMixInForSettings
from .errors import ConfigError
from .experiment import BenchmarkConfig, ExperimentConfig, PromptConfig
from .llm_args import AutoDeployConfig, KvCacheConfig, LlmArgs, SamplingDefaults
from .merge import deep_merge_dicts

__all__ = [
    "AutoDeployConfig",
    "BenchmarkConfig",
    "ConfigError",
    "DynamicYamlMixInForSettings",
    "ExperimentConfig",
    "KvCacheConfig",
    "LlmArgs",
    "PromptConfig",
    "SamplingDefaults",
    "deep_merge_dicts",
    "gpu_only_problems",
    "load_experiment_config",
    "load_llm_args",
    "refuse_gpu_only_backends",
    "render_yaml",
    "run_command",
]
