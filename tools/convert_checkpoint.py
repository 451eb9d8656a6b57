#!/usr/bin/env python
"""Checkpoint conversion (the `k2m-convert` console script): see k2mcore/cli/convert.py."""
import sys

from k2mcore.cli.convert import main

if __name__ == "__main__":
    sys.exit(main())
