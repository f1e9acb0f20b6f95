"""Write a GraphModule as readable text, as Graphviz DOT, and as SVG where the `dot` program exists."""

import shutil
import subprocess
from pathlib import Path

from torch.fx import GraphModule, Node


def graph_text(gm: GraphModule) -> str:
    """The graph in FX's own notation followed by its generated Python code."""
    return f"{gm.graph}\n\n# ---- code ----\n{gm.code}"


def write_graph_text(gm: GraphModule, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(graph_text(gm))
    return path


def _label(node: Node) -> str:
    target = node.target if node.op != "call_function" else getattr(node.target, "__name__", str(node.target))
    text = f"{node.name}\\n{node.op}: {target}"
    val = node.meta.get("val")
    if hasattr(val, "shape"):
        text += f"\\n{list(val.shape)} {str(val.dtype).removeprefix('torch.')}"
    return text.replace('"', "'")


def graph_dot(gm: GraphModule) -> str:
    lines = ["digraph G {", "  node [shape=box, fontsize=10];"]
    for node in gm.graph.nodes:
        lines.append(f'  "{node.name}" [label="{_label(node)}"];')
        for inp in node.all_input_nodes:
            lines.append(f'  "{inp.name}" -> "{node.name}";')
    lines.append("}")
    return "\n".join(lines) + "\n"


def write_graph_dot(gm: GraphModule, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(graph_dot(gm))
    return path


def write_graph_svg(gm: GraphModule, path: str | Path, timeout_s: float = 120.0) -> Path | None:
    """Render with Graphviz's `dot`; None (and only the .dot file written) when it is not installed."""
    path = Path(path)
    dot_path = write_graph_dot(gm, path.with_suffix(".dot"))
    exe = shutil.which("dot")
    if exe is None:
        return None
    subprocess.run([exe, "-Tsvg", str(dot_path), "-o", str(path)], check=True, timeout=timeout_s)
    return path
