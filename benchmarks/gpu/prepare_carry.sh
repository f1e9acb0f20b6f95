#!/usr/bin/env bash
# Run here (not on the GPU machine) once per checkout: fills the git-ignored folders a GPU call carries.
#   .whl/      wheels the GPU machine lacks (pydantic, omegaconf, gguf, flashinfer 0.6.1, fastapi, ...)
#   .gpu/tok/  the bundled SmolLM2 tokenizer, used by make_models.py's random-weight stand-ins
#   .gguf_a/, .gguf_b/  the bundled SmolLM2 GGUF in two pieces (94 MiB: more than one call may carry)
# Then each device call: carry [".whl", ".gpu"] and start with `source benchmarks/gpu/setup.sh`. For tests
# with the bundled model's real weights, carry ".gguf_a" in one call and ".gguf_b" (without ".whl") in the next
# call on the same warm machine: setup.sh sources stage_bundled.sh, which joins them once both have arrived.
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
bash ../shared/device/wheels.sh
# ad-serve and serve_bench.py (served_8b.sh): the HTTP stack, which the GPU machine lacks too.
bash ../shared/device/wheels.sh fastapi starlette uvicorn httpx httpcore h11 anyio sniffio idna certifi click \
  annotated-doc opentelemetry-api
grep -qx '/.gpu/' .git/info/exclude || echo '/.gpu/' >> .git/info/exclude
mkdir -p .gpu/tok
dir=$(python -m uv run python -c "from ad_compiler.models.bundled import bundled_model_dir; print(bundled_model_dir())")
cp "$dir"/tokenizer.json "$dir"/tokenizer_config.json .gpu/tok/
cp "$dir"/*.jinja .gpu/tok/ 2>/dev/null || true
gguf=$(python -m uv run python -c "from ad_compiler.models.bundled import bundled_gguf_path; print(bundled_gguf_path())")
for d in .gguf_a .gguf_b; do grep -qx "/$d/" .git/info/exclude || echo "/$d/" >> .git/info/exclude; rm -rf $d; mkdir -p $d; done
# The first piece travels with the wheels and the tokenizer (about 30 MiB), so it is the smaller one.
head -c $((32 * 1024 * 1024)) "$gguf" > .gguf_a/piece_a
tail -c +$((32 * 1024 * 1024 + 1)) "$gguf" > .gguf_b/piece_b
sha256sum "$gguf" | cut -c1-64 > .gguf_a/sha256
du -sh .whl .gpu .gguf_a .gguf_b
