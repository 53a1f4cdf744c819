"""The measurements people ask for: one model (`sparsity-scaling evaluate`), one checkpoint
of a grid run, and every checkpoint of a run with the stabilising strategy
(`evaluate-run`). Each runs on every rank of its job (`ranks.on_ranks`); rank 0 writes."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from ..errors import SettingError, UserError
from ..files import json_text, write_json_atomic
from ..metrics.result import thresholds_artifact
from ..metrics.search import Evaluator, Point, ReloadingEvaluator, ppl_p, stabilised_cett
from ..parallel import init_parallel
from ..rundir import Checkpoint, RunDir, read_checkpoint
from .inputs import ModelRef, load_eval_data
from .metric import measure
from .settings import DataSettings, MetricSettings


def load_evaluator(model: ModelRef, data: DataSettings, metric: MetricSettings, tp: int = 1) -> Evaluator:
    """The model at TP size `tp` on its validation data, dense pass done (call init_parallel(tp) first)."""
    return Evaluator(model.load(tp), load_eval_data(model, data), metric.calibration_tokens)


def evaluate_model(model: ModelRef, metric: MetricSettings, data: DataSettings, tp: int = 1,
                   json_out: str | None = None, thresholds_out: str | None = None) -> None:
    """Measure one model and print the result; with `json_out`, also write it there and
    the per-neuron thresholds (if the metric has them) to `thresholds_out`, by default
    beside it as NAME.thresholds.json."""
    init_parallel(tp)
    evaluator = load_evaluator(model, data, metric, tp)
    result, thresholds = measure(metric, evaluator, model.activation(evaluator.target))
    record = {"model": model.name, "data_hash": evaluator.data.digest(), **result.to_dict()}
    artifact = None
    if thresholds is not None:
        key = {"model": record["model"], "data_hash": record["data_hash"], "metric": metric.metric,
               "p": metric.p if metric.metric == "ppl-p" else None, "cett": result.cett}
        artifact = thresholds_artifact(thresholds, key)  # collective under TP
    if dist.get_rank() != 0:
        return
    if json_out:
        write_json_atomic(json_out, record)
        if artifact is not None:
            json_path = Path(json_out)
            write_json_atomic(thresholds_out or json_path.with_name(json_path.stem + ".thresholds.json"), artifact)
    print(json_text(record), end="")


def check_fits(checkpoint: Checkpoint, tp: int, free_bytes: int | None = None) -> None:
    """Refuse, before loading, a checkpoint whose share of weights does not fit its device:
    each of `tp` ranks holds 1/tp of the fp32 weights, plus a quarter for activations and
    calibration. `free_bytes`: the device's free memory (default: the GPU's, if any)."""
    if free_bytes is None:
        if not torch.cuda.is_available():
            return
        free_bytes = torch.cuda.mem_get_info()[0]
    weights = checkpoint.weights.stat().st_size
    if weights * 1.25 / tp > free_bytes:
        needed = math.ceil(weights * 1.25 / free_bytes)
        raise SettingError("tp", tp, f"{checkpoint.path}: its {weights / 1e9:.1f} GB of weights do not fit one "
                           f"device ({free_bytes / 1e9:.1f} GB free) at this tp; it needs tp of at least {needed}")


def evaluate_checkpoint(checkpoint: str | Path, metric: MetricSettings, data: DataSettings, tp: int = 1,
                        on_step: Callable[[int, Point], None] | None = None) -> dict:
    """PPL-p% of one of our checkpoints on its run's validation split, on the `tp` ranks of
    this job, as the grid records it (every rank returns it). `on_step` hears each search step."""
    init_parallel(tp)
    ck = read_checkpoint(checkpoint)
    check_fits(ck, tp)
    result = ppl_p(load_evaluator(ModelRef(checkpoint=str(ck.path)), data, metric, tp), metric.p, on_step=on_step)
    record = result.to_dict()
    record["eval_tokens"] = record.pop("tokens")
    return {"checkpoint": ck.name, "train_tokens": ck.tokens, "step": ck.step, **record}


def evaluate_run(run_dir: str | Path, metric: MetricSettings, data: DataSettings, last: int = 5, tp: int = 1,
                 json_out: str | None = None, on_step: Callable[[int, Point], None] | None = None) -> None:
    """The paper's stabilising strategy: one CETT whose mean PPL ratio over the run's last
    `last` checkpoints is 1 + p/100, then applied at every checkpoint. Writes RUN/sparsity.json
    (or `json_out`). `on_step` hears each step of the search."""
    run = RunDir(run_dir)
    checkpoints = run.checkpoints()
    if not checkpoints:
        raise UserError(f"{run.path}: no complete checkpoints")
    if last < 1:
        raise SettingError("last", last, "must be at least 1")
    init_parallel(tp)
    check_fits(checkpoints[-1], tp)
    started = time.time()

    def reloading(checkpoint) -> ReloadingEvaluator:
        model = ModelRef(checkpoint=str(checkpoint.path))
        return ReloadingEvaluator(lambda: model.load(tp), load_eval_data(model, data), metric.calibration_tokens)

    # one model in memory at a time: the last checkpoints keep only their calibration
    final = [reloading(c) for c in checkpoints[-last:]]
    cett = stabilised_cett(final, metric.p, on_step)
    points = []
    for index, ck in enumerate(checkpoints):
        reuse = index - (len(checkpoints) - len(final))
        evaluator = final[reuse] if reuse >= 0 else load_evaluator(ModelRef(checkpoint=str(ck.path)), data, metric, tp)
        with evaluator.loaded() as ev:
            rule = ev.cett_rule(cett)
            result = ev.result("ppl-p-stabilised", rule, ev.measure(rule))
        del evaluator
        record = result.to_dict()
        record["eval_tokens"] = record.pop("tokens")  # "tokens" is the training-token count here
        points.append({"checkpoint": ck.name, "tokens": ck.tokens, "step": ck.step, **record})
        if dist.get_rank() == 0:
            print(f"{ck.name}: activation ratio {result.activation_ratio:.4f}, "
                  f"PPL ratio {result.ppl_ratio:.4f}", flush=True)
    if dist.get_rank() == 0:
        out = Path(json_out) if json_out else run.sparsity
        write_json_atomic(out, {
            "metric": "ppl-p-stabilised", "p": metric.p, "cett": cett, "last": len(final),
            "seconds": round(time.time() - started, 3), "checkpoints": points,
        })
        print(f"stabilised CETT {cett:.5f} over the last {len(final)} checkpoints -> {out}")
