"""Process launch and process-group set-up for multi-rank runs (torch.multiprocessing or torchrun)."""

from .launch import (
    DistributedError,
    RankContext,
    free_port,
    init_process_group,
    launch,
    torchrun_context,
)

__all__ = ["DistributedError", "RankContext", "free_port", "init_process_group", "launch", "torchrun_context"]
