"""What a `model` value names, checked without torch: a local path that cannot be used fails before any build."""

from pathlib import Path


class ModelPathError(ValueError):
    """A local model path that does not exist, or a folder without config.json."""


def model_path_problem(model: str | None) -> str | None:
    """Why `model` cannot be used, in one line; None for the bundled model (None), a .gguf file, a folder with
    config.json, and a name that is not a local path (a Hugging Face hub id, resolved at build time)."""
    if model is None:
        return None
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return None
    if path.is_dir():
        return None if (path / "config.json").is_file() else f"model folder {path} has no config.json"
    if path.suffix == ".gguf" or model.startswith(("/", "./", "../")):
        return f"model path {model!r} does not exist"
    return None


def check_model_path(model: str | None) -> None:
    """Raise ModelPathError with `model_path_problem(model)`, if any (the CLIs call it before importing torch, so a
    mistyped path fails at once instead of after ~15 s of imports)."""
    problem = model_path_problem(model)
    if problem is not None:
        raise ModelPathError(problem)
