"""`ad-serve`: the OpenAI-compatible server; takes build_and_run_ad's configuration plus --host/--port."""

import argparse
import logging
import sys

from ad_cli.errors import report

PROG = "ad-serve"


def main(argv: list[str] | None = None) -> int:
    """Entry point of `ad-serve` and `python -m ad_cli.serve`; returns the exit code."""
    p = argparse.ArgumentParser(prog=PROG, add_help=False)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None)
    own, rest = p.parse_known_args(sys.argv[1:] if argv is None else argv)
    from ad_config import ConfigError, load_experiment_config

    try:
        config = load_experiment_config(rest)
    except ConfigError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    # A server says where it listens and logs requests, so INFO here; library chatter stays off.
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    import uvicorn
    from ad_runtime import LLM

    from .run_experiment import quiet_libraries
    from .server_app import build_app

    quiet_libraries()
    try:
        llm = LLM.from_args(config.args)
    except Exception as e:  # noqa: BLE001 - a failed build is one line, like build_and_run_ad's
        report(PROG, e)
        return 1
    name = own.served_model_name or (config.args.model or "SmolLM2-135M-Instruct")
    app = build_app(llm, name, default_max_tokens=int(config.prompt.sp_kwargs.get("max_tokens", 256)))
    try:
        uvicorn.run(app, host=own.host, port=own.port, log_level="info")
    finally:
        llm.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
