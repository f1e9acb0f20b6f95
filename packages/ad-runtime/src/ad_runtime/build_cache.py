"""The build cache on disk: one file per configuration and rank, written atomically, checked when read."""

import contextlib
import hashlib
import logging
import os
import pickle
import re
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ad_compiler.export.graph_pickle import dumps_graph, loads_graph
from ad_compiler.transform.interface import TransformInfo
from torch.fx import GraphModule

from .build_key import digest, key_ingredients
from .executor.errors import first_line

if TYPE_CHECKING:
    from ad_compiler.models.factory import ModelFactory
    from ad_config import LlmArgs

logger = logging.getLogger(__name__)

MAGIC = b"ad-build-cache\n"
SUFFIX = ".adbuild"
# What `for_build` names an entry and what `store`'s mkstemp names its temporary file: the only files the cache owns.
_ENTRY_NAME = re.compile(r"[0-9a-f]{32}-rank(\d+)of(\d+)" + re.escape(SUFFIX))
_TEMP_NAME = re.compile(r"\.[0-9a-f]{32}-rank\d+of\d+" + re.escape(SUFFIX) + r"\..+\.tmp")
# `store` writes and renames its temporary file within seconds; a younger one may be a write in progress.
WRITE_GRACE_S = 3600.0


@dataclass
class CachedBuild:
    """What an entry gives back: the graph at the cut and the history of the build that wrote it (every transform,
    those after the cut too: whether its checks passed)."""

    graph: GraphModule
    history: dict[str, TransformInfo]


def default_root(args: "LlmArgs") -> Path:
    """`build_cache_dir`, else `<cache_dir>/builds` (cache_dir: the setting, else $AD_CACHE_DIR, else ~/.cache)."""
    if args.build_cache_dir:
        return Path(args.build_cache_dir).expanduser()
    from ad_compiler.models.bundled import cache_root

    return (Path(args.cache_dir).expanduser() if args.cache_dir else cache_root()) / "builds"


class BuildCacheEntry:
    """One configuration's entry for one rank: `<root>/<key digest>-rank<r>of<n>.adbuild`."""

    def __init__(self, path: Path, ingredients: dict[str, Any]):
        self.path = Path(path)
        self.ingredients = ingredients

    @classmethod
    def for_build(
        cls, args: "LlmArgs", factory: "ModelFactory", device: Any, rank: int, world_size: int
    ) -> "BuildCacheEntry | None":
        """The entry this build reads and writes; None (with a warning saying why) where none can be keyed."""
        try:
            ingredients = key_ingredients(args, factory, device, rank, world_size)
        except (ValueError, OSError) as e:  # no checkpoint folder to fingerprint, or a file in it unreadable
            logger.warning("build cache not used: %s", e)
            return None
        name = f"{digest(ingredients)[:32]}-rank{rank}of{world_size}{SUFFIX}"
        return cls(default_root(args) / name, ingredients)

    def load(self) -> CachedBuild | None:
        """The entry's graph; None when there is none, or (with a warning naming it) when it cannot be used."""
        if not self.path.is_file():
            return None
        try:
            saved = pickle.loads(_read_checked(self.path))
            graph = loads_graph(saved["graph"])
            history = {name: TransformInfo.model_validate(info) for name, info in saved["history"].items()}
        except Exception as e:  # noqa: BLE001 - any unusable entry is rebuilt, whatever broke it
            logger.warning("build cache entry %s is unusable (%s: %s); rebuilding it", self.path, type(e).__name__,
                           first_line(e))
            return None
        return CachedBuild(graph, history)

    def snapshot(self, module: Any) -> bytes | None:
        """The graph as bytes, taken before weight loading changes it; None (with a warning) if it cannot be saved."""
        try:
            if not isinstance(module, GraphModule):
                raise TypeError(f"the pipeline gave a {type(module).__name__} at the cut, not a GraphModule")
            return dumps_graph(module)
        except Exception as e:  # noqa: BLE001 - an unsaveable graph costs the cache, never the build
            logger.warning("build cache entry %s not written: the graph cannot be saved (%s: %s)", self.path,
                           type(e).__name__, first_line(e))
            return None

    def store(self, graph_bytes: bytes, history: dict[str, TransformInfo]) -> bool:
        """Write the entry atomically (a temporary file renamed over the entry: concurrent builders of one entry
        both succeed and the last rename wins). A failure is a warning naming the entry; the build goes on."""
        tmp: str | None = None
        try:
            payload = pickle.dumps(
                {"ingredients": self.ingredients, "history": {n: i.model_dump() for n, i in history.items()},
                 "graph": graph_bytes},
                protocol=pickle.HIGHEST_PROTOCOL,
            )
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
            with os.fdopen(fd, "wb") as f:
                f.write(MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n")
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            tmp = None
        except Exception as e:  # noqa: BLE001 - a full disk or an unpicklable history costs the entry, not the build
            logger.warning("could not write build cache entry %s (%s: %s); the next build runs in full again",
                           self.path, type(e).__name__, first_line(e))
            return False
        finally:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
        return True


@dataclass(frozen=True)
class CacheFile:
    """A file the cache wrote: an entry (with its rank and world size) or the temporary file of a write (None)."""

    path: Path
    size: int
    mtime: float
    rank: int | None = None
    world_size: int | None = None

    @property
    def is_entry(self) -> bool:
        return self.rank is not None


def cache_files(root: Path) -> list[CacheFile]:
    """The entries and temporary files in `root`, each temporary file after its entry; other files (and a missing
    root) give nothing."""
    if not root.is_dir():
        return []
    found = []
    for path in sorted(root.iterdir(), key=lambda p: p.name.lstrip(".")):
        entry = _ENTRY_NAME.fullmatch(path.name)
        if not entry and not _TEMP_NAME.fullmatch(path.name):
            continue
        try:
            st = path.lstat()
        except FileNotFoundError:  # renamed or removed by a concurrent build or clear
            continue
        if not stat.S_ISREG(st.st_mode):  # a link or folder with a cache-like name is not ours to report or remove
            continue
        rank, world = (int(entry[1]), int(entry[2])) if entry else (None, None)
        found.append(CacheFile(path, st.st_size, st.st_mtime, rank, world))
    return found


def is_complete(path: Path) -> bool:
    """Whether the entry has the header and a payload matching its checksum (what `load` checks before unpickling)."""
    try:
        _read_checked(path)
    except (OSError, ValueError):
        return False
    return True


def remove(file: CacheFile) -> int:
    """Delete a cache file; the bytes freed (0 when a concurrent clear got there first). Other OSErrors propagate."""
    try:
        file.path.unlink()
    except FileNotFoundError:
        return 0
    return file.size


def _read_checked(path: Path) -> bytes:
    """The payload after the header, refused when the header or its digest does not match (truncated, damaged)."""
    data = path.read_bytes()
    if not data.startswith(MAGIC):
        raise ValueError("not a build cache entry")
    header_end = len(MAGIC) + 64
    if data[header_end : header_end + 1] != b"\n":
        raise ValueError("truncated header")
    payload = data[header_end + 1 :]
    if hashlib.sha256(payload).hexdigest().encode() != data[len(MAGIC) : header_end]:
        raise ValueError("checksum mismatch (truncated or damaged)")
    return payload