"""build_and_run_ad: resolve the ExperimentConfig, then build the model and run the prompts (or just print)."""

import sys

from ad_config import ExperimentConfig, run_command


def _run(config: ExperimentConfig) -> int:
    # Imported only for a real run, so --dry-run and config errors never load torch.
    try:
        from ad_cli.run_experiment import run_experiment
    except ModuleNotFoundError as e:
        if e.name != "ad_cli.run_experiment":
            raise
        print(
            "build_and_run_ad: error: running is not available yet (ad_cli.run_experiment is missing); use --dry-run",
            file=sys.stderr,
        )
        return 1
    result = run_experiment(config)
    return result if isinstance(result, int) else 0


def main(argv: list[str] | None = None) -> None:
    """Entry point of `build_and_run_ad` and `python -m ad_cli.build_and_run_ad`."""
    sys.exit(run_command(argv, prog="build_and_run_ad", run=_run))


if __name__ == "__main__":
    main()
