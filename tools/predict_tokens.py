#!/usr/bin/env python3
"""Tokens needed to reach a target activation ratio: see `python tools/predict_tokens.py --help`."""

import sys

from sparsity_scaling.cli.laws import predict_main

if __name__ == "__main__":
    sys.exit(predict_main())
