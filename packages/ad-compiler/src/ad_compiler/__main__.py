"""ad-export: run the compile pipeline up to a stage and write model.pt2, graph.txt and report.json."""

import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

USAGE = """usage: ad-export [build_and_run_ad configuration ...] --out DIR [--until STAGE] [--graph-svg]

Takes build_and_run_ad's configuration (--model X, --args.model-kwargs.num-hidden-layers=2, --yaml-extra F, ...),
runs the transforms up to STAGE (default post_load_fusion) and writes to DIR:
  model.pt2     the transformed graph (torch.export.load after `import ad_compiler`; module(input_ids=, position_ids=))
  graph.txt     the readable graph
  report.json   per transform: stage, status, matches, seconds, reason
  graph.svg     with --graph-svg, where Graphviz `dot` is installed (graph.dot always)
"""


@dataclass
class ExportOptions:
    out: Path | None = None
    until: str = "post_load_fusion"
    graph_svg: bool = False
    help: bool = False


def split_options(argv: list[str]) -> tuple[ExportOptions, list[str]]:
    """Take ad-export's own options out of argv; the rest is build_and_run_ad's configuration."""
    opts, rest = ExportOptions(), []
    i = 0
    while i < len(argv):
        tok = argv[i]
        name, eq, value = tok.partition("=")
        if name in ("--out", "--until"):
            if not eq:
                if i + 1 >= len(argv):
                    raise ValueError(f"{name} needs a value")
                value, i = argv[i + 1], i + 1
            if name == "--out":
                opts.out = Path(value)
            else:
                opts.until = value
        elif tok == "--graph-svg":
            opts.graph_svg = True
        elif tok in ("-h", "--help"):
            opts.help = True
        else:
            rest.append(tok)
        i += 1
    return opts, rest


def run(argv: list[str]) -> int:
    opts, rest = split_options(argv)
    if opts.help:
        print(USAGE)
        return 0
    if opts.out is None:
        raise ValueError("--out DIR is required")
    from ad_config import load_experiment_config
    from ad_config.transform_config import Stage

    try:
        until = Stage(opts.until)
    except ValueError:
        raise ValueError(f"--until {opts.until!r}: expected one of {', '.join(s.value for s in Stage)}") from None
    config = load_experiment_config(rest)
    args = config.args

    import torch

    from .export.pipeline import compile_until, factory_from_args, resolve_device
    from .export.saved import save_program
    from .report import report_rows, report_table, write_graph_svg, write_graph_text
    from .transform.interface import SharedConfig

    if until.order >= Stage.CACHE_INIT.order:
        from .plugins import PLUGINS_ENV, load_plugins

        # The cache_init / compile transforms come from a plugin (ad-runtime registers them on import).
        if not load_plugins():
            raise ValueError(f"--until {until.value} needs ad-runtime installed (or importable, with "
                             f"{PLUGINS_ENV}=ad_runtime)")
    device = resolve_device(args.device)
    factory = factory_from_args(args, device=device)
    start = time.perf_counter()
    result = compile_until(
        factory, args.transforms, until=until, shared_config=SharedConfig(device=device), allow_unregistered=True
    )
    total = time.perf_counter() - start
    out = opts.out
    out.mkdir(parents=True, exist_ok=True)
    gm = result.module
    rows = report_rows(result.history)
    if isinstance(gm, torch.fx.GraphModule):
        write_graph_text(gm, out / "graph.txt")
        if opts.graph_svg and write_graph_svg(gm, out / "graph.svg") is None:
            print("graphviz `dot` not found: wrote graph.dot only", file=sys.stderr)
    if until.order >= Stage.WEIGHT_LOAD.order and isinstance(gm, torch.fx.GraphModule):
        inputs = {k: v.to(device) for k, v in factory.get_example_inputs().items()}
        save_program(gm, inputs, out / "model.pt2")
    else:
        print("no model.pt2: weights are loaded in stage weight_load (use a later --until)", file=sys.stderr)
    report = {"model": args.model, "until": until.value, "device": device, "seconds": round(total, 3), "transforms": rows}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(report_table(rows))
    print(f"wrote {out} in {total:.1f}s")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("AD_LOG_LEVEL", "WARNING"), stream=sys.stderr)
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except SystemExit:
        raise
    except Exception as e:  # noqa: BLE001 - a command-line tool reports one line; AD_DEBUG=1 for the traceback
        if os.environ.get("AD_DEBUG"):
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"ad-export: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
