"""Contract (issue 15): no module of the packages over 400 lines, no function over 60 lines outside Triton kernels.

Kernels (`@triton.jit` functions) are exempt: splitting one costs registers or a launch. Read with `ast`.
"""

import ast
from pathlib import Path

PACKAGES = Path(__file__).resolve().parents[1] / "packages"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def _sources() -> list[Path]:
    return sorted(p for p in PACKAGES.glob("*/src/**/*.py"))


def _is_kernel(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    return any(ast.unparse(d).startswith(("triton.jit", "tl.jit")) for d in fn.decorator_list)


def test_no_module_over_the_limit() -> None:
    sizes = {str(p.relative_to(PACKAGES)): len(p.read_text().splitlines()) for p in _sources()}
    long = {path: n for path, n in sizes.items() if n > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_no_function_over_the_limit_outside_kernels() -> None:
    long = {}
    for p in _sources():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not _is_kernel(node):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long[f"{p.relative_to(PACKAGES)}:{node.name}"] = lines
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_the_reader_finds_the_packages_and_the_kernels() -> None:
    sources = _sources()
    assert len(sources) > 100
    kernels = [n for p in sources for n in ast.walk(ast.parse(p.read_text()))
               if isinstance(n, ast.FunctionDef) and _is_kernel(n)]
    assert len(kernels) >= 8  # GEMV, attention (3), RMSNorm (2), RoPE, SiLU-mul, ...
