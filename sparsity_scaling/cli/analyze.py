"""`sparsity-scaling analyze (frequency|tokens|dead|pareto|heatmap)`: activation patterns
under a sparsity setting, written as JSON and PNG and, with --mlflow-run, logged to an
MLflow run. Every analysis runs on `--tp` ranks (or under torchrun, tensor x data parallel)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..errors import SettingError, UserError
from ..evaluation.settings import METRICS
from ..rundir import RunDir
from .common import ErrorLine, mlflow_arguments, mlflow_publisher
from .evaluate import data_settings, measurement_arguments, metric_settings

ANALYSIS_METRICS = tuple(m for m in METRICS if m != "critical")  # an analysis needs one rule


def _text(args) -> str:
    if (args.text is None) == (args.text_file is None):
        raise UserError("analyze heatmap: give exactly one of --text and --text-file")
    if args.text is not None:
        return args.text
    try:
        return Path(args.text_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"--text-file {args.text_file}: cannot read ({error})") from None


def _p_values(text: str | None) -> tuple[float, ...]:
    from ..analysis.pareto import P_VALUES

    if text is None:
        return P_VALUES
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        values = ()
    if not values or not all(0 < p <= 100 for p in values):
        raise UserError(f"--p-values {text}: expected percentages in (0, 100] separated by commas, e.g. 0.5,1,2")
    return values


def _stabilised_metric(args):
    """--stabilised: the CETT that evaluate-run set for the run, at every checkpoint."""
    run = RunDir(args.run_dir)
    record = run.sparsity_record()
    if record is None or record.get("cett") is None:
        raise UserError(f"--stabilised: {run.sparsity} is missing; run evaluate-run first")
    return metric_settings(args, metric="cett", value=record["cett"])


def _job(args):
    """(the function every rank runs, its arguments after the settings, the metric setting)."""
    from ..analysis import dead, frequency, heatmap, models, pareto, tokens

    analysis = args.analysis
    if analysis == "dead":
        if not RunDir(args.run_dir).checkpoints():
            raise UserError(f"{args.run_dir}: no complete checkpoints")
        if not 0 < args.dead_below <= 1:
            raise SettingError("dead_below", args.dead_below, "must be a share of tokens in (0, 1]")
        if args.thresholds:
            raise UserError("analyze dead: --thresholds fit one checkpoint; use --metric or --stabilised")
        metric = _stabilised_metric(args) if args.stabilised else metric_settings(args)
        return dead.dead_on_rank, (args.run_dir, args.dead_below, args.stabilised), metric
    if analysis == "pareto":
        p_values = _p_values(args.p_values)
        specs = models.parse_models(args.models)
        return pareto.pareto_on_rank, (specs, p_values), metric_settings(args, metric="ppl-p")
    text = _text(args) if analysis == "heatmap" else None
    metric = None if args.thresholds else metric_settings(args)
    specs = models.parse_models(args.models if analysis != "heatmap" else [args.model], args.thresholds)
    if analysis == "frequency":
        return frequency.frequency_on_rank, (specs, args.bins), metric
    if analysis == "tokens":
        tokens.check_same_tokenizer({s.label: models.vocabulary(s) for s in specs})
        return tokens.tokens_on_rank, (specs, args.min_count, args.top), metric
    return heatmap.heatmap_on_rank, (specs[0], text, args.max_tokens), metric


def _analyze(args) -> None:
    from ..analysis.settings import AnalysisSettings, parse_datasets
    from ..ranks import on_ranks

    job, job_args, metric = _job(args)
    settings = AnalysisSettings(out=args.out, metric=metric, data=data_settings(args, args.tokens),
                                datasets=parse_datasets(args.data or (), args.tokens or ()), tp=args.tp)
    if args.analysis != "frequency":
        settings.single_dataset(args.analysis)
    with mlflow_publisher(args) as publish:
        on_ranks(args.tp, job, replace(settings, publish=publish), *job_args, report_error=ErrorLine())


def add_commands(commands) -> None:
    """The `analyze` command and its five analyses."""
    analyze = commands.add_parser("analyze", help="activation patterns under a sparsity setting")
    kinds = analyze.add_subparsers(dest="analysis", required=True)
    model_help = ("[LABEL=]PATH: a checkpoint, a run directory (its newest checkpoint), a local "
                  "Hugging Face model directory or a .gguf file")

    frequency = kinds.add_parser("frequency", help="per-neuron activation frequency, per layer and dataset")
    frequency.add_argument("models", nargs="+", metavar="MODEL", help=model_help)
    frequency.add_argument("--bins", type=int, default=50, help="histogram bins over [0, 1]")
    _data(frequency, many=True)

    tokens = kinds.add_parser("tokens", help="activation ratio of each vocabulary token; models compared")
    tokens.add_argument("models", nargs="+", metavar="MODEL", help=model_help + " (same tokenizer)")
    tokens.add_argument("--min-count", type=int, default=5, help="compare tokens seen at least this often")
    tokens.add_argument("--top", type=int, default=20, help="how many most-different tokens to list")
    _data(tokens)

    dead = kinds.add_parser("dead", help="share of dead neurons at every checkpoint of a run")
    dead.add_argument("run_dir", help="a run directory")
    dead.add_argument("--dead-below", type=float, default=0.001,
                      help="a neuron active on fewer than this share of tokens is dead (default 0.1%%)")
    dead.add_argument("--stabilised", action="store_true",
                      help=f"use the stabilised CETT of RUN/{RunDir.SPARSITY} at every checkpoint")
    _data(dead)

    heatmap = kinds.add_parser("heatmap", help="activation ratio by layer and token position for a text")
    heatmap.add_argument("model", metavar="MODEL", help=model_help)
    heatmap.add_argument("--text", help="the text to draw")
    heatmap.add_argument("--text-file", help="read the text from this file")
    heatmap.add_argument("--max-tokens", type=int, default=48, help="draw at most this many tokens")
    _data(heatmap)

    pareto = kinds.add_parser("pareto", help="PPL ratio against activation ratio for every sparsity method")
    pareto.add_argument("models", nargs="+", metavar="MODEL", help=model_help)
    pareto.add_argument("--p-values", help="PPL-p%% values to sweep, e.g. 0.5,1,2,4 (default 0.25 ... 8)")
    _data(pareto)

    for parser in (frequency, tokens, dead, heatmap, pareto):
        if parser is not pareto:
            _setting(parser)
        _common(parser)
        parser.set_defaults(run=_analyze)


def _data(parser, many: bool = False) -> None:
    what = "datasets, each " if many else ""
    parser.add_argument("--data", action="append", metavar="[NAME=]FILE",
                        help=f"{what}text: .txt or .jsonl (text field)" + (" (repeat for more)" if many else "")
                        + "; default: the run's validation split" + (" by kind (code, doc)" if many else ""))
    parser.add_argument("--tokens", action="append", metavar="[NAME=]FILE.npy",
                        help=f"{what}tokens: .npy int array (sequences, length)")


def _setting(parser) -> None:
    parser.add_argument("--metric", choices=ANALYSIS_METRICS, default="ppl-p",
                        help="what makes a neuron active (default: the model's PPL-p%% thresholds)")
    parser.add_argument("--p", type=float, default=1.0, help="PPL-p%%: allowed perplexity increase, percent")
    parser.add_argument("--value", type=float, help="the rule's parameter: CETT, k, eps or p")
    parser.add_argument("--site", choices=("intermediate", "gate", "up"), default="intermediate")
    parser.add_argument("--power", type=float, default=1.0, help="top-p: sum |a|**power")
    parser.add_argument("--thresholds", action="append", metavar="FILE",
                        help="saved per-neuron thresholds (evaluate --json), one per model")


def _common(parser) -> None:
    parser.add_argument("--out", default="analysis", help="directory for the JSON and PNG (default: analysis)")
    measurement_arguments(parser, out=False)
    mlflow_arguments(parser)
