"""model_path_problem: which `model` values name an unusable local path, decided without torch."""

import pytest
from ad_config.model_source import ModelPathError, check_model_path, model_path_problem


def test_usable_values_have_no_problem(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    for model in (None, str(gguf), str(folder), "HuggingFaceTB/SmolLM2-135M-Instruct"):
        assert model_path_problem(model) is None, model
        check_model_path(model)


@pytest.mark.parametrize("name", ["/no/such/folder", "./nothing", "../nothing", "missing.gguf", "~/missing.gguf"])
def test_missing_local_paths_are_named(name):
    assert model_path_problem(name) == f"model path {name!r} does not exist"
    with pytest.raises(ModelPathError, match="does not exist"):
        check_model_path(name)


def test_a_folder_without_config_json_is_named(tmp_path):
    assert model_path_problem(str(tmp_path)) == f"model folder {tmp_path} has no config.json"
