"""build_and_run_ad: resolve the ExperimentConfig, then build the model and run the prompts (or just print)."""

import sys

from ad_config import ExperimentConfig, gpu_only_problems, refuse_gpu_only_backends, run_command
from ad_config.model_source import check_model_path

from ad_cli.errors import report

PROG = "build_and_run_ad"


def _run(config: ExperimentConfig) -> int:
    try:
        check_model_path(config.args.model)  # before torch loads: a mistyped path fails at once
        # Imported only for a real run, so --dry-run and config errors never load torch.
        from ad_cli.run_experiment import run_experiment

        run_experiment(config)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - every layer's failure reaches the user as one line
        from ad_config import ConfigError

        if isinstance(e, ConfigError):
            raise  # run_command prints it and exits 2, like a configuration error found while parsing
        report(PROG, e)
        return 1
    return 0


def check_device(config: ExperimentConfig) -> None:
    """Refuse GPU-only backends when device is `auto` and no GPU is visible (an explicit `cpu` is refused by
    the configuration itself), before a dry run prints or a build starts; a ConfigError names both."""
    args = config.args
    if args.device != "auto" or not gpu_only_problems(args, "the CPU"):
        return
    import torch  # only here: a dry run of a configuration without GPU-only backends never loads torch

    if not torch.cuda.is_available():
        refuse_gpu_only_backends(args, "the CPU (device 'auto', no CUDA GPU visible)", args.origin_map, ("args",))


def main(argv: list[str] | None = None) -> None:
    """Entry point of `build_and_run_ad` and `python -m ad_cli.build_and_run_ad`."""
    sys.exit(run_command(argv, prog=PROG, run=_run, check=check_device))


if __name__ == "__main__":
    main()
