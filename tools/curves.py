#!/usr/bin/env python3
"""Activation curves of a grid's runs out of MLflow into CSV, JSON or a plot: see `python tools/curves.py --help`.

    python tools/curves.py --experiment demo [--filter "tags.activation = 'relu'"] \
        [--metric activation_ratio] [--tracking-uri URI | --workdir runs/demo] --out curves.png
"""

import sys

from sparsity_scaling.cli.laws import curves_main

if __name__ == "__main__":
    sys.exit(curves_main())
