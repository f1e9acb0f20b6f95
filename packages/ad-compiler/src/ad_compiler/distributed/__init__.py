"""Process launch and process-group set-up for multi-rank runs (torch.multiprocessing or torchrun)."""

from .launch import DistributedError, launch
from .process_group import RankContext, free_port, init_process_group, torchrun_context

__all__ = ["DistributedError", "RankContext", "free_port", "init_process_group", "launch", "torchrun_context"]
