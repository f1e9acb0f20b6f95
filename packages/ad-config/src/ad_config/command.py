"""The shared front end of ad-config and build_and_run_ad: parse, resolve, print, report errors."""

import logging
import sys
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import yaml

from .cli_parse import help_lines, parse_argv
from .errors import ConfigError
from .experiment import ExperimentConfig, prompts_not_run
from .llm_args import LlmArgs
from .origins import format_origins
from .transform_config import TRANSFORM_CONFIGS, TransformConfig

log = logging.getLogger(__name__)

# Not part of the printed configuration: the files are already merged into it, and a dry run
# printed and fed back must not stay a dry run.
_NOT_PRINTED: dict[str, Any] = {
    "dry_run": True,
    "yaml_default": True,
    "yaml_extra": True,
    "args": {"yaml_default": True, "yaml_extra": True},
}


def load_experiment_config(argv: list[str] | None = None, runs_prompts: bool = True) -> ExperimentConfig:
    """Resolve build_and_run_ad's arguments (default: sys.argv[1:]) into an ExperimentConfig.

    `runs_prompts=False` (ad-serve): the prompt section runs nothing, so prompt.batch_size does not raise
    args.max_batch_size (a server given --args.max_batch_size=1 runs one request at a time).
    """
    parsed = parse_argv(sys.argv[1:] if argv is None else argv, ExperimentConfig)
    if parsed.options.help:
        return ExperimentConfig.model_construct()
    with nullcontext() if runs_prompts else prompts_not_run():
        return ExperimentConfig.build(parsed.values, init_origins=parsed.origins)


def load_llm_args(**kwargs: Any) -> LlmArgs:
    """LlmArgs from keyword arguments (as `LLM(**kwargs)` gets them); an unknown keyword is a ConfigError."""
    return LlmArgs.build(kwargs)


class _Dumper(yaml.SafeDumper):
    """Block-style mappings; lists of scalars on one line ([tp, ep, bmm])."""


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    # Short lists of scalars stay on one line; long ones (queries) get a line per item.
    flow = all(not isinstance(x, (dict, list)) for x in data) and len(repr(data)) <= 80
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _represent_list)


def render_yaml(config: ExperimentConfig) -> str:
    """The configuration as YAML; fed back through --yaml-extra it gives the same configuration."""
    return yaml.dump(
        config.model_dump(mode="json", exclude=_NOT_PRINTED),
        Dumper=_Dumper,
        sort_keys=False,
        default_flow_style=False,
        width=1000,
        allow_unicode=True,
    )


def render_origins(config: ExperimentConfig) -> str:
    """`key = value  [origin]` for every value not left at its code default."""
    return "\n".join(format_origins(config.model_dump(mode="json"), config.origin_map)) + "\n"


def _usage(prog: str) -> str:
    head = [
        f"usage: {prog} [--model NAME] [--yaml-extra FILE ...] [--<key>.<sub-key>=VALUE ...]",
        "       [--dry-run] [--show-origin] [--log-level debug|info|warning|error]",
        "",
        "Options are kebab-case dot paths; keys inside free-form mappings (model-kwargs, tokenizer-kwargs,",
        "transforms, sp-kwargs) are free and typed like YAML scalars. Precedence: command line > environment",
        "(AD_<FIELD>, nested with __) > YAML files (later wins) > default.yaml > code defaults.",
        "",
        "  --show-origin  print where each value came from (instead of the YAML or the run), then exit",
        "  --log-level    log verbosity on stderr (default warning)",
    ]
    return "\n".join(head + help_lines(ExperimentConfig) + _transform_help()) + "\n"


def _transform_help() -> list[str]:
    """Every transform's own options, then the keys all of them take."""
    common = frozenset(TransformConfig.model_fields)
    lines = ["", "Transforms (--args.transforms.<name>.<key>=VALUE; default.yaml lists them in pipeline order):"]
    for name, cls in TRANSFORM_CONFIGS.items():
        stage = cls.model_fields["stage"].default
        doc = cls.__doc__.strip().splitlines()[0] if cls.__doc__ else ""
        lines.append(f"  {name} [{getattr(stage, 'value', stage)}]  {doc}")
        lines += help_lines(cls, f"args.transforms.{name.replace('_', '-')}.", skip=common, indent="    ")
    lines += ["", "Keys every transform takes (its stage, in brackets above, is fixed by the pipeline):"]
    lines += help_lines(TransformConfig, "args.transforms.<name>.", skip=frozenset({"stage"}), indent="  ")
    return lines


def run_command(
    argv: list[str] | None,
    prog: str,
    run: Callable[[ExperimentConfig], int | None] | None = None,
    check: Callable[[ExperimentConfig], None] | None = None,
) -> int:
    """Parse and resolve; print the configuration (ad-config, --dry-run), or where each value came from
    (--show-origin), or hand it to `run`.

    `check` runs on the resolved configuration before a dry run or a real run (not before --show-origin,
    which must show where a refused value came from); a ConfigError it raises is reported like any other.
    Returns the exit code: 0 on success, 2 for a configuration error (printed as one or two lines).
    """
    try:
        parsed = parse_argv(sys.argv[1:] if argv is None else argv, ExperimentConfig)
        options = parsed.options
        # Logging first, so warnings met while resolving (e.g. unknown AD_ variables) are shown.
        logging.basicConfig(
            level=options.log_level.upper(), stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
        )
        if options.help:
            sys.stdout.write(_usage(prog))
            return 0
        config = ExperimentConfig.build(parsed.values, init_origins=parsed.origins)
        if options.show_origin:
            # An inspection, like --dry-run: print and stop, never run the job.
            sys.stdout.write(render_origins(config))
            return 0
        if check is not None:
            check(config)
        if run is None or config.dry_run:
            sys.stdout.write(render_yaml(config))
            return 0
        log.info("resolved configuration for model %s", config.model or "bundled SmolLM2")
        return run(config) or 0
    except ConfigError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
