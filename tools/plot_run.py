"""Plot a run: `python tools/plot_run.py runs/k2-tiny` (also the `k2m-plot` command)."""
from k2mcore.cli.plot import main

if __name__ == "__main__":
    raise SystemExit(main())
