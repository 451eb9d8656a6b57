#!/usr/bin/env bash
# Several ranks on this machine: launch/local.sh NPROC [k2m-train arguments...]
# (gloo on CPU, NCCL on GPUs; one thread per rank so ranks do not fight over cores).
set -euo pipefail
nproc=${1:?usage: launch/local.sh NPROC [k2m-train args...]}
shift
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec torchrun --standalone --nproc-per-node "$nproc" "$(dirname "$0")/train.py" "$@"
