# Source on the GPU machine from the repo root: installs the carried wheels and puts our packages on the path.
# Prepare what it needs with benchmarks/gpu/prepare_carry.sh (here, before the call).
# A warm machine keeps /tmp/site from the last call: a call that carries no wheels reuses it.
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1 && [ ! -f /tmp/site/.installed ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
  touch /tmp/site/.installed
fi
[ -f /tmp/site/.installed ] || { echo "no wheels: carry .whl (this machine is fresh)"; return 1; }
export PYTHONPATH=/tmp/site:$(ls -d "$PWD"/packages/*/src | paste -sd:)
export AD_PLUGINS=ad_runtime  # the packages run from source here: no entry points, so name the compiler plugin
# This machine's Python keeps no bytecode for its packages: every process compiled torch's sources again (~10 s of
# each build on 2026-11-30, py-spy). A bytecode folder of our own gives later processes what any install has.
unset PYTHONDONTWRITEBYTECODE
export PYTHONPYCACHEPREFIX=/tmp/pycache
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" /tmp/gpumodels
[ -d /tmp/gpumodels/llama-3.1-8b ] || python3 benchmarks/gpu/make_models.py /tmp/gpumodels --tokenizer-from .gpu/tok >/dev/null
source benchmarks/gpu/stage_bundled.sh
nvidia-smi -L
