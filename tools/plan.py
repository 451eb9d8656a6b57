#!/usr/bin/env python
"""Layout planner (the `k2m-plan` console script): see k2mcore/cli/plan.py."""
import sys

from k2mcore.cli.plan import main

if __name__ == "__main__":
    sys.exit(main())
