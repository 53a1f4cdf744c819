"""Pull activation curves of a grid's runs out of MLflow into CSV, reference JSON or a plot.

    python tools/curves.py --experiment demo [--filter "tags.activation = 'relu'"] \
        [--metric activation_ratio] [--tracking-uri URI | --workdir runs/demo] --out curves.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from launcher.curves import query_curves, write_curves
from launcher.tracking import tracking
from sparsity_scaling.errors import UserError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="curves.py", description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", required=True, help="the grid's name (its MLflow experiment)")
    parser.add_argument("--filter", default="", help="an MLflow search filter, e.g. \"tags.activation = 'relu'\"")
    parser.add_argument("--metric", default="activation_ratio")
    parser.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else the workdir's local server")
    parser.add_argument("--workdir", help="the grid's workdir (default runs/EXPERIMENT)")
    parser.add_argument("--out", required=True, help="FILE.csv, FILE.json or FILE.png")
    args = parser.parse_args(argv)
    try:
        if args.tracking_uri:
            curves = query_curves(args.tracking_uri, args.experiment, args.filter, args.metric)
        else:
            workdir = Path(args.workdir or Path("runs") / args.experiment)
            if not (workdir / "mlflow").is_dir():
                raise UserError(f"no --tracking-uri and no local MLflow store under {workdir}")
            with tracking(workdir) as uri:
                curves = query_curves(uri, args.experiment, args.filter, args.metric)
        write_curves(curves, args.metric, args.out)
    except UserError as error:
        print(f"curves.py: error: {error}", file=sys.stderr)
        return 2
    print(f"{len(curves)} curves -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
