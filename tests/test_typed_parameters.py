"""Contract: the parameters that carry the pipeline's three shared objects are typed, never `Any`.

`args` is the configuration (LlmArgs / AutoDeployConfig, or whatever else a function really takes), `cm` the cache
interface (ad_compiler.transform.cache_protocol.CacheInterface in compiler code, the runtime's
CachedSequenceInterface where it is known to be one) and `factory` the ModelFactory. A parameter of one of these
names annotated `Any` (or `object`) anywhere in packages/*/src fails; so does an unannotated one in a public
function. `*args` / `**kwargs` catch-alls are not these objects and are not checked. Read with `ast`.
"""

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGES = Path(__file__).resolve().parents[1] / "packages"
NAMES = {"args", "cm", "factory"}
UNTYPED = {"Any", "object"}

Function = ast.FunctionDef | ast.AsyncFunctionDef


def _sources() -> list[Path]:
    return sorted(PACKAGES.glob("*/src/**/*.py"))


def _functions(tree: ast.Module) -> Iterator[tuple[Function, bool]]:
    """Every function with whether it is public: module level or a method of a module-level class, named without
    a leading underscore (dunders count as public); functions nested in functions are not."""
    def walk(body: list[ast.stmt], public: bool) -> Iterator[tuple[Function, bool]]:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = node.name
                yield node, public and (not name.startswith("_") or (name.startswith("__") and name.endswith("__")))
                yield from walk(node.body, False)
            elif isinstance(node, ast.ClassDef):
                yield from walk(node.body, public and not node.name.startswith("_"))
            else:  # if TYPE_CHECKING / try blocks and the like: what they define is at the same level
                for field in ("body", "orelse", "finalbody", "handlers"):
                    yield from walk([n for n in getattr(node, field, []) if isinstance(n, ast.AST)], public)
    yield from walk(tree.body, True)


def _names_in(annotation: ast.expr) -> set[str]:
    """The names an annotation mentions, quoted ("LlmArgs | None") and dotted (typing.Any) ones included."""
    found = set()
    for node in ast.walk(annotation):
        if isinstance(node, ast.Name):
            found.add(node.id)
        elif isinstance(node, ast.Attribute):
            found.add(node.attr)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            try:
                found |= _names_in(ast.parse(node.value, mode="eval").body)
            except SyntaxError:
                pass
    return found


def _parameters(path: Path) -> Iterator[tuple[int, str, str, ast.expr | None, bool]]:
    """(line, function, parameter, annotation, public function) of every parameter named in NAMES."""
    for fn, public in _functions(ast.parse(path.read_text(), filename=str(path))):
        a = fn.args
        for arg in (*a.posonlyargs, *a.args, *a.kwonlyargs):
            if arg.arg in NAMES:
                yield arg.lineno, fn.name, arg.arg, arg.annotation, public


def _problems(path: Path, root: Path = PACKAGES) -> list[str]:
    bad = []
    for line, fn, name, annotation, public in _parameters(path):
        where = f"{path.relative_to(root)}:{line} {fn}({name})"
        if annotation is None:
            if public:
                bad.append(f"{where} has no annotation")
        elif _names_in(annotation) & UNTYPED:
            bad.append(f"{where} is annotated {ast.unparse(annotation)}")
    return bad


def test_args_cm_and_factory_are_typed() -> None:
    bad = [problem for path in _sources() for problem in _problems(path)]
    assert not bad, "type these parameters (LlmArgs, CacheInterface / CachedSequenceInterface, ModelFactory):\n" + (
        "\n".join(bad))


def test_the_reader_sees_what_it_must(tmp_path: Path) -> None:
    # The contract passes vacuously if the reader finds nothing: check it on known parameters and on a bad file.
    interface = PACKAGES / "ad-compiler" / "src" / "ad_compiler" / "transform" / "interface.py"
    found = {(fn, name) for _, fn, name, _, _ in _parameters(interface)}
    assert {("__call__", "cm"), ("__call__", "factory"), ("_apply", "cm"), ("_apply", "factory")} <= found
    assert len(list(_parameters(PACKAGES / "ad-runtime" / "src" / "ad_runtime" / "build.py"))) >= 6
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import typing\nfrom typing import Any\n"
        "def f(args: Any): ...\ndef catch_all(*args: Any, **kwargs: Any): ...\n"
        "class C:\n    def g(self, cm: 'Any | None', factory: typing.Any = None): ...\n"
        "    def _h(self, cm): ...\n"
        "def public(factory, args: object): ...\n"
        "def _private(args: int):\n    def inner(cm): ...\n"
    )
    problems = [p.split(" ", 1)[1] for p in _problems(bad, tmp_path)]
    assert problems == [
        "f(args) is annotated Any", "g(cm) is annotated 'Any | None'", "g(factory) is annotated typing.Any",
        "public(factory) has no annotation", "public(args) is annotated object",
    ], problems

