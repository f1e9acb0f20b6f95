"""Contract: imports go one way (ad_config <- ad_compiler <- ad_runtime <- ad_cli), ad-config never imports torch,
and library transforms never import each other (shared helpers live in ad_compiler.utils.graph_utils).

Read from the source with `ast`, so an import inside a function counts as much as one at the top.
"""

import ast
from pathlib import Path

import pytest

PACKAGES = Path(__file__).resolve().parents[1] / "packages"
SOURCES = {
    "ad_config": PACKAGES / "ad-config" / "src" / "ad_config",
    "ad_compiler": PACKAGES / "ad-compiler" / "src" / "ad_compiler",
    "ad_runtime": PACKAGES / "ad-runtime" / "src" / "ad_runtime",
    "ad_cli": PACKAGES / "ad-cli" / "src" / "ad_cli",
}
# What each package may not import: everything downstream of it; ad-config also nothing heavy.
FORBIDDEN = {
    "ad_config": {"ad_compiler", "ad_runtime", "ad_cli", "torch", "transformers", "triton", "flashinfer"},
    "ad_compiler": {"ad_runtime", "ad_cli"},
    "ad_runtime": {"ad_cli"},
}


def _module_name(package: str, path: Path) -> str:
    rel = path.relative_to(SOURCES[package]).with_suffix("")
    parts = [package, *rel.parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(package: str, path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = _module_name(package, path).split(".")
    if path.name != "__init__.py":
        here = here[:-1]  # the package the module is in
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
                found += [(node.lineno, f"{mod}.{a.name}" if not node.module else mod) for a in node.names]
            else:
                found.append((node.lineno, node.module or ""))
    return found


def _files(package: str) -> list[Path]:
    return sorted(SOURCES[package].rglob("*.py"))


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_go_one_way(package: str) -> None:
    bad = [f"{path.relative_to(PACKAGES)}:{line} imports {mod}"
           for path in _files(package) for line, mod in _imports(package, path)
           if mod.split(".")[0] in FORBIDDEN[package]]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("package", ["ad_compiler", "ad_runtime"])
def test_library_transforms_never_import_each_other(package: str) -> None:
    library = SOURCES[package] / "transform" / "library"
    modules = {p.stem for p in library.glob("*.py") if p.stem != "__init__"}
    bad = []
    for path in sorted(library.glob("*.py")):
        for line, mod in _imports(package, path):
            parts = mod.split(".")
            # any package's transform library: <pkg>.transform.library.<name>
            if len(parts) >= 4 and parts[1:3] == ["transform", "library"] and parts[3] in modules | {
                    p.stem for pkg in ("ad_compiler", "ad_runtime")
                    for p in (SOURCES[pkg] / "transform" / "library").glob("*.py")}:
                if parts[3] != path.stem:
                    bad.append(f"{path.relative_to(PACKAGES)}:{line} imports {mod}")
    assert not bad, "\n".join(bad)


def test_the_import_reader_sees_what_it_must() -> None:
    # The contract tests above pass vacuously if _imports finds nothing: check it on known imports.
    found = {mod for _, mod in _imports("ad_runtime", SOURCES["ad_runtime"] / "transform" / "cached_state.py")}
    assert "ad_compiler.utils.graph_utils" in found and "ad_runtime.kv_cache.interface" in found
    main = {mod for _, mod in _imports("ad_compiler", SOURCES["ad_compiler"] / "__main__.py")}
    assert "ad_compiler.plugins" in main  # an import inside a function


def test_every_registry_is_the_one_generic_registry() -> None:
    from ad_compiler.export.patches import ExportPatchRegistry
    from ad_compiler.kernels_registry import _BACKENDS
    from ad_compiler.models.factory import ModelFactoryRegistry
    from ad_compiler.registry import Registry
    from ad_compiler.transform.interface import TransformRegistry
    from ad_runtime.attention.registry import AttentionRegistry
    from ad_runtime.compile.backends import CompileBackendRegistry

    registries = [ExportPatchRegistry, ModelFactoryRegistry, TransformRegistry, AttentionRegistry,
                  CompileBackendRegistry, *_BACKENDS.values()]
    assert all(isinstance(r, Registry) for r in registries)
    assert all(r.names() for r in registries)  # the built-ins and the runtime plugin registered themselves


# The modules that define a registry: none may import an implementation of what it registers.
REGISTRY_MODULES = {
    ("ad_compiler", "transform/interface.py"): "ad_compiler.transform.library",
    ("ad_compiler", "models/factory.py"): "ad_compiler.models.hf",
    ("ad_compiler", "export/patches/__init__.py"): "ad_compiler.export.patches.",
    ("ad_compiler", "registry.py"): "ad_compiler.transform.library",
}


@pytest.mark.parametrize("where", sorted(REGISTRY_MODULES))
def test_registry_modules_import_no_implementation(where: tuple[str, str]) -> None:
    package, rel = where
    forbidden = REGISTRY_MODULES[where]
    found = [mod for _, mod in _imports(package, SOURCES[package] / rel)]
    assert not [m for m in found if m.startswith(forbidden)], found
