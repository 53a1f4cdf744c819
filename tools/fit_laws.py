#!/usr/bin/env python3
"""Fit the sparsing law of activation-ratio curves: see `python tools/fit_laws.py --help`."""

import sys

from sparsity_scaling.cli.laws import fit_main

if __name__ == "__main__":
    sys.exit(fit_main())
