"""Process launch and process-group set-up for multi-rank runs (torch.multiprocessing)."""

from .launch import DistributedError, launch
from .process_group import RankContext

__all__ = ["DistributedError", "RankContext", "launch"]
