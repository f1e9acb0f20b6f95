"""Process-group set-up for one rank: who it is (RankContext) and how it joins the group (a rendezvous store on
the loopback interface)."""

import datetime
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

LOOPBACK = "127.0.0.1"
# Seconds a rank may stop answering before the run ends (LlmArgs.dist_timeout's default).
DEFAULT_DIST_TIMEOUT_S = 60.0
# Collectives wait this much longer than dist_timeout before they raise, so that for a stopped or dead
# peer the watchdog, which names the culprit, speaks first; the timeout remains for ranks alive but stuck.
PG_TIMEOUT_SLACK_S = 10.0
# ...and never less than this: a live peer may legitimately arrive late (one rank still exporting or
# compiling while the other waits), which a collective cannot tell from a hang; the heartbeat can.
MIN_PG_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class RankContext:
    """Who this process is in the group."""

    rank: int
    world_size: int
    local_rank: int
    backend: str

    @property
    def device(self) -> torch.device:
        if self.backend == "nccl":
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")


def default_backend() -> str:
    """NCCL where there are GPUs, gloo on CPUs."""
    return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"


def loopback_listener() -> socket.socket:
    """A listening socket on 127.0.0.1 only (at a port the kernel picks), for rank 0's rendezvous store."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind((LOOPBACK, 0))
        s.listen(128)
    except BaseException:
        s.close()
        raise
    return s


def init_process_group(
    rank: int, world_size: int, port: int, backend: str, timeout_s: float, listener: socket.socket | None
) -> RankContext:
    """Join the default process group through a store at 127.0.0.1:port; `timeout_s` bounds every collective.

    Rank 0 hosts that store on `listener` (a socket bound to the loopback interface, see `loopback_listener`),
    so the rendezvous is never reachable from other machines; the other ranks pass None.
    """
    ctx = RankContext(rank=rank, world_size=world_size, local_rank=rank, backend=backend)
    if dist.is_initialized():
        return ctx
    if backend == "nccl":
        torch.cuda.set_device(ctx.local_rank)
    timeout = datetime.timedelta(seconds=timeout_s)
    if rank == 0:
        # TCPStore's own server listens on every interface; on a socket we bound, it listens where we said.
        fd = listener.detach()  # the store owns (and closes) the fd from here
        store = dist.TCPStore(LOOPBACK, port, world_size, True, timeout, master_listen_fd=fd)
    else:
        store = dist.TCPStore(LOOPBACK, port, world_size, False, timeout)
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    return ctx
