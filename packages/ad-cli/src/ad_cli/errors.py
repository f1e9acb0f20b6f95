"""How the command-line tools report a failure: one line on stderr, the traceback only when debugging."""

import argparse
import logging
import sys
import traceback
from typing import NoReturn, TypeVar

_Number = TypeVar("_Number", int, float)


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse whose errors are one line (`prog: error: ...`, no usage block) and exit 2; a subcommand's errors
    name the program (its prog is "program subcommand")."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog.split()[0]}: error: {message}", file=sys.stderr)
        sys.exit(2)


def parse_number(text: str, kind: type[_Number], what: str) -> _Number:
    """`text` as an argparse option's number; `not a {what}: '...'` otherwise."""
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a {what}: {text!r}") from None


def one_line(e: BaseException) -> str:
    """The error as one line: its message's first line, with the type when the message alone is unclear."""
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    first = lines[0] if lines else type(e).__name__
    more = " (run with --log-level debug for details)" if len(lines) > 1 else ""
    # Our packages' errors say what went wrong; for anything else the type helps (KeyError: 'x').
    ours = type(e).__module__.startswith(("ad_compiler", "ad_runtime", "ad_config"))
    return f"{first}{more}" if ours else f"{type(e).__name__}: {first}{more}"


def report(prog: str, e: BaseException) -> None:
    """Print `prog: error: ...` on stderr, after the traceback when the log level is debug."""
    if logging.getLogger().isEnabledFor(logging.DEBUG):
        traceback.print_exception(e, file=sys.stderr)
    print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
