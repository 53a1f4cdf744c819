"""`sparsity-scaling evaluate` (one model) and `evaluate-run` (every checkpoint of a run)."""

from __future__ import annotations

from ..errors import SettingError, UserError
from ..evaluation.settings import CRITICAL_RULES, METRICS, THRESHOLD_METRICS, DataSettings, MetricSettings
from ..metrics import SITES
from .common import ErrorLine, mlflow_arguments, mlflow_publisher, positive_int


def data_settings(args, tokens: str | None = None) -> DataSettings:
    """--data (where the command has it), the token file `tokens`, --eval-tokens, --seq-len,
    --batch-size. A token file fixes the validation tokens and their length, so --eval-tokens
    and --seq-len beside it are refused rather than ignored."""
    if tokens:
        for name in ("eval_tokens", "seq_len"):
            if getattr(args, name) is not None:
                raise SettingError(name, getattr(args, name), "a token file gives the validation tokens and their "
                                   "length as they are; use it only with --data or a run's validation split")
    eval_tokens = DataSettings.eval_tokens if args.eval_tokens is None else args.eval_tokens
    return DataSettings(text_file=getattr(args, "data", None), tokens=tokens, eval_tokens=eval_tokens,
                        seq_len=args.seq_len, batch_size=args.batch_size)


def metric_settings(args, **fixed) -> MetricSettings:
    """The metric flags the command has (the rest at their defaults), and `fixed` values."""
    given = {name: getattr(args, name) for name in ("metric", "p", "value", "site", "power", "rule", "tolerance",
                                                     "calibration_tokens") if hasattr(args, name)}
    return MetricSettings(**{**given, **fixed})


def _evaluate(args) -> None:
    from ..evaluation.inputs import ModelRef
    from ..evaluation.jobs import evaluate_model
    from ..ranks import on_ranks

    if (args.checkpoint is None) == (args.hf_model is None):
        raise UserError("give exactly one of --checkpoint DIR and --hf-model DIR_OR_GGUF")
    model = ModelRef(args.checkpoint, args.hf_model)
    metric, data = metric_settings(args), data_settings(args, args.tokens)
    if args.thresholds and metric.metric not in THRESHOLD_METRICS:
        raise SettingError("thresholds", args.thresholds, f"metric {metric.metric} has no per-neuron thresholds; "
                           f"{' and '.join(THRESHOLD_METRICS)} do")
    if args.checkpoint:
        model.read_checkpoint()  # a clear error before any rank starts
    on_ranks(args.tp, evaluate_model, model, metric, data, args.tp, args.json, args.thresholds,
             report_error=ErrorLine())


def _evaluate_run(args) -> None:
    from ..evaluation.jobs import evaluate_run
    from ..ranks import on_ranks

    on_ranks(args.tp, evaluate_run, args.run_dir, metric_settings(args), data_settings(args), args.last, args.tp,
             args.json, report_error=ErrorLine())


def _evaluate_series(args) -> None:
    from ..evaluation.jobs import evaluate_series, write_series
    from ..evaluation.series import series_members
    from ..ranks import on_ranks

    if args.mlflow_run and not args.out:
        raise UserError("--mlflow-run logs the trajectory file: give --out too")
    if args.address and not args.out:
        raise UserError("--address runs the series as cluster jobs, whose result is a file: give --out too")
    if args.cpus <= 0:
        raise SettingError("cpus", args.cpus, "must be positive")
    if args.gpus < 0:
        raise SettingError("gpus", args.gpus, "must be at least 0")
    members = series_members(args.models, args.tokens, args.tokens_per_step, args.last)
    metric, data = metric_settings(args), data_settings(args, args.token_file)
    with mlflow_publisher(args, folder="series") as publish:
        if not args.address:
            on_ranks(args.tp, evaluate_series, members, metric, data, args.last, args.tp, args.out, publish,
                     report_error=ErrorLine())
            return
        from launcher.grid import Evaluation
        from launcher.series import evaluate_series_on_ray

        ranks = Evaluation(tp=args.tp, cpus=args.cpus, gpus=args.gpus)
        record = evaluate_series_on_ray(members, metric, data, args.last, ranks, args.address, f"{args.out}.log")
        write_series(record, len(members), args.out, publish)


def add_commands(commands) -> None:
    ev = commands.add_parser("evaluate", help="measure activation sparsity of one model")
    ev.add_argument("--checkpoint", help="a checkpoint directory of ours")
    ev.add_argument("--hf-model", help="a local Hugging Face causal LM directory, or a .gguf file")
    ev.add_argument("--metric", choices=METRICS, default="ppl-p")
    ev.add_argument("--p", type=float, default=1.0, help="PPL-p%%: allowed perplexity increase, percent")
    ev.add_argument("--value", type=float, help="the rule's parameter: CETT, k, eps or p")
    ev.add_argument("--site", choices=SITES, default="intermediate",
                    help="where topk, fat, top-p, max-p and critical (but its cett rule) read scores")
    ev.add_argument("--power", type=float, default=1.0, help="top-p: sum |a|**power")
    ev.add_argument("--rule", choices=CRITICAL_RULES, default="top-p",
                    help="critical: the rule whose critical sparsity is searched")
    ev.add_argument("--tolerance", type=float, default=1.0, help="critical: PPL increase allowed, percent")
    ev.add_argument("--thresholds", help="where to write per-neuron thresholds (ppl-p, cett; default: beside --json)")
    measurement_arguments(ev)
    ev.add_argument("--data", help="validation text: .txt or .jsonl (text field)")
    ev.add_argument("--tokens", help="validation tokens: .npy int array (sequences, length)")
    ev.set_defaults(run=_evaluate)

    run = commands.add_parser("evaluate-run", help="stabilised PPL-p%% over all checkpoints of a run")
    run.add_argument("run_dir")
    run.add_argument("--p", type=float, default=1.0)
    run.add_argument("--last", type=int, default=5, help="checkpoints whose mean PPL ratio sets the CETT")
    measurement_arguments(run)
    run.set_defaults(run=_evaluate_run)

    series = commands.add_parser("evaluate-series", help="stabilised PPL-p%% over an existing checkpoint series "
                                                         "(ours, Hugging Face directories or GGUF files)")
    series.add_argument("models", nargs="+", metavar="DIR",
                        help="checkpoints of one model's training (ours, Hugging Face directories or .gguf files), "
                             "any order")
    series.add_argument("--tokens", type=float, nargs="+", metavar="N",
                        help="tokens each DIR was trained on, in the order given")
    series.add_argument("--tokens-per-step", type=float, metavar="S",
                        help="tokens per step; each DIR's step is read from its name (step1000, checkpoint-1000)")
    series.add_argument("--p", type=float, default=1.0)
    series.add_argument("--last", type=int, default=5, help="models whose mean PPL ratio sets the CETT")
    series.add_argument("--out", help="the trajectory (token_passed, activation_ratio, details) as JSON")
    series.add_argument("--data", help="validation text: .txt or .jsonl (text field)")
    series.add_argument("--token-file", help="validation tokens: .npy int array (sequences, length)")
    series.add_argument("--address", help="run the evaluation as jobs on this Ray cluster (`local`: a local Ray): "
                        "the CETT search, then every model at once as the cluster holds them; needs --out, "
                        "the ranks' output goes to OUT.log")
    series.add_argument("--cpus", type=float, default=1, help="with --address: CPUs of each rank")
    series.add_argument("--gpus", type=float, default=0, help="with --address: GPUs of each rank")
    measurement_arguments(series, out=False)
    mlflow_arguments(series)
    series.set_defaults(run=_evaluate_series)


def measurement_arguments(parser, out: bool = True, tp: bool = True) -> None:
    """--tp, --json and the sizes of a measurement's data."""
    if tp:
        parser.add_argument("--tp", type=positive_int, default=1, help="tensor-parallel ranks to start")
    if out:
        parser.add_argument("--json", help="write the result here (atomically)")
    parser.add_argument("--eval-tokens", type=int,
                        help=f"validation tokens to use (default {DataSettings.eval_tokens}; not with a token file)")
    parser.add_argument("--seq-len", type=int,
                        help="validation sequence length (default: the run's; not with a token file)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--calibration-tokens", type=int, default=8192,
                        help="dense activations kept per rank for threshold calibration")
