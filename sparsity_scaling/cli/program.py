"""The `sparsity-scaling` program: its command families (train, evaluate, evaluate-run,
analyze, downstream, speedup, grid, data) under one parser, and `main`."""

from __future__ import annotations

from . import analyze, data, downstream, evaluate, grid, speedup, train
from .common import PROG, Parser, run


def build_parser() -> Parser:
    parser = Parser(prog=PROG, description="Measure and predict activation sparsity in LLMs.")
    commands = parser.add_subparsers(dest="command", required=True)
    for family in (data, train, evaluate, analyze, downstream, speedup, grid):
        family.add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), argv, interrupted="interrupted; rerun the same command to resume")
