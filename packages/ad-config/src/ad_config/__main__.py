"""`ad-config` / `python -m ad_config`: print the configuration build_and_run_ad would run, as YAML."""

import sys

from .command import run_command


def main(argv: list[str] | None = None) -> None:
    """Take exactly build_and_run_ad's arguments; print the resolved ExperimentConfig on stdout."""
    sys.exit(run_command(argv, prog="ad-config"))


if __name__ == "__main__":
    main()
