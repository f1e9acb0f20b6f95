"""Readable outputs of a compile: the graph as text or a picture, and the per-transform report."""

from .graph_io import graph_text, write_graph_dot, write_graph_svg, write_graph_text
from .transform_report import report_rows, report_table

__all__ = ["graph_text", "report_rows", "report_table", "write_graph_dot", "write_graph_svg", "write_graph_text"]
