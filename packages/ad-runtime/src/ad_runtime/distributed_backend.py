"""world_size > 1 (or engine_process): one process per rank; rank 0 runs the engine, the user's process talks to it
request by request.

    user process --pipe--> rank 0 (tokenizer, scheduler, sampling) --broadcast step--> ranks 1..N-1
    every rank runs the same sharded graph on the same flattened batch; collectives live in the graph.

The pipe carries requests, not conversations, so callers on many threads share rank 0's batches:

    user -> rank 0   ("add", [(client_id, prompt_ids, params, text, stream), ...])   one message per call
                     ("abort", client_id)                                            the caller stopped listening
                     ("shutdown",)
    rank 0 -> user   ("ready", vocab_size, rank_pids, build_reports)                 once, after the build
                     ("updates", [(client_id, snapshot), ...], (running, waiting, kv_cache_usage))
                                                                a step's updates, after every step: streams every
                                                                token, the others when finished; and the engine's
                                                                counts after that step

A snapshot is the engine's Request without the prompt (the user's process has it); `is_finished` marks the last.

A rank that raises, dies or stops answering for `dist_timeout` seconds ends every rank (the launcher's watchdog);
each waiting caller then gets that one-line DistributedError, and health() says the same until shutdown.
"""

import dataclasses
import itertools
import logging
import multiprocessing as mp
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from .executor.detokenizer import Detokenizer
from .executor.errors import first_line
from .executor.request import Request
from .rank_worker import rank_main
from .sampling_params import SamplingParams

if TYPE_CHECKING:
    from ad_config import LlmArgs

logger = logging.getLogger(__name__)

# How long shutdown() lets the ranks end by themselves before killing them.
SHUTDOWN_GRACE_S = 20.0
# Once rank 0's pipe closes, how long to wait for the launcher's verdict (it kills the ranks and names the
# culprit within about a second; this only bounds a launcher that is itself stuck).
VERDICT_WAIT_S = 30.0

# Called on the reader thread with a request snapshot, or with the DistributedError that ended the ranks.
UpdateCallback = Callable[[int, "Request | BaseException"], None]


@dataclasses.dataclass
class _Handler:
    """Where a client's updates go, and the prompt its snapshots left behind."""

    on_update: UpdateCallback
    prompt_token_ids: list[int]
    prompt: str | None


# What every rank imports to build (torch.export with Dynamo and AOTAutograd, transformers' model classes): ~13 s of
# a rank's start on the 2-core VM, its first export included. A forkserver imports them once for every later launch
# of the process (the test suite launches ranks ~40 times: a 2-rank build of a 2-layer model took 18 s, now 6-9);
# "spawn", the default, imports them in each rank as before. A name a future torch drops is skipped by the server.
RANK_PRELOAD = ("torch._dynamo", "torch.export._trace", "torch._functorch.aot_autograd",
                "torch._functorch.partitioners", "transformers.modeling_utils")


class DistributedBackend:
    """Starts the ranks in the background and forwards requests to rank 0; safe to call from many threads."""

    def __init__(self, args: "LlmArgs"):
        from ad_compiler.distributed.launch import launch
        from ad_compiler.export.pipeline import factory_from_args

        self.world_size = args.world_size
        self.engine = None  # lives in rank 0's process
        self.rank_pids: list[int] = []
        # Rank 0's (running, waiting, KV-cache share in use) as of its last step's updates.
        self.engine_stats: tuple[int, int, float] = (0, 0, 0.0)
        self.build_reports: list[Any] = []  # one BuildReport per rank, in rank order
        # Before any rank starts: a failure here must not leave ranks behind.
        self.tokenizer = factory_from_args(args, device="cpu").init_tokenizer()
        self.detok = Detokenizer(self.tokenizer)
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._error: BaseException | None = None
        self._stopping = False
        dump = args.model_dump(mode="json", exclude={"yaml_default", "yaml_extra"})
        level = logging.getLogger().getEffectiveLevel()  # the ranks log (and stay quiet) like this process

        def run() -> None:
            try:
                launch(rank_main, args.world_size, args=(dump, child, level), timeout_s=10**9,
                       dist_timeout=args.dist_timeout, preload=RANK_PRELOAD)
            except BaseException as e:  # noqa: BLE001 - surfaced to the callers by the reader thread
                self._error = e

        self._thread = threading.Thread(target=run, name="ad-ranks", daemon=True)
        self._thread.start()
        try:
            kind, self.vocab_size, self.rank_pids, self.build_reports = self._recv_ready()
        finally:
            # The ranks hold their own copies of this end; without ours, rank 0's death reads as EOF.
            child.close()
        assert kind == "ready"
        self._lock = threading.Lock()  # guards _handlers and _failure
        self._handlers: dict[int, _Handler] = {}
        self._failure: BaseException | None = None
        self._ids = itertools.count()
        # One writer thread owns sends: a caller (an event loop, say) never blocks on a full pipe.
        self._outbox: queue.Queue = queue.Queue()
        threading.Thread(target=self._write, name="ad-rank0-writer", daemon=True).start()
        self._reader = threading.Thread(target=self._read, name="ad-rank0-reader", daemon=True)
        self._reader.start()

    # ---- talking to rank 0 ------------------------------------------------------------------------

    def _recv_ready(self) -> Any:
        while not self._conn.poll(0.1):
            if not self._thread.is_alive() or self._error is not None:
                raise self._stopped_error()
        return self._conn.recv()

    def _stopped_error(self) -> BaseException:
        from ad_compiler.distributed.launch import DistributedError

        self._thread.join(VERDICT_WAIT_S)  # the launcher stops the other ranks (and records why) before it returns
        if self._stopping:
            return DistributedError("the ranks were shut down")
        if isinstance(self._error, DistributedError):
            return self._error
        error = DistributedError(f"the ranks stopped: {first_line(self._error) if self._error else 'rank 0 ended'}")
        error.__cause__ = self._error
        return error

    def _write(self) -> None:
        while (msg := self._outbox.get()) is not None:
            try:
                self._conn.send(msg)
            except OSError:
                return  # every rank is gone; the reader sees EOF and fails the waiting callers
            if msg[0] == "shutdown":
                return

    def _read(self) -> None:
        try:
            while True:
                if self._conn.poll(0.1):
                    self._dispatch(self._conn.recv())
                elif not self._thread.is_alive():
                    break
        except (EOFError, OSError):
            pass  # every rank is gone
        except Exception:  # noqa: BLE001 - a reader that dies quietly would leave every caller waiting
            logger.exception("reading rank 0's messages failed")
        self._fail(self._stopped_error())

    def _dispatch(self, msg: Any) -> None:
        assert msg[0] == "updates", msg[0]
        self.engine_stats = msg[2]
        for cid, snap in msg[1]:
            self._dispatch_one(cid, snap)

    def _dispatch_one(self, cid: int, snap: Any) -> None:
        with self._lock:
            handler = self._handlers.get(cid)
            if handler is not None and snap.is_finished:
                del self._handlers[cid]
        if handler is None:
            return  # aborted by its caller; rank 0 sent this before the abort reached it
        snap.prompt_token_ids, snap.prompt = handler.prompt_token_ids, handler.prompt
        _call(handler.on_update, cid, snap)

    def _fail(self, error: BaseException) -> None:
        if not self._stopping:
            # Callers get the one-line error; the failing rank's traceback is its cause.
            logger.debug("the model's ranks stopped: %s", first_line(error), exc_info=error)
        with self._lock:
            self._failure = error
            handlers, self._handlers = self._handlers, {}
        self._outbox.put(None)  # ends the writer
        for cid, handler in handlers.items():
            _call(handler.on_update, cid, error)

    def health(self) -> str | None:
        """None while the ranks serve; once they have stopped, why, in one line (for a server's /health)."""
        with self._lock:
            failure = self._failure
        if failure is None:
            if self._thread.is_alive():
                return None
            failure = self._stopped_error()  # the reader is about to report it; the launcher has ended
        return first_line(failure)

    # ---- the request-level API --------------------------------------------------------------------

    def submit(
        self,
        prompts: list[list[int]],
        params: list[SamplingParams],
        texts: list[str | None],
        stream: bool,
        on_update: UpdateCallback,
    ) -> list[int]:
        """Queue requests for rank 0 (in one message, so they start in the same step); returns their client ids.

        `on_update(client_id, request)` runs on the reader thread, so it must be quick: for streams after every
        token, for the others once, when finished; with the error instead when the ranks stop.
        """
        if not len(prompts) == len(params) == len(texts):
            raise ValueError(f"got {len(prompts)} prompts, {len(params)} sampling params and {len(texts)} texts")
        with self._lock:
            if self._failure is not None:
                raise _raised(self._failure)
            cids = [next(self._ids) for _ in prompts]
            for cid, ids, text in zip(cids, prompts, texts):
                self._handlers[cid] = _Handler(on_update, list(ids), text)
        self._outbox.put(("add", [(c, list(i), sp, t, stream) for c, i, sp, t in zip(cids, prompts, params, texts)]))
        return cids

    def abort(self, client_id: int) -> None:
        """Stop a request on rank 0 (frees its batch slot and pages); no more updates come for it."""
        with self._lock:
            if self._handlers.pop(client_id, None) is None:
                return  # finished already, or never existed
        self._outbox.put(("abort", client_id))

    # ---- the backend API (as LocalBackend) --------------------------------------------------------

    def generate(self, prompts: list[list[int]], params: list[SamplingParams], texts: list[str | None]
                 ) -> list[Request]:
        if not prompts:
            return []
        inbox: queue.Queue = queue.Queue()
        cids = self.submit(prompts, params, texts, False, lambda cid, item: inbox.put((cid, item)))
        slot = {cid: i for i, cid in enumerate(cids)}
        out: list[Any] = [None] * len(cids)
        pending = set(cids)
        try:
            while pending:
                cid, item = inbox.get()
                if isinstance(item, BaseException):
                    raise _raised(item)
                out[slot[cid]] = item
                pending.discard(cid)
        finally:
            for cid in pending:  # the caller gave up (an exception, KeyboardInterrupt): free rank 0's slots
                self.abort(cid)
        return out

    def stream(self, prompt: list[int], params: SamplingParams, text: str | None) -> Iterator[Request]:
        inbox: queue.Queue = queue.Queue()
        [cid] = self.submit([prompt], [params], [text], True, lambda _, item: inbox.put(item))
        finished = False
        try:
            while not finished:
                item = inbox.get()
                if isinstance(item, BaseException):
                    finished = True  # nothing to abort
                    raise _raised(item)
                finished = item.is_finished
                if not finished:
                    # Decoded here, not on rank 0: the text costs the caller's thread, not the shared step loop.
                    item.text = self.detok.stream_text(item)
                yield item
        finally:
            if not finished:  # a caller that stops listening early frees the request's batch slot
                self.abort(cid)

    def shutdown(self) -> None:
        """Ask rank 0 to stop (it stops the others); kill whatever is still running after a grace period."""
        if not self._thread.is_alive():
            return
        self._stopping = True
        self._outbox.put(("shutdown",))
        self._thread.join(SHUTDOWN_GRACE_S)
        if self._thread.is_alive():
            logger.warning("ranks did not stop within %.0fs; killing them", SHUTDOWN_GRACE_S)
            for pid in self.rank_pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            # The launcher notices the dead ranks, stops the rest and returns.
            deadline = time.monotonic() + 10.0
            while self._thread.is_alive() and time.monotonic() < deadline:
                self._thread.join(0.5)
        self._reader.join(5.0)  # fails whoever still waits, with "shut down"


def _call(on_update: UpdateCallback, cid: int, item: Any) -> None:
    # A failing callback must not end the reader thread: every other caller would then wait forever.
    try:
        on_update(cid, item)
    except Exception:  # noqa: BLE001 - logged, the other requests go on
        logger.exception("update callback for request %d failed", cid)


def _raised(error: BaseException) -> BaseException:
    """A fresh exception per waiting caller (threads must not share one traceback), naming the original."""
    from ad_compiler.distributed.launch import DistributedError

    fresh = DistributedError(str(error), rank=getattr(error, "rank", None))
    fresh.__cause__ = error
    return fresh
