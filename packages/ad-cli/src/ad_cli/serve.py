"""`ad-serve`: the OpenAI-compatible server; takes build_and_run_ad's configuration plus --host/--port."""

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ad-serve", add_help=False)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None)
    own, rest = p.parse_known_args(sys.argv[1:] if argv is None else argv)
    from ad_config import ConfigError, load_experiment_config

    try:
        config = load_experiment_config(rest)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    import uvicorn
    from ad_runtime import LLM

    from .server_app import build_app

    llm = LLM.from_args(config.args)
    name = own.served_model_name or (config.args.model or "SmolLM2-135M-Instruct")
    app = build_app(llm, name, default_max_tokens=int(config.prompt.sp_kwargs.get("max_tokens", 256)))
    try:
        uvicorn.run(app, host=own.host, port=own.port, log_level="info")
    finally:
        llm.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
