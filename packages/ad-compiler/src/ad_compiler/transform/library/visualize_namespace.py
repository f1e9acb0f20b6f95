"""visualize_namespace (stage visualize, off by default): write the current graph as text, DOT and SVG."""

import logging
from pathlib import Path

from torch.fx import GraphModule

from ...models.factory import ModelFactory
from ...report.graph_io import write_graph_svg, write_graph_text
from ..cache_protocol import CacheInterface
from ..interface import BaseTransform, SharedConfig, TransformInfo, TransformRegistry

logger = logging.getLogger(__name__)


@TransformRegistry.register("visualize_namespace")
class VisualizeNamespace(BaseTransform):
    """Leaves the graph unchanged; writes `graph.txt`, `graph.dot` and (with Graphviz) `graph.svg`.

    Files go to `output_dir` (default: the current directory); one per rank when world_size > 1.
    """

    def _apply(
        self, gm: GraphModule, cm: CacheInterface | None, factory: ModelFactory | None, shared_config: SharedConfig
    ) -> tuple[GraphModule, TransformInfo]:
        out = Path(self.config.output_dir or ".")
        stem = "graph" if shared_config.world_size == 1 else f"graph_rank{shared_config.local_rank}"
        write_graph_text(gm, out / f"{stem}.txt")
        svg = write_graph_svg(gm, out / f"{stem}.svg")
        reason = None if svg else "graphviz `dot` not installed: wrote .txt and .dot only"
        if reason:
            logger.info(reason)
        return gm, TransformInfo(num_matches=0, reason=reason)
