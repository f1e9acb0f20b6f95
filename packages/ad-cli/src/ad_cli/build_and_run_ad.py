"""build_and_run_ad: resolve the ExperimentConfig, then build the model and run the prompts (or just print)."""

import logging
import sys
import traceback

from ad_config import ExperimentConfig, run_command

PROG = "build_and_run_ad"


def _one_line(e: BaseException) -> str:
    """The error as one line: its message's first line, with the type when the message alone is unclear."""
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    first = lines[0] if lines else type(e).__name__
    more = " (run with --log-level debug for details)" if len(lines) > 1 else ""
    # A package error's message says what went wrong; for anything else the type helps (KeyError: 'x').
    named = type(e).__module__.startswith(("ad_compiler", "ad_runtime", "ad_config"))
    return f"{first}{more}" if named else f"{type(e).__name__}: {first}{more}"


def _run(config: ExperimentConfig) -> int:
    # Imported only for a real run, so --dry-run and config errors never load torch.
    from ad_cli.run_experiment import run_experiment

    try:
        run_experiment(config)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - every layer's failure reaches the user as one line
        from ad_config import ConfigError

        if isinstance(e, ConfigError):
            raise  # run_command prints it and exits 2, like a configuration error found while parsing
        if logging.getLogger().isEnabledFor(logging.DEBUG):
            traceback.print_exc(file=sys.stderr)
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> None:
    """Entry point of `build_and_run_ad` and `python -m ad_cli.build_and_run_ad`."""
    sys.exit(run_command(argv, prog=PROG, run=_run))


if __name__ == "__main__":
    main()
