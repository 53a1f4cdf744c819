"""The law tools: tools/curves.py (curves out of a grid's MLflow experiment),
tools/fit_laws.py, tools/predict_tokens.py and tools/analyze_laws.py.

Every user mistake (bad file, field, argument, or data a law cannot be fitted to) ends in one
line `PROG: error: ...` on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import replace
from pathlib import Path

from ..files import json_text, write_json_atomic
from ..laws import tables, trends
from ..laws.curvefit import DEFAULT_WINDOW, LEVEL, N_BOOTSTRAP, Window, fit_curves
from ..laws.errors import LawError
from ..laws.fitted import read_fit_file
from ..laws.io import file_source
from ..laws.predict import check_target, predict_tokens
from ..laws.presets import PRESETS
from .common import Parser, positive_int, run


def _non_negative(text):
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, not {text}")
    return value


def _fraction(text):
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1), not {text}")
    return value


def _file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


# --- fit_laws.py -------------------------------------------------------------------------

def fit_parser() -> Parser:
    parser = Parser(
        prog="fit_laws.py",
        description="Fit the sparsing law of each model's activation-ratio curve, with bootstrap "
                    "intervals and the logarithmic and sigmoid alternatives on the same points.",
    )
    parser.add_argument("inputs", nargs="*", metavar="DIR|FILE",
                        help="JSON curves in the reference format (a directory of them, each file "
                             "one model named by its stem) or CSV (model,tokens,activation_ratio)")
    _mlflow_arguments(parser)
    parser.add_argument("--preset", choices=sorted(PRESETS),
                        help="the paper's published coefficients for its models, and fitting windows (published "
                             "for 1.2B, inferred from the coefficients for the others)")
    window = parser.add_mutually_exclusive_group()
    window.add_argument("--drop-first", type=int, metavar="K", help="drop the first K checkpoints")
    window.add_argument("--min-tokens", type=float, metavar="D",
                        help="drop checkpoints before D raw tokens (e.g. 5e9)")
    window.add_argument("--min-fraction", type=float, metavar="F",
                        help="drop checkpoints before this fraction of the run's last token count")
    parser.add_argument("--json", required=True, metavar="OUT", help="fit file to write")
    parser.add_argument("--plots", metavar="DIR", help="write one figure per model here")
    parser.add_argument("--bootstrap", type=positive_int, default=N_BOOTSTRAP, metavar="N",
                        help=f"bootstrap refits per model (default {N_BOOTSTRAP})")
    parser.add_argument("--level", type=_fraction, default=LEVEL,
                        help=f"interval coverage (default {LEVEL})")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.set_defaults(run=_fit)
    parser.epilog = (f"Without a window option: {replace(DEFAULT_WINDOW, label='').describe()}. A "
                     "preset's own windows apply to its models; a window option sets the others'.")
    return parser


def _mlflow_arguments(parser, required: bool = False) -> None:
    group = parser.add_argument_group("curves from MLflow (a grid's experiment)")
    group.add_argument("--experiment", metavar="NAME", required=required, help="the grid's MLflow experiment")
    group.add_argument("--filter", default="", help="MLflow search filter, e.g. \"tags.activation = 'relu'\"")
    group.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else the workdir's local MLflow")
    group.add_argument("--workdir", help="the grid's workdir (default runs/NAME)")


def _mlflow_tracking(args):
    """The tracking URI of --experiment: --tracking-uri, $MLFLOW_TRACKING_URI, or the grid
    workdir's local MLflow server (started for the command)."""
    from launcher.tracking import tracking
    from launcher.workdir import Workdir

    workdir = Workdir(args.workdir) if args.workdir else Workdir.default(args.experiment)
    return tracking(workdir, args.tracking_uri, create=False)


def _curves(inputs: list[str], args) -> dict:
    """Curves from the input files and, with --experiment, from MLflow."""
    if not inputs and not args.experiment:
        raise LawError("give input files or directories, or --experiment NAME")
    curves = file_source(inputs)() if inputs else {}
    if args.experiment:
        from launcher.queries import mlflow_curves

        with _mlflow_tracking(args) as uri:
            curves.update(mlflow_curves(uri, args.experiment, args.filter))
    return curves


def _window(args) -> Window:
    if args.drop_first is not None:
        return Window(drop_first=args.drop_first)
    if args.min_tokens is not None:
        return Window(min_tokens=args.min_tokens)
    if args.min_fraction is not None:
        return Window(min_fraction=args.min_fraction)
    return DEFAULT_WINDOW


def _table_order(fitted):
    """As in the paper: by law, then by model size (unknown sizes last), then by name."""
    return fitted.law.name, fitted.model_params or float("inf"), fitted.name


def _fit(args) -> None:
    curves = _curves(args.inputs, args)
    fits = fit_curves(curves, _window(args), PRESETS.get(args.preset), n_bootstrap=args.bootstrap,
                      level=args.level, seed=args.seed)
    fits = dict(sorted(fits.items(), key=lambda item: _table_order(item[1].fitted)))
    print("Coefficients (D in units of 1e9 tokens; relu: A = exp(-c D^alpha + b) + A0, "
          "silu: A = -c / D^alpha + A0)")
    print(tables.coefficient_table(fits))
    print("\nBootstrap intervals")
    print(tables.interval_table(fits))
    print("\nFit quality on the fitted points (dAIC: against the law)")
    print(tables.quality_table(fits))
    warnings = tables.warning_lines(fits)
    if warnings:
        print("\nWarnings\n" + warnings)
    write_json_atomic(args.json, {
        "preset": args.preset, "bootstrap_samples": args.bootstrap, "level": args.level,
        "seed": args.seed, "models": {name: result.to_json() for name, result in fits.items()},
    })
    if args.plots:
        from ..figures import save_figure
        from ..laws import plots  # matplotlib only when figures are asked for

        for name, result in fits.items():
            save_figure(plots.fit_figure(result), Path(args.plots) / f"{_file_name(name)}.png")


def fit_main(argv=None) -> int:
    return run(fit_parser(), argv)


# --- predict_tokens.py -------------------------------------------------------------------

def predict_parser() -> Parser:
    parser = Parser(
        prog="predict_tokens.py",
        description="Tokens each model needs before its activation ratio reaches a target "
                    "(ReLU: falls below it; SiLU: rises above it), from a fit file.",
    )
    parser.add_argument("--target", type=float, required=True, help="activation ratio in (0, 1)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--law", metavar="FIT.json", help="written by fit_laws.py")
    source.add_argument("--experiment", metavar="NAME", help="fit the curves of a grid's MLflow runs first")
    parser.add_argument("--filter", default="", help="with --experiment: MLflow search filter")
    parser.add_argument("--tracking-uri", help="with --experiment: default $MLFLOW_TRACKING_URI or the workdir's")
    parser.add_argument("--workdir", help="with --experiment: the grid's workdir (default runs/NAME)")
    parser.add_argument("--model", metavar="NAME", help="only this model")
    parser.add_argument("--json", nargs="?", const="-", metavar="OUT",
                        help="write JSON (to OUT, or stdout without it) instead of the table")
    parser.set_defaults(run=_predict)
    return parser


def _predict(args) -> None:
    target = check_target(args.target)
    if args.law:
        source, found = args.law, read_fit_file(args.law)
    else:  # curves, fitted once the model is chosen
        source, found = f"experiment {args.experiment}", _curves([], args)
    if args.model is not None:
        if args.model not in found:
            raise LawError(f"{source}: no model {args.model!r} (models: {', '.join(found)})")
        found = {args.model: found[args.model]}
    laws = found if args.law else {name: result.fitted for name, result in fit_curves(found, DEFAULT_WINDOW).items()}
    predictions = [predict_tokens(fitted, target)
                   for fitted in sorted(laws.values(), key=_table_order)]
    if args.json is None:
        print(f"Tokens until the activation ratio reaches {target:g}")
        print(tables.prediction_table(predictions))
        return
    data = {"target": target, "models": {p.name: p.to_json() for p in predictions}}
    if args.json == "-":
        print(json_text(data), end="")
    else:
        write_json_atomic(args.json, data)


def predict_main(argv=None) -> int:
    return run(predict_parser(), argv)


# --- analyze_laws.py ---------------------------------------------------------------------

def analyze_parser() -> Parser:
    parser = Parser(
        prog="analyze_laws.py",
        description="Limit activation ratio against width-depth ratio (bottleneck, best-loss "
                    "ratios) and parameter scale, and convergence speed against data-to-parameter "
                    "ratio, from a fit file.",
    )
    parser.add_argument("fit", metavar="FIT.json", help="written by fit_laws.py")
    parser.add_argument("--plots", metavar="DIR", help="write one figure per analysis here")
    parser.add_argument("--json", metavar="OUT", help="write the tables as JSON")
    parser.add_argument("--ratios", default=",".join(map(str, trends.DEFAULT_RATIOS)),
                        help="data-to-parameter ratios for the convergence table (comma-separated)")
    parser.add_argument("--loss-tolerance", type=_non_negative, default=trends.LOSS_TOLERANCE,
                        help="relative loss margin of the best width-depth ratios (default 0.005)")
    parser.set_defaults(run=_analyze)
    return parser


def _analyze(args) -> None:
    try:
        ratios = [float(r) for r in args.ratios.split(",")]
    except ValueError:
        raise LawError(f"--ratios: not a comma-separated list of numbers: {args.ratios!r}") from None
    if any(r <= 0 for r in ratios):
        raise LawError(f"--ratios: data-to-parameter ratios must be positive: {args.ratios!r}")
    laws = list(read_fit_file(args.fit).values())
    sections = {
        "width_depth": lambda: trends.width_depth_analysis(laws, args.loss_tolerance),
        "scale": lambda: trends.scale_analysis(laws),
        "convergence": lambda: trends.convergence_analysis(laws, ratios),
    }
    results, output = {}, {}
    for name, compute in sections.items():
        try:
            results[name] = compute()
        except LawError as error:  # the fit file lacks what this analysis needs
            output[name] = {"skipped": str(error)}
            print(f"{error}: skipped\n")
    reports = {"width_depth": tables.width_depth_report, "scale": tables.scale_report,
               "convergence": tables.convergence_report}
    for name, result in results.items():
        text, output[name] = reports[name](result)
        print(text + "\n")
    if args.json:
        write_json_atomic(args.json, output)
    if args.plots:
        from ..figures import save_figure
        from ..laws import plots  # matplotlib only when figures are asked for

        figures = {"width_depth": plots.width_depth_figure, "scale": plots.scale_figure,
                   "convergence": lambda result: plots.convergence_figure(result, laws)}
        for name, result in results.items():
            save_figure(figures[name](result), Path(args.plots) / f"{name}.png")


def analyze_main(argv=None) -> int:
    return run(analyze_parser(), argv)


# --- curves.py -------------------------------------------------------------------------------

def curves_parser() -> Parser:
    parser = Parser(prog="curves.py", description="Pull activation curves of a grid's runs out of MLflow "
                                                 "into CSV, reference-format JSON or a plot.")
    _mlflow_arguments(parser, required=True)
    parser.add_argument("--metric", default="activation_ratio")
    parser.add_argument("--out", required=True, help="FILE.csv, FILE.json or FILE.png")
    parser.set_defaults(run=_write_curves)
    return parser


def _write_curves(args) -> None:
    from launcher.queries import query_curves, write_curves

    with _mlflow_tracking(args) as uri:
        curves = query_curves(uri, args.experiment, args.filter, args.metric)
    write_curves(curves, args.metric, args.out)
    print(f"{len(curves)} curves -> {args.out}")


def curves_main(argv=None) -> int:
    return run(curves_parser(), argv)
