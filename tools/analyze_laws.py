#!/usr/bin/env python3
"""Width-depth, scale and convergence analyses of fitted laws: see `python tools/analyze_laws.py --help`."""

import sys

from sparsity_scaling.cli.laws import analyze_main

if __name__ == "__main__":
    sys.exit(analyze_main())
