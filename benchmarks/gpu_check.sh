#!/usr/bin/env bash
# The GPU check (docs/BENCHMARKS.md "GPU check"): on a machine with CUDA torch, transformers and
# peft but no diffusers and no network, install the diffusers wheel carried in .whl/ and ddrl
# itself (no dependencies, into a private folder), then run benchmarks/gpu_check.py.
#   benchmarks/gpu_check.sh OUT [--budget-s 450] [--skip compile,...]
#   benchmarks/gpu_check.sh OUT --dry        # the same path at toy size on the CPU (CI)
set -euo pipefail
out=${1:?usage: benchmarks/gpu_check.sh OUT_DIR [--dry] [--budget-s S] [--skip CASES]}
shift
root=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}
if ! "$py" -c "import diffusers" 2>/dev/null; then
  site=${DDRL_SITE:-/tmp/ddrl-site}
  ls "$root"/.whl/diffusers-*.whl >/dev/null  # fails loudly when the wheel was not carried
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" "$root"/.whl/*.whl
  "$py" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir \
    --target "$site" "$root"
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
exec "$py" "$root/benchmarks/gpu_check.py" --out "$out" "$@"
