"""`sparsity-scaling speedup MODEL`: decode latency per token with sparse FFNs against dense
ones, at a sparsity setting (any rule `evaluate` takes, or saved thresholds) or over a sweep
of activation ratios."""

from __future__ import annotations

from ..errors import SettingError
from ..metrics import SITES
from .analyze import ANALYSIS_METRICS
from .common import ErrorLine, positive_int
from .evaluate import data_settings, measurement_arguments, metric_settings

DEFAULT_SWEEP = "0.5,0.3,0.2,0.1,0.05"


def _ratios(text: str | None) -> tuple[float, ...]:
    if text is None:
        return ()
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise SettingError("sweep", text, "expected activation ratios separated by commas, e.g. 0.2,0.1,0.05") from None


def _speedup(args) -> None:
    from ..analysis.models import parse_models
    from ..analysis.settings import AnalysisSettings, parse_datasets
    from ..analysis.speedup import SpeedupSettings, report_speedup
    from ..ranks import on_ranks

    timing = SpeedupSettings(batch=args.batch, prompt=args.prompt, steps=args.steps, repeats=args.repeats,
                             device=args.device, threads=args.threads, sweep=_ratios(args.sweep),
                             dense=args.dense)
    [spec] = parse_models([args.model], [args.thresholds] if args.thresholds else None)
    settings = AnalysisSettings(out=args.out, metric=None if args.thresholds or timing.sweep else metric_settings(args),
                                data=data_settings(args),
                                datasets=parse_datasets([args.data] if args.data else (),
                                                        [args.tokens] if args.tokens else ()))
    on_ranks(1, report_speedup, settings, spec, timing, args.json, report_error=ErrorLine())


def add_commands(commands) -> None:
    sp = commands.add_parser("speedup", help="decode latency per token, sparse FFNs against dense")
    sp.add_argument("model", metavar="MODEL", help="a checkpoint, a run directory (its newest checkpoint) or a "
                                                   "local Hugging Face model")
    sp.add_argument("--thresholds", metavar="FILE", help="saved per-neuron thresholds of this model (evaluate --json)")
    sp.add_argument("--metric", choices=ANALYSIS_METRICS, default="ppl-p",
                    help="the sparsity setting (default: the model's PPL-p%% thresholds)")
    sp.add_argument("--p", type=float, default=1.0, help="PPL-p%%: allowed perplexity increase, percent")
    sp.add_argument("--value", type=float, help="the rule's parameter: CETT, k, eps or p")
    sp.add_argument("--site", choices=SITES, default="intermediate")
    sp.add_argument("--power", type=float, default=1.0, help="top-p: sum |a|**power")
    sp.add_argument("--sweep", nargs="?", const=DEFAULT_SWEEP, metavar="RATIOS",
                    help=f"instead, thresholds for these activation ratios (default {DEFAULT_SWEEP}); "
                         "writes OUT/speedup.json and .png")
    sp.add_argument("--out", default="analysis", help="directory for the sweep's JSON and PNG (default: analysis)")
    sp.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    sp.add_argument("--batch", type=positive_int, default=1, help="sequences decoded together")
    sp.add_argument("--prompt", type=positive_int, default=16, help="tokens read before decoding (not timed)")
    sp.add_argument("--steps", type=positive_int, default=32, help="tokens decoded and timed per sequence")
    sp.add_argument("--repeats", type=positive_int, default=5, help="timing rounds; each step's fastest counts")
    sp.add_argument("--threads", type=positive_int, help="CPU threads, dense and sparse alike")
    sp.add_argument("--dense", choices=("fastest", "rows", "linear"), default="fastest",
                    help="how a decoded token's dense products run, in the baseline and the sparse FFNs alike: "
                         "by rows (embedding_bag), by F.linear, or whichever is faster here (default)")
    sp.add_argument("--data", help="validation text: .txt or .jsonl (text field)")
    sp.add_argument("--tokens", help="validation tokens: .npy int array (sequences, length)")
    measurement_arguments(sp, tp=False)
    sp.set_defaults(run=_speedup)
