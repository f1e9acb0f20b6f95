"""Serving benchmark in the spirit of `vllm bench serve`: N concurrent streaming clients against an OpenAI-compatible server.

Reports request and token throughput, TTFT, TPOT, ITL and end-to-end latency (mean, p50, p90, p99) and the
failed requests; optionally writes every number and per-request record as JSON and a plot (matplotlib).

Against a running ad-serve:
    python benchmarks/serve_bench.py --num-prompts 1024 --concurrency 64 --input-len 128 --output-len 128 --ignore-eos
Start the server, benchmark it, stop it (everything after `--` goes to `python -m ad_cli.serve`):
    python benchmarks/serve_bench.py --launch --num-prompts 16 --concurrency 4 --input-len 32 --output-len 8 \\
        --ignore-eos -- --args.model-kwargs.num-hidden-layers=2 --args.device=cpu --port 8123
"""

import argparse
import asyncio
import functools
import json
import math
import os
import platform
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

PROG = "serve_bench"
DEFAULT_VOCAB = 32000  # below every common vocabulary (Llama-2 32000, SmolLM2 49152, Llama-3 128256, Qwen ...)
MAX_TOKEN_ID = 2**31 - 1
# Short common words: about one token each for BPE vocabularies, so N words make a prompt of about N tokens.
WORDS = ("the of and to in is was for on are with as at be by this had not but from or have an they which one you "
         "were all we her she there would their will each about how up out them then many some so these would "
         "other into has more two like him see time could no make than first been its who now people my made over "
         "did down only way find use may water long little very after words called just where most know get "
         "through back much go good new write our me man too any day same right look think also around another "
         "came come work three must because does part even place well such here take why things help put years "
         "different away again off went old number great tell men say small every found still between name should "
         "home big give air line set own under read last never us left end along while might next sound below "
         "saw something thought both few those always looked show large often together asked house world going").split()


class BenchError(Exception):
    """Something the user can fix (server not reachable, bad option): printed as one line, exit 1."""


@dataclass
class RequestSpec:
    prompt: list[int] | str
    input_len: int  # exact for token-id prompts, the number of words for chat
    output_len: int


@dataclass
class RequestRecord:
    input_len: int
    max_tokens: int
    ok: bool = False
    error: str | None = None
    start: float = 0.0  # seconds since the benchmark started, when the request was sent
    ttft: float = 0.0
    latency: float = 0.0
    output_tokens: int = 0
    token_source: str = ""  # usage | length | chunks
    prompt_tokens_reported: int | None = None
    chunks: int = 0
    finish_reason: str | None = None
    itl: list[float] = field(default_factory=list)

    @property
    def tpot(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


# ---------------------------------------------------------------------------------------------- options

def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The benchmark's options; everything after `--` is handed to the server that --launch starts."""
    own, server = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server address (with --launch: its port "
                   "is given to the server unless the server arguments name --port)")
    p.add_argument("--model", default=None, help="model name to send (default: the first of /v1/models)")
    p.add_argument("--endpoint", choices=("completions", "chat"), default="completions",
                   help="completions: random token-id prompts, exact input lengths; chat: random words")
    p.add_argument("--num-prompts", type=int, default=200, help="measured requests")
    p.add_argument("--concurrency", type=int, default=64, help="most requests in flight at once")
    p.add_argument("--request-rate", type=float, default=math.inf,
                   help="requests per second, Poisson arrivals (inf: all at once, limited by --concurrency)")
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens (chat: about this many words)")
    p.add_argument("--output-len", type=int, default=128, help="max_tokens of each request")
    p.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="lengths uniform in [len*(1-r), len*(1+r)]")
    p.add_argument("--ignore-eos", action="store_true", help='send "ignore_eos": true (exactly output-len tokens)')
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
    p.add_argument("--vocab-size", type=int, default=None, help="token ids of random prompts stay below this "
                   "(default: asked from the server's error for an out-of-range id, else %d)" % DEFAULT_VOCAB)
    p.add_argument("--seed", type=int, default=0, help="seed of prompts, lengths and arrival times")
    p.add_argument("--warmup", type=int, default=0, help="requests sent (and not measured) before the run")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds to wait for any byte of an answer")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="write all numbers and per-request records")
    p.add_argument("--plot", type=Path, default=None, metavar="FILE", help="write a plot (needs matplotlib)")
    p.add_argument("--launch", action="store_true", help="start `python -m ad_cli.serve <args after -->`, wait for "
                   "/health, benchmark, stop it")
    p.add_argument("--launch-timeout", type=float, default=1200.0, help="seconds to wait for the launched server")
    p.add_argument("--server-log", type=Path, default=None, help="log file of the launched server (default: a "
                   "temporary file, kept)")
    args = p.parse_args(own)
    for name in ("num_prompts", "concurrency", "input_len", "output_len"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 <= args.random_range_ratio < 1:
        p.error("--random-range-ratio must be in [0, 1)")
    if args.request_rate <= 0:
        p.error("--request-rate must be positive (inf: all at once)")
    if server and not args.launch:
        p.error("arguments after -- are for the server that --launch starts; add --launch")
    return args, server


# ---------------------------------------------------------------------------------------------- workload

def lengths(rng: random.Random, mean: int, ratio: float) -> int:
    """A length uniform in [mean*(1-ratio), mean*(1+ratio)], at least 1 (vllm's random dataset rule)."""
    lo, hi = max(1, math.floor(mean * (1 - ratio))), max(1, math.ceil(mean * (1 + ratio)))
    return rng.randint(lo, hi)


def make_requests(args: argparse.Namespace, count: int, vocab: int, rng: random.Random) -> list[RequestSpec]:
    low = min(1000, vocab // 4)  # skip the low ids, where small vocabularies keep their special tokens
    specs = []
    for _ in range(count):
        n_in = lengths(rng, args.input_len, args.random_range_ratio)
        n_out = lengths(rng, args.output_len, args.random_range_ratio)
        if args.endpoint == "completions":
            prompt: list[int] | str = [rng.randrange(low, vocab) for _ in range(n_in)]
        else:
            prompt = " ".join(rng.choice(WORDS) for _ in range(n_in))
        specs.append(RequestSpec(prompt, n_in, n_out))
    return specs


def arrival_gaps(n: int, rate: float, rng: random.Random) -> list[float]:
    """Seconds to wait before each request: 0 for an infinite rate, else exponential gaps (Poisson arrivals)."""
    if math.isinf(rate):
        return [0.0] * n
    return [rng.expovariate(rate) for _ in range(n)]


# ---------------------------------------------------------------------------------------------- client

def _error_message(body: bytes, status: int) -> str:
    try:
        msg = json.loads(body)["error"]["message"]
    except Exception:  # noqa: BLE001 - not OpenAI's error shape: show the start of the body
        msg = body.decode(errors="replace").strip()[:200]
    return f"HTTP {status}: {msg}"


def request_body(args: argparse.Namespace, model: str, spec: RequestSpec) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "max_tokens": spec.output_len, "temperature": args.temperature,
                            "stream": True, "stream_options": {"include_usage": True}}
    if args.ignore_eos:
        body["ignore_eos"] = True
    if args.endpoint == "completions":
        body["prompt"] = spec.prompt
    else:
        body["messages"] = [{"role": "user", "content": spec.prompt}]
    return body


async def send(client: httpx.AsyncClient, args: argparse.Namespace, model: str, spec: RequestSpec,
               t0: float) -> RequestRecord:
    """One streamed request, timed chunk by chunk."""
    rec = RequestRecord(spec.input_len, spec.output_len)
    path = "/v1/completions" if args.endpoint == "completions" else "/v1/chat/completions"
    start = time.perf_counter()
    rec.start = start - t0
    last = start
    usage_tokens = None
    done = False
    try:
        async with client.stream("POST", path, json=request_body(args, model, spec)) as resp:
            if resp.status_code != 200:
                rec.error = _error_message(await resp.aread(), resp.status_code)
                return rec
            async for line in resp.aiter_lines():
                now = time.perf_counter()
                line = line.strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    rec.error = "stream error: " + str(chunk["error"].get("message", chunk["error"]))
                    return rec
                if chunk.get("usage"):
                    usage_tokens = chunk["usage"].get("completion_tokens")
                    rec.prompt_tokens_reported = chunk["usage"].get("prompt_tokens")
                choices = chunk.get("choices") or []
                if not choices:
                    continue
                choice = choices[0]
                text = choice.get("text") if args.endpoint == "completions" else (choice.get("delta") or {}).get("content")
                if choice.get("finish_reason"):
                    rec.finish_reason = choice["finish_reason"]
                # A completions chunk stands for new tokens even when their text is still held back (an incomplete
                # character, a skipped special token): the server streams each token as it comes, as vLLM does, and
                # `vllm bench serve` counts such a chunk too. A chat chunk without content may be role-only.
                token_chunk = text or choice.get("finish_reason") or (args.endpoint == "completions" and "text" in choice)
                if not token_chunk:
                    continue
                if rec.chunks == 0:
                    rec.ttft = now - start
                else:
                    rec.itl.append(now - last)
                rec.chunks += 1
                last = now
    except (httpx.HTTPError, OSError, ValueError) as e:
        rec.error = f"{type(e).__name__}: {e}"
        return rec
    rec.latency = last - start
    if not done and rec.finish_reason is None:
        rec.error = "the stream ended without [DONE]"
    elif rec.chunks == 0:
        rec.error = "no output chunk"
    else:
        rec.ok = True
        if usage_tokens is not None:
            rec.output_tokens, rec.token_source = int(usage_tokens), "usage"
        elif rec.finish_reason == "length":  # stopped at max_tokens: exactly that many were generated
            rec.output_tokens, rec.token_source = spec.output_len, "length"
        else:
            rec.output_tokens, rec.token_source = rec.chunks, "chunks"
    return rec


async def run_requests(client: httpx.AsyncClient, args: argparse.Namespace, model: str, specs: list[RequestSpec],
                       gaps: list[float], progress: bool) -> tuple[list[RequestRecord], float, int]:
    """All requests with arrival gaps, at most --concurrency in flight; (records, duration, peak in flight)."""
    sem = asyncio.Semaphore(args.concurrency)
    in_flight = peak = 0
    bar = None
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(specs), desc="requests", file=sys.stderr, disable=not sys.stderr.isatty())
        except ImportError:
            pass

    async def one(spec: RequestSpec) -> RequestRecord:
        nonlocal in_flight, peak
        async with sem:
            in_flight += 1
            peak = max(peak, in_flight)
            try:
                return await send(client, args, model, spec, t0)
            finally:
                in_flight -= 1
                if bar is not None:
                    bar.update(1)

    t0 = time.perf_counter()
    tasks = []
    target = t0
    for spec, gap in zip(specs, gaps):
        target += gap
        delay = target - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(spec)))
    records = await asyncio.gather(*tasks)
    duration = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    return list(records), duration, peak


async def ask_model(client: httpx.AsyncClient) -> str:
    resp = await client.get("/v1/models")
    resp.raise_for_status()
    data = resp.json().get("data") or []
    if not data:
        raise BenchError("/v1/models lists no model; name one with --model")
    return str(data[0]["id"])


async def ask_vocab(client: httpx.AsyncClient, model: str) -> tuple[int, str]:
    """The vocabulary size, read from the server's answer to an out-of-range token id (ad-serve names it)."""
    try:
        resp = await client.post("/v1/completions", json={"model": model, "prompt": [MAX_TOKEN_ID], "max_tokens": 1})
        found = re.search(r"vocabulary \(size (\d+)\)", resp.text)
    except httpx.HTTPError:
        found = None
    if found:
        return int(found.group(1)), "reported by the server"
    return DEFAULT_VOCAB, "default; the server did not say (set --vocab-size)"


async def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    timeout = httpx.Timeout(args.request_timeout, connect=30.0)
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    async with httpx.AsyncClient(base_url=args.base_url, timeout=timeout, limits=limits) as client:
        try:
            model = args.model or await ask_model(client)
        except httpx.HTTPError as e:
            raise BenchError(f"cannot reach {args.base_url}/v1/models ({type(e).__name__}: {e}); is the server up? "
                             "(--launch starts one)") from None
        vocab, vocab_note = (args.vocab_size, "--vocab-size") if args.vocab_size else (DEFAULT_VOCAB, "unused")
        if args.endpoint == "completions" and not args.vocab_size:
            vocab, vocab_note = await ask_vocab(client, model)
        rng = random.Random(args.seed)
        specs = make_requests(args, args.num_prompts, vocab, rng)
        gaps = arrival_gaps(args.num_prompts, args.request_rate, rng)
        print(f"{PROG}: {args.num_prompts} requests to {args.base_url} ({args.endpoint}, model {model}), "
              f"concurrency {args.concurrency}, rate {args.request_rate} req/s, input {args.input_len} / output "
              f"{args.output_len} tokens (range ratio {args.random_range_ratio}), vocab {vocab} ({vocab_note})",
              file=sys.stderr)
        if args.warmup:
            warm = make_requests(args, args.warmup, vocab, random.Random(args.seed + 1))
            recs, secs, _ = await run_requests(client, args, model, warm, [0.0] * len(warm), progress=False)
            bad = sum(not r.ok for r in recs)
            print(f"{PROG}: warm-up: {len(recs)} requests in {secs:.1f} s ({bad} failed)", file=sys.stderr)
        records, duration, peak = await run_requests(client, args, model, specs, gaps, progress=True)
    return {"model": model, "vocab": vocab, "records": records, "duration": duration, "peak": peak}


# ---------------------------------------------------------------------------------------------- report

def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default); NaN for no values."""
    if not values:
        return math.nan
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def stats_ms(values: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values]
    mean = sum(ms) / len(ms) if ms else math.nan
    return {"mean": mean, "p50": percentile(ms, 50), "p90": percentile(ms, 90), "p99": percentile(ms, 99)}


def summarize(args: argparse.Namespace, run: dict[str, Any]) -> dict[str, Any]:
    recs: list[RequestRecord] = run["records"]
    ok = [r for r in recs if r.ok]
    duration = run["duration"]
    out_tokens = sum(r.output_tokens for r in ok)
    in_exact = args.endpoint == "completions" or all(r.prompt_tokens_reported is not None for r in ok)
    in_tokens = sum(r.prompt_tokens_reported if r.prompt_tokens_reported is not None else r.input_len for r in ok)
    sources = {s: sum(r.token_source == s for r in ok) for s in ("usage", "length", "chunks")}
    errors: dict[str, int] = {}
    for r in recs:
        if not r.ok:
            errors[r.error or "?"] = errors.get(r.error or "?", 0) + 1
    return {
        "successful_requests": len(ok), "failed_requests": len(recs) - len(ok), "duration_s": duration,
        "max_concurrency": args.concurrency, "peak_concurrency": run["peak"], "request_rate": args.request_rate,
        "total_input_tokens": in_tokens, "input_tokens_exact": in_exact, "total_output_tokens": out_tokens,
        "output_token_sources": sources, "output_chunks": sum(r.chunks for r in ok),
        "request_throughput": len(ok) / duration, "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
        "ttft_ms": stats_ms([r.ttft for r in ok]),
        "tpot_ms": stats_ms([t for r in ok if (t := r.tpot) is not None]),
        "itl_ms": stats_ms([x for r in ok for x in r.itl]),
        "e2el_ms": stats_ms([r.latency for r in ok]),
        "errors": errors,
    }


@functools.cache
def machine() -> str:
    """This machine (the client's; with --launch the server's too) and its GPUs, if torch sees any."""
    cpu = f"{platform.node()} ({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs)"
    try:
        import torch

        if torch.cuda.is_available():
            n = torch.cuda.device_count()
            return f"{cpu}, GPU: {torch.cuda.get_device_name(0)}" + (f" x{n}" if n > 1 else "")
        return f"{cpu}, no GPU visible to torch"
    except ImportError:
        return f"{cpu}, torch not installed (GPU unknown)"


def print_table(s: dict[str, Any], model: str, endpoint: str, host: str) -> None:
    w = 50

    def row(label: str, value: Any) -> None:
        text = f"{value:.2f}" if isinstance(value, float) else str(value)
        print(f"{label:<40}{text:>10}")

    def section(title: str) -> None:
        print(f"{title:-^{w}}")

    print(f"{' Serving Benchmark Result ':=^{w}}")
    row("Successful requests:", s["successful_requests"])
    row("Failed requests:", s["failed_requests"])
    row("Maximum request concurrency:", s["max_concurrency"])
    row("Peak concurrent requests:", s["peak_concurrency"])
    row("Request rate (req/s):", s["request_rate"] if not math.isinf(s["request_rate"]) else "inf")
    row("Benchmark duration (s):", s["duration_s"])
    row("Total input tokens:" if s["input_tokens_exact"] else "Total input tokens (approx.):", s["total_input_tokens"])
    row("Total generated tokens:", s["total_output_tokens"])
    row("Request throughput (req/s):", s["request_throughput"])
    row("Output token throughput (tok/s):", s["output_throughput"])
    row("Total token throughput (tok/s):", s["total_token_throughput"])
    for key, title, short in (("ttft_ms", "Time to First Token", "TTFT"),
                              ("tpot_ms", "Time per Output Token (excl. 1st token)", "TPOT"),
                              ("itl_ms", "Inter-token Latency", "ITL"),
                              ("e2el_ms", "End-to-end Latency", "E2EL")):
        section(title)
        for stat, name in (("mean", "Mean"), ("p50", "Median"), ("p90", "P90"), ("p99", "P99")):
            row(f"{name} {short} (ms):", s[key][stat])
    print("=" * w)
    src = s["output_token_sources"]
    how = ", ".join(f"{n} by {label}" for label, n in (
        ("the server's usage", src["usage"]), ("finish_reason=length (= max_tokens)", src["length"]),
        ("streamed chunks (~1 token each)", src["chunks"])) if n)
    print(f"Output tokens counted: {how or 'none'}; {s['output_chunks']} streamed chunks in all (ITL is per chunk)")
    print(f"Endpoint: {endpoint}, model: {model}, server: {host}")
    print(f"Machine: {machine()}")
    for msg, n in list(s["errors"].items())[:5]:
        print(f"Failed x{n}: {msg}")


def plot(path: Path, recs: list[RequestRecord], s: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in recs if r.ok]
    fig, ax = plt.subplots(2, 2, figsize=(12, 8))
    for a, values, title in ((ax[0][0], [r.ttft * 1000 for r in ok], "TTFT (ms)"),
                             (ax[0][1], [t * 1000 for r in ok if (t := r.tpot) is not None], "TPOT (ms)"),
                             (ax[1][0], [x * 1000 for r in ok for x in r.itl], "ITL (ms)")):
        a.hist(values, bins=50)
        a.set_title(title)
        a.set_ylabel("count")
    tl = ax[1][1]
    for i, r in enumerate(sorted(ok, key=lambda r: r.start)):
        tl.plot([r.start, r.start + r.ttft], [i, i], color="tab:orange", linewidth=1)
        tl.plot([r.start + r.ttft, r.start + r.latency], [i, i], color="tab:blue", linewidth=1)
    tl.set_title("requests over time (orange: waiting for the first token)")
    tl.set_xlabel("s since start")
    tl.set_ylabel("request")
    fig.suptitle(f"{s['successful_requests']} requests, {s['output_throughput']:.1f} output tok/s, "
                 f"concurrency {s['max_concurrency']}")
    fig.tight_layout()
    fig.savefig(path)


# ---------------------------------------------------------------------------------------------- launch

def _server_option(server: list[str], name: str) -> str | None:
    for i, a in enumerate(server):
        if a == name and i + 1 < len(server):
            return server[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def launch(args: argparse.Namespace, server: list[str]) -> subprocess.Popen:
    """Start ad-serve with `server` arguments on --base-url's port (or point --base-url at theirs)."""
    url = urlsplit(args.base_url)
    port, host = _server_option(server, "--port"), _server_option(server, "--host")
    if port == "0":
        raise BenchError("--launch needs a fixed port (the server's --port 0 picks one the benchmark cannot know)")
    if port is None:
        port = str(url.port or 8000)
        server = [*server, "--port", port]
    connect = url.hostname if host is None else ("127.0.0.1" if host in ("0.0.0.0", "::", "") else host)
    args.base_url = urlunsplit((url.scheme or "http", f"{connect}:{port}", "", "", ""))
    log_path = args.server_log or Path(tempfile.mkstemp(prefix="ad-serve-", suffix=".log")[1])
    args.server_log = log_path
    cmd = [sys.executable, "-m", "ad_cli.serve", *server]
    with open(log_path, "w") as log:  # the child keeps its own descriptor
        # Its own session: Ctrl-C here reaches it only through stop(), after the benchmark has let go of it.
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    print(f"{PROG}: started {' '.join(cmd[1:])} (pid {proc.pid}, log {log_path})", file=sys.stderr)
    return proc


def wait_ready(args: argparse.Namespace, proc: subprocess.Popen) -> None:
    """Poll /health until it answers 200; BenchError with the log's tail if the server exits first."""
    print(f"{PROG}: waiting for {args.base_url}/health (the model is built first)", file=sys.stderr)
    t0 = time.monotonic()
    while True:
        code = proc.poll()
        if code is not None:
            lines = Path(args.server_log).read_text(errors="replace").splitlines()[-15:]
            tail = "\n".join("    " + line for line in lines)
            raise BenchError(f"the server exited with code {code} before it was ready; end of {args.server_log}:\n"
                             f"{tail}")
        try:
            if httpx.get(args.base_url + "/health", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() - t0 > args.launch_timeout:
            raise BenchError(f"the server was not ready after {args.launch_timeout:.0f} s (see {args.server_log})")
        time.sleep(0.5)
    print(f"{PROG}: server ready after {time.monotonic() - t0:.1f} s", file=sys.stderr)


def stop(proc: subprocess.Popen) -> None:
    """Ask the launched server to shut down (SIGINT, as Ctrl-C); escalate if it does not within 30 s."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGINT, 30), (signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            if sig == signal.SIGINT:
                proc.send_signal(sig)
            else:  # the whole group: a multi-GPU server has one process per rank, all started by it
                os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


# ---------------------------------------------------------------------------------------------- main

def strict_json(x: Any) -> Any:
    """`x` with NaN and infinities as strings: plain JSON has no such numbers."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: strict_json(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [strict_json(v) for v in x]
    return x


def main(argv: list[str] | None = None) -> int:
    args, server = parse_args(sys.argv[1:] if argv is None else argv)
    can_plot = True
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            can_plot = False
            print(f"{PROG}: --plot needs matplotlib, which is not installed (pip install matplotlib); "
                  "running without the plot", file=sys.stderr)
    proc = None
    try:
        if args.launch:
            proc = launch(args, server)
            wait_ready(args, proc)
        run = asyncio.run(benchmark(args))
    except BenchError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    finally:
        if proc is not None:
            stop(proc)
    s = summarize(args, run)
    print_table(s, run["model"], args.endpoint, args.base_url)
    if args.json:
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        payload = {"config": config, "server_args": server, "model": run["model"], "vocab_size": run["vocab"],
                   "machine": machine(), "summary": s, "requests": [{**asdict(r), "tpot": r.tpot} for r in run["records"]]}
        args.json.write_text(json.dumps(strict_json(payload), indent=1))
        print(f"{PROG}: wrote {args.json}", file=sys.stderr)
    if args.plot and can_plot:
        plot(args.plot, run["records"], s)
        print(f"{PROG}: wrote {args.plot}", file=sys.stderr)
    return 0 if s["successful_requests"] else 1


if __name__ == "__main__":
    sys.exit(main())
