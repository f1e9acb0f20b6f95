"""`ad-cache`: list the build cache's entries, or remove them to free the space."""

import argparse
import math
import sys
import time
from pathlib import Path

from .errors import OneLineErrorParser, parse_number

PROG = "ad-cache"
MB = 1e6
DAY_S = 86400.0


def _days(text: str) -> float:
    value = parse_number(text, float, "number of days")
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a number of days >= 0, got {text}")
    return value


def parser() -> argparse.ArgumentParser:
    """`ad-cache list` and `ad-cache clear`, each with its own --help."""
    p = OneLineErrorParser(prog=PROG, description="Show and free the build cache: the graphs build_and_run_ad saves "
                           "after the sharding stage, one file per rank. Converted checkpoints beside it are never "
                           "touched.",
                           epilog="`ad-cache list --help` and `ad-cache clear --help` describe their options.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{list,clear}")
    dir_help = ("the build cache folder (default: the one a build uses: $AD_BUILD_CACHE_DIR, else "
                "$AD_CACHE_DIR/builds, else ~/.cache/ad_autodeploy/builds); give it where a YAML file sets "
                "args.build_cache_dir or args.cache_dir")
    ls = sub.add_parser("list", help="one line per entry: digest, rank, size, age, 'incomplete' if it fails "
                        "its check; then the total", description="List the build cache's entries and their total.")
    ls.add_argument("--dir", type=Path, help=dir_help)
    cl = sub.add_parser("clear", help="remove entries and temporary files left by interrupted writes",
                        description="Remove build cache entries and temporary files left by interrupted writes "
                        "(not those of the last hour: a build may be writing them).")
    cl.add_argument("--dir", type=Path, help=dir_help)
    cl.add_argument("--older-than", type=_days, metavar="DAYS",
                    help="remove only files last written more than DAYS days ago (fractions allowed: 0.5)")
    cl.add_argument("--dry-run", action="store_true", help="print what would be removed and remove nothing")
    return p


def _root(given: Path | None) -> Path:
    """--dir, else the folder a build would use: the settings as the environment layer gives them (AD_* variables)."""
    if given is not None:
        return given.expanduser()
    from ad_config import load_llm_args
    from ad_runtime.build_cache import default_root

    return default_root(load_llm_args())


def _age(seconds: float) -> str:
    for unit, size in (("d", DAY_S), ("h", 3600.0), ("min", 60.0)):
        if seconds >= 2 * size:
            return f"{seconds / size:.0f} {unit}"
    return f"{max(seconds, 0):.0f} s"


def _count(files: list) -> str:
    """'2 entries and 1 temporary file' for a list of CacheFiles."""
    entries = sum(f.is_entry for f in files)
    text = f"{entries} {'entry' if entries == 1 else 'entries'}"
    temps = len(files) - entries
    return text + (f" and {temps} temporary file{'' if temps == 1 else 's'}" if temps else "")


def _list(root: Path, now: float) -> int:
    from ad_runtime import build_cache

    files = build_cache.cache_files(root)
    if not files:
        print(f"the build cache is empty ({root})")
        return 0
    for f in files:
        digest = f.path.name.lstrip(".")[:32]  # a temporary file's name is "." + its entry's name + ...
        if f.is_entry:
            what = f"rank {f.rank} of {f.world_size}"
            state = "" if build_cache.is_complete(f.path) else "  incomplete"
        else:
            what, state = "temporary", "  (a write in progress, or left by an interrupted one)"
        print(f"{digest}  {what:<14}{f.size / MB:9.1f} MB  {_age(now - f.mtime):>6} old{state}")
    print(f"total: {_count(files)}, {sum(f.size for f in files) / MB:.1f} MB in {root}")
    return 0


def _clear(root: Path, now: float, older_than: float | None, dry_run: bool) -> int:
    from ad_runtime import build_cache

    cutoff = now - older_than * DAY_S if older_than is not None else math.inf
    files = build_cache.cache_files(root)
    # A young temporary file may be a build's write in progress: removing it would cost that build its entry.
    chosen = [f for f in files if f.mtime < cutoff and (f.is_entry or f.mtime < now - build_cache.WRITE_GRACE_S)]
    removed, freed = [], 0
    for f in chosen:
        if dry_run:
            print(f"would remove {f.path}")
            freed += f.size
        else:
            try:
                freed += build_cache.remove(f)
            except OSError as e:  # one unremovable file (permissions) should not stop the others
                print(f"{PROG}: could not remove {f.path}: {e.strerror or e}", file=sys.stderr)
                continue
        removed.append(f)
    kept = f" (kept {len(files) - len(chosen)} newer)" if len(chosen) < len(files) else ""
    verb = "would remove" if dry_run else "removed"
    print(f"{verb} {_count(removed)}, {freed / MB:.1f} MB {'to free' if dry_run else 'freed'}, in {root}{kept}")
    return 0 if len(removed) == len(chosen) else 1


def main(argv: list[str] | None = None) -> int:
    """Entry point of `ad-cache` and `python -m ad_cli.cache_cli`; returns the exit code."""
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    root = _root(args.dir)
    if root.exists() and not root.is_dir():
        print(f"{PROG}: error: {root} is a file, not a build cache folder", file=sys.stderr)
        return 2
    try:
        if args.command == "list":
            return _list(root, time.time())
        return _clear(root, time.time(), args.older_than, args.dry_run)
    except OSError as e:  # an unreadable folder
        print(f"{PROG}: error: {e.strerror or e}: {e.filename or root}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
