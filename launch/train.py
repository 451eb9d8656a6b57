"""torchrun entry point: `torchrun --nproc-per-node N launch/train.py --config ... [--set ...]`.

The same as the `k2m-train` console script; a file path is what torchrun and srun want, and the
__main__ guard is what spawn-mode checkpoint writer processes need.
"""
from k2mcore.cli.train import main

if __name__ == "__main__":
    raise SystemExit(main())
