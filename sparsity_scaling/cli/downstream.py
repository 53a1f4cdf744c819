"""`sparsity-scaling downstream`: lm-eval tasks scored dense and at a sparsity setting."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UserError
from .analyze import ANALYSIS_METRICS
from .common import ErrorLine, mlflow_arguments, mlflow_publisher
from .evaluate import data_settings, measurement_arguments, metric_settings

SMOKE_HINT = "sparsity_smoke (the suite's own offline smoke tasks)"


def _downstream(args) -> None:
    from ..downstream.tasks import go_offline

    go_offline()  # before Hugging Face libraries are imported
    from ..analysis.models import parse_models
    from ..analysis.settings import AnalysisSettings, parse_datasets
    from ..config import DataConfig
    from ..data.pipeline import cache_root
    from ..downstream.compare import DownstreamSettings, run_downstream
    from ..ranks import on_ranks

    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    settings = DownstreamSettings(tasks, tuple(args.include_path or ()), args.limit, args.num_fewshot,
                                  str(cache_root(DataConfig())))
    if args.thresholds and args.metric_given:
        raise UserError("give either --thresholds or a --metric, not both")
    spec = parse_models([args.model], [args.thresholds] if args.thresholds else None)[0]
    analysis = AnalysisSettings(out=str(Path(args.json).parent) if args.json else ".",
                                metric=None if args.thresholds else metric_settings(args),
                                data=data_settings(args, args.tokens),
                                datasets=parse_datasets([args.data] if args.data else (),
                                                        [args.tokens] if args.tokens else ()))
    with mlflow_publisher(args, folder="downstream") as publish:
        on_ranks(1, run_downstream, spec, analysis, settings, args.json, publish, report_error=ErrorLine())


class _Given(argparse.Action):
    """Stores the value and notes that a metric flag was given (to refuse it with --thresholds)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.metric_given = True


def add_commands(commands) -> None:
    down = commands.add_parser("downstream", help="lm-eval tasks dense and at a sparsity setting, compared")
    down.add_argument("model", metavar="MODEL",
                      help="a checkpoint, a run directory (its newest checkpoint) or a local Hugging Face model")
    down.add_argument("--tasks", required=True,
                      help=f"lm-eval task or group names, comma-separated; e.g. {SMOKE_HINT}")
    down.add_argument("--include-path", action="append", metavar="DIR",
                      help="a directory of task YAML files (their data local); repeat for more")
    down.add_argument("--limit", type=int, help="examples per task (default: all)")
    down.add_argument("--num-fewshot", type=int, help="few-shot examples (default: each task's own)")
    down.add_argument("--json", help="write the table here (and a PNG beside it), atomically")
    down.add_argument("--thresholds", help="saved per-neuron thresholds of this model (evaluate --json)")
    down.add_argument("--metric", choices=ANALYSIS_METRICS, default="ppl-p", action=_Given,
                      help="the sparsity setting (default: the model's PPL-p%% thresholds)")
    down.add_argument("--p", type=float, default=1.0, action=_Given, help="PPL-p%%: allowed perplexity increase, percent")
    down.add_argument("--value", type=float, action=_Given, help="the rule's parameter: CETT, k, eps or p")
    down.add_argument("--site", choices=("intermediate", "gate", "up", "input"), default="intermediate", action=_Given)
    down.add_argument("--power", type=float, default=1.0, action=_Given, help="top-p: sum |a|**power")
    down.add_argument("--data", help="validation text for the threshold search (default: the run's validation split)")
    down.add_argument("--tokens", help="validation tokens for the threshold search: .npy (sequences, length)")
    measurement_arguments(down, out=False, tp=False)  # the threshold search's data sizes
    mlflow_arguments(down)
    down.set_defaults(run=_downstream, metric_given=False)
