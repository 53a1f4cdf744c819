"""`sparsity-scaling analyze (frequency|tokens|dead|pareto|heatmap)`: activation patterns
under a sparsity setting, written as JSON and PNG (atomically) and, with --mlflow-run,
logged to an MLflow run as artifacts.

Every analysis runs on `--tp` tensor-parallel ranks (or under torchrun, tensor x data
parallel), with rank 0 writing the files.
"""

from __future__ import annotations

import json
import os
import sys
import time
from argparse import Namespace
from pathlib import Path

import torch.distributed as dist

from ..errors import UserError
from ..figures import save_figure
from ..files import write_text_atomic
from ..parallel import init_parallel
from .models import ModelSpec, describe, first_dataset, parse_models

METRICS = ("ppl-p", "cett", "relu", "topk", "fat", "top-p", "max-p")


# ---------------------------------------------------------------- shared pieces


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _say(message: str) -> None:
    if _rank0():
        print(message, file=sys.stderr, flush=True)


def _write(args: Namespace, name: str, record: dict, figure, metrics: list[tuple[str, float, int]] = ()) -> None:
    """OUT/NAME.json and OUT/NAME.png, then the same to the MLflow run if one was given."""
    from ..laws.io import json_text

    out = Path(args.out)
    json_path, png_path = out / f"{name}.json", out / f"{name}.png"
    write_text_atomic(json_path, json_text(record))
    save_figure(figure, png_path)
    print(f"wrote {json_path} and {png_path}")
    if args.mlflow:
        uri, run_id = args.mlflow
        _log_to_mlflow(uri, run_id, [json_path, png_path], metrics)
        print(f"logged to MLflow run {run_id} at {uri}")


def _mlflow_target(args: Namespace) -> tuple[str, str] | None:
    """(tracking URI, run id) of --mlflow-run RUN_DIR_OR_ID, checked before any work."""
    if not args.mlflow_run:
        return None
    from launcher.tracking import check_tracking_uri, client

    path = Path(args.mlflow_run)
    if path.is_dir():
        id_file = path / "mlflow_run.json"
        if not id_file.is_file():
            raise UserError(f"--mlflow-run {path}: a directory without mlflow_run.json (not a grid's run directory)")
        identity = json.loads(id_file.read_text())
        run_id, uri = identity["run_id"], args.tracking_uri or identity.get("tracking_uri")
    else:
        run_id, uri = args.mlflow_run, args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise UserError(f"--mlflow-run {run_id}: give --tracking-uri (or set MLFLOW_TRACKING_URI)")
    check_tracking_uri(uri)
    try:
        client(uri).get_run(run_id)
    except Exception as error:  # MLflow raises several types for an unknown run
        raise UserError(f"--mlflow-run {run_id}: no such run at {uri} ({str(error).splitlines()[0][:120]})") from None
    return uri, run_id


def _log_to_mlflow(uri: str, run_id: str, paths: list[Path], metrics) -> None:
    from mlflow.entities import Metric

    from launcher.tracking import client

    mlflow = client(uri)
    for path in paths:
        mlflow.log_artifact(run_id, str(path), artifact_path="analysis")
    if metrics:
        now = int(time.time() * 1000)
        mlflow.log_batch(run_id, metrics=[Metric(key, float(value), now, int(step)) for key, value, step in metrics])


def _single_dataset(args: Namespace) -> None:
    from .models import named_datasets

    if len(named_datasets(args)) > 1:
        raise UserError(f"analyze {args.analysis}: give one dataset (--data FILE or --tokens FILE.npy)")


def _model_and_rule(args: Namespace, spec: ModelSpec):
    """(model, rule, setting record): the model loaded at --tp and the rule that decides
    which of its neurons are active (found by the evaluator unless given)."""
    from .models import load_model, sparsity_setting

    target = load_model(spec, args.tp)
    _say(f"{spec.label}: setting the sparsity rule ({'thresholds' if spec.thresholds else args.metric})")
    rule, setting = sparsity_setting(args, spec, target)
    return target, rule, setting


def _one_dataset(args: Namespace, spec: ModelSpec):
    """The --data / --tokens dataset (or a checkpoint's validation split) as `evaluate` loads it."""
    from ..evaluate import load_eval_data

    return load_eval_data(spec.args(args, **first_dataset(args)))


# ---------------------------------------------------------------- the analyses


def _frequency_on_rank(args: Namespace) -> None:
    from .activity import measure_activity
    from .frequency import frequency_figure, frequency_report
    from .models import load_datasets

    init_parallel(args.tp)
    results, settings = {}, {}
    for spec in args.specs:
        datasets = load_datasets(args, spec)
        target, rule, settings[spec.label] = _model_and_rule(args, spec)
        results[spec.label] = {name: measure_activity(target, data, rule, f"{spec.label}: {name}")
                               for name, data in datasets.items()}
    if _rank0():
        report = {"settings": settings, **frequency_report(results, args.bins)}
        _write(args, "frequency", report, frequency_figure(report, _setting_text(args)))


def _tokens_on_rank(args: Namespace) -> None:
    from .activity import measure_activity
    from .models import vocabulary
    from .tokens import token_report, tokens_figure

    init_parallel(args.tp)
    results, settings = {}, {}
    for spec in args.specs:
        data = _one_dataset(args, spec)
        target, rule, settings[spec.label] = _model_and_rule(args, spec)
        results[spec.label] = measure_activity(target, data, rule, spec.label)
    if _rank0():
        report = {"settings": settings, **token_report(results, vocabulary(args.specs[0]), args.min_count, args.top)}
        _write(args, "tokens", report, tokens_figure(report))


def _dead_on_rank(args: Namespace) -> None:
    from ..train.checkpoint import list_checkpoints
    from .activity import measure_activity
    from .dead import dead_figure, dead_point, run_curve

    init_parallel(args.tp)
    run_dir = Path(args.run_dir)
    points = []
    for ck in list_checkpoints(run_dir):
        spec = ModelSpec(ck.path.name, checkpoint=str(ck.path), train_tokens=ck.tokens)
        data = _one_dataset(args, spec)
        target, rule, setting = _model_and_rule(args, spec)
        activity = measure_activity(target, data, rule, ck.path.name)
        point = {"checkpoint": ck.path.name, "tokens": ck.tokens, "step": ck.step,
                 **dead_point(activity, args.dead_below), "setting": setting}
        points.append(point)
        _say(f"{ck.path.name}: dead neurons {point['dead_neuron_ratio']:.4f}, "
             f"activation ratio {point['activation_ratio']:.4f}")
    if _rank0():
        text = f"PPL-{args.p:g}% of each checkpoint" if args.metric == "ppl-p" else _setting_text(args)
        report = {"run": run_dir.name, "run_dir": str(run_dir), "dead_below": args.dead_below,
                  "setting_text": text, "checkpoints": points, "run_curve": run_curve(run_dir)}
        metrics = [("dead_neuron_ratio", p["dead_neuron_ratio"], p["tokens"]) for p in points]
        _write(args, "dead", report, dead_figure(report), metrics)


def _heatmap_on_rank(args: Namespace) -> None:
    from ..metrics.measure import EvalData
    from .activity import measure_activity
    from .heatmap import heatmap_figure
    from .models import text_sequence, vocabulary

    init_parallel(args.tp)
    spec = args.specs[0]
    vocab = vocabulary(spec)
    sequence = text_sequence(vocab, args.text, args.max_tokens)
    target, rule, setting = _model_and_rule(args, spec)
    activity = measure_activity(target, EvalData(sequence, 1), rule, "text")
    ratios = activity.position_ratios()
    ids = sequence[0, :-1].tolist()
    tokens = [vocab.text(i) for i in ids]
    if _rank0():
        report = {"model": spec.label, "setting": setting, "text": args.text, "ids": ids, "tokens": tokens,
                  "layer_position_ratios": ratios.tolist(), "activation_ratio": activity.activation_ratio}
        title = f"{spec.label}: activation ratio by layer and token under {describe(setting)}"
        _write(args, "heatmap", report, heatmap_figure(ratios, tokens, title))


def _pareto_on_rank(args: Namespace) -> None:
    from ..evaluate import activation_of, load_evaluator
    from .pareto import pareto_points, pareto_table, write_pareto

    init_parallel(args.tp)
    curves = {}
    for spec in args.specs:
        model_args = spec.args(args, **first_dataset(args))
        _say(f"{spec.label}: dense pass")
        evaluator = load_evaluator(model_args)
        report = lambda row, label=spec.label: _say(  # noqa: E731
            f"{label}: {row['method']} {row['param']}: activation ratio {row['activation_ratio']:.4f}, "
            f"PPL ratio {row['ppl_ratio']:.4f}")
        curves[spec.label] = pareto_points(evaluator, activation_of(model_args, evaluator.target),
                                           p_values=args.p_values, on_point=report)
    if _rank0():
        from ..laws.report import table

        out = Path(args.out)
        write_pareto(curves, out / "pareto.json", out / "pareto.png")
        for label, rows in curves.items():
            print(f"\n{label}\n" + table(["method", "setting", "activation ratio", "PPL ratio"], pareto_table(rows)))
        print(f"wrote {out / 'pareto.json'} and {out / 'pareto.png'}")
        if args.mlflow:
            _log_to_mlflow(*args.mlflow, [out / "pareto.json", out / "pareto.png"], ())


def _setting_text(args: Namespace) -> str:
    if args.thresholds:
        return "saved thresholds"
    if args.metric == "ppl-p":
        return f"PPL-{args.p:g}% thresholds of each model"
    if args.metric == "cett":
        return f"{'stabilised ' if getattr(args, 'stabilised', False) else ''}CETT {args.value:.4g}"
    value = "" if args.value is None else f" {args.value:g}"
    return f"{args.metric}{value} ({args.site})"


# ---------------------------------------------------------------- entry


RANK_FUNCTIONS = {"frequency": _frequency_on_rank, "tokens": _tokens_on_rank, "dead": _dead_on_rank,
                  "heatmap": _heatmap_on_rank, "pareto": _pareto_on_rank}


def _check(args: Namespace) -> None:
    """Everything that can be checked before ranks start and models load."""
    from ..metrics.search import check_p
    from .models import named_datasets

    if args.metric == "ppl-p":
        check_p(args.p)
    if args.metric != "ppl-p" and args.metric != "relu" and args.value is None and not args.thresholds:
        raise UserError(f"--metric {args.metric} needs --value")
    if args.tp < 1:
        raise UserError("--tp must be at least 1")
    named_datasets(args)


def analyze_command(args: Namespace) -> None:
    from ..launch import on_ranks

    analysis = args.analysis
    if analysis == "dead":
        _prepare_dead(args)
        args.models = []
    elif analysis == "heatmap":
        args.models = [args.model]
        args.text = _text(args)
    if analysis != "frequency":
        _single_dataset(args)
    if analysis == "pareto":
        args.metric = "ppl-p"
        args.p_values = _p_values(args.p_values)
    _check(args)
    args.specs = parse_models(args.models, args.thresholds)
    if analysis == "tokens":
        from .models import vocabulary
        from .tokens import check_same_tokenizer

        check_same_tokenizer({s.label: vocabulary(s) for s in args.specs})
    with _grid_tracking(args):
        args.mlflow = _mlflow_target(args)
        on_ranks(args.tp, RANK_FUNCTIONS[analysis], args)


def _grid_tracking(args: Namespace):
    """For --mlflow-run GRID_WORKDIR/runs/RUN without a tracking URI: the grid's local MLflow
    server, started for the command (on the port its runs recorded) and stopped after it."""
    from contextlib import nullcontext

    workdir = Path(args.mlflow_run or "").resolve().parent.parent
    if (not args.mlflow_run or args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
            or not (workdir / "mlflow" / "mlflow.db").is_file()):
        return nullcontext()
    from launcher.tracking import tracking

    return tracking(workdir)


def _prepare_dead(args: Namespace) -> None:
    from ..train.checkpoint import list_checkpoints
    from .dead import run_curve

    if not list_checkpoints(args.run_dir):
        raise UserError(f"{args.run_dir}: no complete checkpoints")
    if not 0 < args.dead_below <= 1:
        raise UserError(f"--dead-below {args.dead_below}: must be a share of tokens in (0, 1]")
    if args.thresholds:
        raise UserError("analyze dead: --thresholds fit one checkpoint; use --metric or --stabilised")
    if args.stabilised:
        curve = run_curve(args.run_dir)
        if curve is None or curve["cett"] is None:
            raise UserError(f"--stabilised: {args.run_dir}/sparsity.json is missing; run evaluate-run first")
        args.metric, args.value = "cett", curve["cett"]


def _text(args: Namespace) -> str:
    if (args.text is None) == (args.text_file is None):
        raise UserError("analyze heatmap: give exactly one of --text and --text-file")
    if args.text is not None:
        return args.text
    try:
        return Path(args.text_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"--text-file {args.text_file}: cannot read ({error})") from None


def _p_values(text: str | None) -> tuple[float, ...]:
    from .pareto import P_VALUES

    if text is None:
        return P_VALUES
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        values = ()
    if not values or not all(0 < p <= 100 for p in values):
        raise UserError(f"--p-values {text}: expected percentages in (0, 100] separated by commas, e.g. 0.5,1,2")
    return values


# ---------------------------------------------------------------- arguments


def add_arguments(commands) -> None:
    """The `analyze` command and its five analyses."""
    analyze = commands.add_parser("analyze", help="activation patterns under a sparsity setting")
    kinds = analyze.add_subparsers(dest="analysis", required=True)
    model_help = ("[LABEL=]DIR: a checkpoint, a run directory (its newest checkpoint) or a local "
                  "Hugging Face model")

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
                      help="use the stabilised CETT of RUN/sparsity.json at every checkpoint")
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
        else:
            parser.set_defaults(thresholds=None, metric="ppl-p", p=1.0, value=None, site="intermediate", power=1.0)
        _common(parser)
        parser.set_defaults(run=analyze_command)


def _data(parser, many: bool = False) -> None:
    what = "datasets, each " if many else ""
    parser.add_argument("--data", action="append", metavar="[NAME=]FILE",
                        help=f"{what}text: .txt or .jsonl (text field)" + (" (repeat for more)" if many else "")
                        + "; default: the run's validation split" + (" by kind (code, doc)" if many else ""))
    parser.add_argument("--tokens", action="append", metavar="[NAME=]FILE.npy",
                        help=f"{what}tokens: .npy int array (sequences, length)")


def _setting(parser) -> None:
    parser.add_argument("--metric", choices=METRICS, default="ppl-p",
                        help="what makes a neuron active (default: the model's PPL-p%% thresholds)")
    parser.add_argument("--p", type=float, default=1.0, help="PPL-p%%: allowed perplexity increase, percent")
    parser.add_argument("--value", type=float, help="the rule's parameter: CETT, k, eps or p")
    parser.add_argument("--site", choices=("intermediate", "gate", "up"), default="intermediate")
    parser.add_argument("--power", type=float, default=1.0, help="top-p: sum |a|**power")
    parser.add_argument("--thresholds", action="append", metavar="FILE",
                        help="saved per-neuron thresholds (evaluate --json), one per model")


def _common(parser) -> None:
    parser.add_argument("--out", default="analysis", help="directory for the JSON and PNG (default: analysis)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks to start")
    parser.add_argument("--eval-tokens", type=int, default=65536, help="tokens to use per dataset")
    parser.add_argument("--seq-len", type=int, help="sequence length (default: the run's; 512 for HF models)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--calibration-tokens", type=int, default=8192,
                        help="dense activations kept per rank for the threshold search")
    parser.add_argument("--mlflow-run", metavar="RUN_DIR_OR_ID",
                        help="also log the results to this MLflow run (a grid's run directory or a run id)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: the run directory's, or $MLFLOW_TRACKING_URI)")
