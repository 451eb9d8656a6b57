"""torchrun entry point: `torchrun --nproc-per-node N launch/train.py --config ... [--set ...]`.

The same as the `k2m-train` console script; a file path is what torchrun and srun want. The
__main__ guard keeps worker processes started with "spawn" (DALI's data workers once CUDA is
initialized) from running training again when they import this file.
"""
from k2mcore.cli.train import main

if __name__ == "__main__":
    raise SystemExit(main())
