#!/usr/bin/env bash
# Run the CUDA paths on a GPU machine (see docs/ARCHITECTURE.md, "CUDA paths").
# Expects the Debian .debs of libzstd-dev/libxxhash-dev/libzstd1 and wheels in .dev/
# (no network there); builds the native core against them and runs the CUDA tests
# plus benchmarks/gpu_check.py when present.
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p /tmp/dev && for f in .dev/*.deb; do dpkg -x "$f" /tmp/dev; done
python3 -m pip install -q --no-index --no-deps --target /tmp/site .dev/*.whl
export PYTHONPATH=$PWD:/tmp/site
export CPATH=/tmp/dev/usr/include LIBRARY_PATH=/tmp/dev/usr/lib/x86_64-linux-gnu
export LD_LIBRARY_PATH=/tmp/dev/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
python3 setup.py -q build_ext --inplace 2>&1 | grep -iE "error" ; ls dckpt/_native*.so
# Arguments replace the default test list, e.g. `scripts/gpu_check.sh tests/test_cuda.py`.
TESTS=("$@")
[ ${#TESTS[@]} -gt 0 ] || TESTS=(tests/test_cuda.py tests/test_cuda_dist.py tests/test_async_save.py
    tests/test_accelerate_cuda.py tests/test_native.py tests/test_checkpoint.py tests/test_resume.py)
python3 -m pytest -q -p no:cacheprovider -rs "${TESTS[@]}"
if [ -f benchmarks/gpu_check.py ]; then python3 benchmarks/gpu_check.py; fi
