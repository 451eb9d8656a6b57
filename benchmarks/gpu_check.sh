#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py) on a machine with torch but without megatron-core or a
# network: the wheels prepared in .whl/ (`make gpu-wheels`, git-ignored, carried with the tree)
# are installed into a private folder first. Arguments go to gpu_check.py (--cpu, --out DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
site="${K2M_GPU_SITE:-${TMPDIR:-/tmp}/k2m-gpu-site}"
py="${PYTHON:-python3}"
if compgen -G ".whl/*.whl" >/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --target "$site" .whl/*.whl
fi
export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}"
exec "$py" benchmarks/gpu_check.py "$@"
