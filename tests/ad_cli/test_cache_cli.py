"""`ad-cache`: list shows entries written by the build cache itself (rank, size, age, incomplete ones); clear removes
only the cache's files (entries, stale temporary files), honours --dry-run and --older-than; bad folders fail clearly."""

import os
import time
from pathlib import Path

import pytest
import torch
from ad_cli.cache_cli import main
from ad_compiler.export.graph_pickle import dumps_graph
from ad_compiler.transform.interface import TransformInfo
from ad_runtime.build_cache import BuildCacheEntry

DIGEST_A, DIGEST_B = "a" * 32, "b" * 32
DAY = 86400


class _Tiny(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x) + 1


@pytest.fixture(scope="module")
def graph_bytes() -> bytes:
    return dumps_graph(torch.fx.symbolic_trace(_Tiny()))


def _entry(root: Path, digest: str, rank: int, world: int, graph: bytes, age_days: float = 0.0) -> Path:
    """An entry written through the cache's own store (so a change of its on-disk format shows here), aged."""
    path = root / f"{digest}-rank{rank}of{world}.adbuild"
    history = {"export_to_gm": TransformInfo(name="export_to_gm", stage="export", num_matches=1)}
    assert BuildCacheEntry(path, {"test": digest}).store(graph, history)
    _age(path, age_days)
    return path


def _age(path: Path, days: float) -> None:
    t = time.time() - days * DAY
    os.utime(path, (t, t))


def _run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, list[str], str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out.strip().splitlines(), err


def test_list_shows_each_entry_with_its_rank_and_a_total(tmp_path: Path, graph_bytes: bytes, capsys) -> None:
    a = _entry(tmp_path, DIGEST_A, 0, 2, graph_bytes, age_days=3)
    b = _entry(tmp_path, DIGEST_A, 1, 2, graph_bytes)
    code, lines, err = _run(capsys, "list", "--dir", str(tmp_path))
    assert code == 0 and not err
    assert len(lines) == 3, lines
    assert lines[0].startswith(DIGEST_A) and "rank 0 of 2" in lines[0] and "3 d old" in lines[0]
    assert "rank 1 of 2" in lines[1]
    assert not any("incomplete" in line for line in lines)
    total_mb = (a.stat().st_size + b.stat().st_size) / 1e6
    assert lines[2] == f"total: 2 entries, {total_mb:.1f} MB in {tmp_path}"


def test_a_truncated_entry_is_listed_as_incomplete(tmp_path: Path, graph_bytes: bytes, capsys) -> None:
    good = _entry(tmp_path, DIGEST_A, 0, 1, graph_bytes)
    bad = _entry(tmp_path, DIGEST_B, 0, 1, graph_bytes)
    bad.write_bytes(bad.read_bytes()[:-10])
    code, lines, _ = _run(capsys, "list", "--dir", str(tmp_path))
    assert code == 0
    assert lines[0].startswith(good.name[:32]) and "incomplete" not in lines[0]
    assert lines[1].startswith(bad.name[:32]) and lines[1].endswith("incomplete")


def test_list_of_a_missing_folder_says_the_cache_is_empty(tmp_path: Path, capsys) -> None:
    code, lines, err = _run(capsys, "list", "--dir", str(tmp_path / "never-built"))
    assert code == 0 and not err
    assert lines == [f"the build cache is empty ({tmp_path / 'never-built'})"]


def _cache_with_neighbours(root: Path, graph: bytes) -> tuple[list[Path], list[Path]]:
    """A cache folder as builds leave it, beside a converted checkpoint: (the cache's files, everything else)."""
    builds = root / "builds"
    ours = [_entry(builds, DIGEST_A, 0, 1, graph, age_days=10), _entry(builds, DIGEST_B, 0, 1, graph)]
    stale = builds / f".{DIGEST_A}-rank0of1.adbuild.x1y2z3.tmp"  # store's temporary file, its build killed
    stale.write_bytes(b"ad-build-cache\npartial")
    _age(stale, 1)
    converted = root / "smollm2-1234-5678"
    converted.mkdir()
    (converted / "model.safetensors").write_bytes(b"weights")
    (converted / "config.json").write_text("{}")
    foreign = builds / "notes.txt"  # not the cache's: neither listed nor removed
    foreign.write_text("mine")
    return [*ours, stale], [converted / "model.safetensors", converted / "config.json", foreign]


def test_clear_dry_run_removes_nothing(tmp_path: Path, graph_bytes: bytes, capsys) -> None:
    ours, others = _cache_with_neighbours(tmp_path, graph_bytes)
    code, lines, _ = _run(capsys, "clear", "--dir", str(tmp_path / "builds"), "--dry-run")
    assert code == 0
    assert all(p.exists() for p in ours + others)
    assert sorted(lines[:-1]) == sorted(f"would remove {p}" for p in ours)
    assert lines[-1].startswith("would remove 2 entries and 1 temporary file, ")


def test_clear_removes_only_the_caches_files(tmp_path: Path, graph_bytes: bytes, capsys) -> None:
    ours, others = _cache_with_neighbours(tmp_path, graph_bytes)
    freed_mb = sum(p.stat().st_size for p in ours) / 1e6
    code, lines, _ = _run(capsys, "clear", "--dir", str(tmp_path / "builds"))
    assert code == 0
    assert not any(p.exists() for p in ours)
    assert all(p.exists() for p in others)
    assert lines == [f"removed 2 entries and 1 temporary file, {freed_mb:.1f} MB freed, in {tmp_path / 'builds'}"]


def test_clear_keeps_a_young_temporary_file_a_build_may_be_writing(tmp_path: Path, capsys) -> None:
    writing = tmp_path / f".{DIGEST_A}-rank0of1.adbuild.abc.tmp"
    writing.write_bytes(b"ad-build-cache\n")
    code, lines, _ = _run(capsys, "clear", "--dir", str(tmp_path))
    assert code == 0 and writing.exists()
    assert lines[-1].endswith("(kept 1 newer)")


def test_clear_older_than_keeps_newer_entries(tmp_path: Path, graph_bytes: bytes, capsys) -> None:
    old = _entry(tmp_path, DIGEST_A, 0, 1, graph_bytes, age_days=10)
    new = _entry(tmp_path, DIGEST_B, 0, 1, graph_bytes, age_days=1)
    code, lines, _ = _run(capsys, "clear", "--dir", str(tmp_path), "--older-than", "7")
    assert code == 0
    assert not old.exists() and new.exists()
    assert lines[-1].startswith("removed 1 entry, ") and lines[-1].endswith("(kept 1 newer)")


@pytest.mark.parametrize("build_cache_dir_env", [False, True])
def test_the_default_folder_is_the_builds(tmp_path: Path, graph_bytes: bytes, monkeypatch, capsys,
                                          build_cache_dir_env: bool) -> None:
    monkeypatch.setenv("AD_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "cache" / "builds"
    if build_cache_dir_env:  # AD_BUILD_CACHE_DIR sets the build's build_cache_dir, which wins over cache_dir
        root = tmp_path / "elsewhere"
        monkeypatch.setenv("AD_BUILD_CACHE_DIR", str(root))
    else:
        monkeypatch.delenv("AD_BUILD_CACHE_DIR", raising=False)
    _entry(root, DIGEST_A, 0, 1, graph_bytes)
    code, lines, _ = _run(capsys, "list")
    assert code == 0 and lines[-1].endswith(f" in {root}") and lines[0].startswith(DIGEST_A)
    assert _run(capsys, "clear")[0] == 0
    assert not any(root.iterdir())


@pytest.mark.parametrize("command", ["list", "clear"])
def test_a_dir_that_is_a_file_fails_with_one_line(tmp_path: Path, capsys, command: str) -> None:
    not_a_folder = tmp_path / "builds"
    not_a_folder.write_text("x")
    code, lines, err = _run(capsys, command, "--dir", str(not_a_folder))
    assert code == 2 and not lines
    assert err.strip().splitlines() == [f"ad-cache: error: {not_a_folder} is a file, not a build cache folder"]
    assert not_a_folder.exists()


@pytest.mark.parametrize("days", ["-1", "soon", "nan"])
def test_a_bad_older_than_fails_with_one_line(tmp_path: Path, capsys, days: str) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["clear", "--dir", str(tmp_path), "--older-than", days])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ad-cache: error: argument --older-than:"), err


def test_list_shows_the_caches_files_only(tmp_path: Path, graph_bytes: bytes, capsys) -> None:
    ours, _ = _cache_with_neighbours(tmp_path, graph_bytes)
    code, lines, _ = _run(capsys, "list", "--dir", str(tmp_path / "builds"))
    assert code == 0 and len(lines) == len(ours) + 1
    assert lines[1].startswith(DIGEST_A) and "temporary" in lines[1]  # after its entry
    assert not any("notes" in line for line in lines)
    assert lines[-1].startswith("total: 2 entries and 1 temporary file, ")
