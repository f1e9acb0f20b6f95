#!/usr/bin/env bash
# Run here (not on the GPU machine) once per checkout: fills the git-ignored folders a GPU call carries.
#   .whl/      wheels the GPU machine lacks (pydantic, omegaconf, gguf, flashinfer 0.6.1, ...)
#   .gpu/tok/  the bundled SmolLM2 tokenizer, used by make_models.py's random-weight stand-ins
# Then each device call: carry [".whl", ".gpu"] and start with `source benchmarks/gpu/setup.sh`.
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
bash ../shared/device/wheels.sh
grep -qx '/.gpu/' .git/info/exclude || echo '/.gpu/' >> .git/info/exclude
mkdir -p .gpu/tok
dir=$(python -m uv run python -c "from ad_compiler.models.bundled import bundled_model_dir; print(bundled_model_dir())")
cp "$dir"/tokenizer.json "$dir"/tokenizer_config.json .gpu/tok/
cp "$dir"/*.jinja .gpu/tok/ 2>/dev/null || true
du -sh .whl .gpu
