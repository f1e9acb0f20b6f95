"""`ad-serve`: the OpenAI-compatible server; takes build_and_run_ad's configuration plus its own server options."""

import argparse
import gc
import logging
import math
import os
import sys
from typing import TYPE_CHECKING, Any

from ad_cli.errors import OneLineErrorParser, parse_number, report
from ad_cli.http_limits import ServerLimits

if TYPE_CHECKING:
    from ad_config import LlmArgs

PROG = "ad-serve"
# Where --api-key's default comes from (not AD_-prefixed: the configuration loader reads AD_* variables as
# settings). The environment keeps the key out of the process list, where a command-line argument shows.
API_KEY_ENV = "SERVE_API_KEY"
_DEFAULTS = ServerLimits()


def _port(text: str) -> int:
    port = parse_number(text, int, "port number")
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a TCP port (0-65535; 0 picks a free one)")
    return port


def _positive_int(text: str) -> int:
    value = parse_number(text, int, "whole number")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _seconds(text: str) -> float:
    value = parse_number(text, float, "number of seconds")
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def _api_key(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def server_parser() -> argparse.ArgumentParser:
    """The server's own options; everything else on the command line is build_and_run_ad's configuration."""
    p = OneLineErrorParser(
        prog=PROG, add_help=False, allow_abbrev=False,
        usage=f"{PROG} [server options] [configuration options]",
        description="Serve a model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, "
                    "/v1/models, /tokenize, /detokenize, /version, /health).",
    )
    g = p.add_argument_group("server options")
    g.add_argument("-h", "--help", action="store_true", help="show this help (server options, then the "
                   "configuration options) and exit")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine "
                   "only; 0.0.0.0 opens the server to the network)")
    g.add_argument("--port", type=_port, default=8000, help="TCP port to listen on (default: 8000; 0 picks a free "
                   "port and logs it)")
    g.add_argument("--served-model-name", default=None, metavar="NAME", help="model name reported by /v1/models "
                   "and in answers (default: the configured model)")
    g.add_argument("--api-key", type=_api_key, default=os.environ.get(API_KEY_ENV) or None, metavar="KEY",
                   help="require the header 'Authorization: Bearer KEY' on every route but /health, /version and "
                        f"/metrics (401 otherwise); default: the {API_KEY_ENV} environment variable, else no key")
    g.add_argument("--max-body-bytes", type=_positive_int, default=_DEFAULTS.max_body_bytes, metavar="N",
                   help="largest request body; a larger one gets 413 before it is read (default: %(default)s)")
    g.add_argument("--header-timeout", type=_seconds, default=_DEFAULTS.header_timeout, metavar="S",
                   help="seconds a connection may take to send its request headers; then 408 and close "
                        "(default: %(default)s)")
    g.add_argument("--body-timeout", type=_seconds, default=_DEFAULTS.body_timeout, metavar="S",
                   help="seconds a request may take to send its whole body after the headers; then 408 "
                        "(default: %(default)s)")
    g.add_argument("--max-connections", type=_positive_int, default=_DEFAULTS.max_connections, metavar="N",
                   help="open connections at once; beyond it the oldest idle one is closed to make room, or "
                        "the newcomer gets 503 (default: %(default)s, lowered to fit the open-files limit)")
    g.add_argument("--max-queued-requests", type=_positive_int, default=_DEFAULTS.max_queued_requests,
                   metavar="N", help="requests that may wait for the engine at once; more get 503 "
                                     "(default: %(default)s)")
    return p


def _print_help(p: argparse.ArgumentParser) -> None:
    from ad_config import run_command

    sys.stdout.write(p.format_help())
    sys.stdout.write("\nconfiguration options (as for build_and_run_ad):\n")
    sys.stdout.flush()
    run_command(["--help"], prog=PROG)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `ad-serve` and `python -m ad_cli.serve`; returns the exit code."""
    p = server_parser()
    own, rest = p.parse_known_args(sys.argv[1:] if argv is None else argv)
    if own.help:
        _print_help(p)
        return 0
    limits = ServerLimits(max_body_bytes=own.max_body_bytes, header_timeout=own.header_timeout,
                          body_timeout=own.body_timeout, max_connections=own.max_connections,
                          max_queued_requests=own.max_queued_requests)
    from ad_config import ConfigError, load_experiment_config

    try:
        config = load_experiment_config(rest, runs_prompts=False)  # a server's batch is args.max_batch_size
    except ConfigError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    if config.dry_run:  # as build_and_run_ad: print the resolved configuration, serve nothing
        from ad_config import render_yaml

        sys.stdout.write(render_yaml(config))
        return 0
    from ad_config.model_source import model_path_problem

    problem = model_path_problem(config.args.model)
    if problem is not None:  # before torch loads and the port is taken: a mistyped path fails at once
        print(f"{PROG}: error: {problem}", file=sys.stderr)
        return 1
    from .http_server import bind_socket

    # Bound now, listening only once the model is built: a taken port or a bad host fails at once, not after
    # the build, and clients are refused (not left hanging) while the model loads.
    try:
        sock = bind_socket(own.host, own.port)
    except OSError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    return _build_and_serve(own, config, sock, limits)


def serving_args(args: "LlmArgs") -> "LlmArgs":
    """A server's defaults: `engine_process` unset means the engine in its own process on a GPU (one rank).

    Sharing one interpreter, the HTTP event loop and the engine's host work take turns: on an H200 (random
    Llama-3.1-8B weights, 64 clients, 128/128) the engine in its own process gave 6,591 output tok/s with a 6.1 ms
    mean TPOT, the engine on the server's thread 5,248-5,869 with 8.0 ms (benchmarks/README.md; other calls, not
    one). On a CPU it stays on the server's thread unless asked for: a second process imports torch again and
    holds its own memory, which small machines feel (the 2-vCPU smoke run gained 15% with it).
    """
    if args.engine_process is not None or args.world_size > 1:
        return args
    from ad_runtime.build import resolve_device

    return args.model_copy(update={"engine_process": resolve_device(args.device).type == "cuda"})


def _build_and_serve(own: argparse.Namespace, config: Any, sock: Any, limits: ServerLimits) -> int:
    """Build the model, then serve on the bound socket until stopped; returns the exit code."""
    # A server says where it listens and logs requests, so INFO here; library chatter stays off.
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    from ad_runtime import LLM

    from .http_server import serve
    from .run_experiment import quiet_libraries
    from .server_app import build_app

    quiet_libraries()
    try:
        llm = LLM.from_args(serving_args(config.args))
    except Exception as e:  # noqa: BLE001 - a failed build is one line, like build_and_run_ad's
        sock.close()
        report(PROG, e)
        return 1
    name = own.served_model_name or (config.args.model or "SmolLM2-135M-Instruct")
    app = build_app(llm, name, default_max_tokens=int(config.prompt.sp_kwargs.get("max_tokens", 256)),
                    limits=limits, api_key=own.api_key)
    if own.api_key:
        logging.getLogger("ad_cli.http").info("an API key is required on every route but /health, /version and "
                                              "/metrics")
    # The model, torch and transformers leave ~400,000 long-lived objects: a full garbage collection over them
    # stops the event loop for ~0.3 s (seen as /health outliers under 10,000 connections). Frozen, the
    # collector skips them; what the server allocates from here on is collected as usual.
    gc.collect()
    gc.freeze()
    try:
        serve(app, sock, limits)
    except KeyboardInterrupt:
        # uvicorn shuts down gracefully on SIGINT and then raises the signal again: a stop asked for, not a crash.
        pass
    finally:
        llm.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
