"""visualize_namespace: writes the graph as text and DOT (SVG with Graphviz), leaves it unchanged."""

import shutil

import torch


class Small(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x) + 1


def test_writes_graph_files(tmp_path, export_module, apply_transform):
    x = torch.randn(2, 3)
    gm = export_module(Small(), x)
    before = str(gm.graph)
    gm, info = apply_transform("visualize_namespace", gm, enabled=True, output_dir=str(tmp_path))
    assert not info.skipped and info.num_matches == 0
    assert str(gm.graph) == before
    text = (tmp_path / "graph.txt").read_text()
    assert "aten.relu" in text
    assert "digraph" in (tmp_path / "graph.dot").read_text()
    assert (tmp_path / "graph.svg").exists() == (shutil.which("dot") is not None)
    torch.testing.assert_close(gm(x), torch.relu(x) + 1)


def test_off_by_default(tmp_path, export_module, apply_transform, monkeypatch):
    monkeypatch.chdir(tmp_path)
    gm = export_module(Small(), torch.randn(2, 3))
    _, info = apply_transform("visualize_namespace", gm)
    assert info.skipped and info.reason == "disabled"
    assert not list(tmp_path.iterdir())
