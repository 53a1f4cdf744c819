"""The measurements people ask for: one model (`sparsity-scaling evaluate`), one checkpoint
of a grid run, and every checkpoint of a run with the stabilising strategy
(`evaluate-run`). Each runs on every rank of its job (`ranks.on_ranks`); rank 0 writes."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ..errors import NonFiniteError, SettingError, UserError
from ..files import json_text, write_json_atomic
from ..metrics.result import thresholds_artifact
from ..metrics.search import Evaluator, Point, ReloadingEvaluator, ModelRoom, ppl_p, stabilised_cett
from ..parallel import init_parallel
from ..rundir import Checkpoint, RunDir, read_checkpoint
from .inputs import ModelRef, load_eval_data, validation_read_once
from .metric import measure
from .settings import DataSettings, MetricSettings


def load_evaluator(model: ModelRef, data: DataSettings, metric: MetricSettings, tp: int = 1) -> Evaluator:
    """The model at TP size `tp` on its validation data, dense pass done (call init_parallel(tp) first)."""
    return measurable(Evaluator(model.load(tp), load_eval_data(model, data), metric.calibration_tokens), model)


UNIFORM_LOSS_MARGIN = 1e-3  # nats: a dense loss this close to ln(vocabulary) is uniform prediction


def measurable(evaluator: Evaluator, model: ModelRef) -> Evaluator:
    """Refuse a model whose dense perplexity is not finite: every ratio against it would
    be meaningless (a diverged model reads as perfectly sparse). Non-finite weights are
    refused as they load (`hf.load.read_weights`). Refuse one that predicts every token as
    equally likely (its dense perplexity is the vocabulary size): nothing in its FFNs can
    move its perplexity, and the search would blame the validation data."""
    ppl = evaluator.dense.ppl
    if not math.isfinite(ppl):
        raise NonFiniteError(f"{model.name}: dense perplexity {ppl} on the validation data is not finite; "
                             "the model cannot be measured")
    vocab = evaluator.vocab_size
    if abs(evaluator.dense.loss - math.log(vocab)) < UNIFORM_LOSS_MARGIN:
        raise UserError(f"{model.name}: dense perplexity {ppl:.6g} is the vocabulary size {vocab}: the model "
                        "predicts every token as equally likely (an output layer of zeros: weights not loaded?); "
                        "it cannot be measured")
    return evaluator


def evaluate_model(model: ModelRef, metric: MetricSettings, data: DataSettings, tp: int = 1,
                   json_out: str | None = None, thresholds_out: str | None = None) -> None:
    """Measure one model and print the result; with `json_out`, also write it there. The
    per-neuron thresholds (if the metric has them) go to `thresholds_out`, by default beside
    `json_out` as NAME.thresholds.json."""
    init_parallel(tp)
    evaluator = load_evaluator(model, data, metric, tp)
    if dist.get_rank() == 0:  # first, so that a model file can be checked before the search
        _warn(f"{model.name}: dense perplexity {evaluator.dense.ppl:.4f} over {evaluator.data.tokens} tokens "
              f"(vocabulary {evaluator.vocab_size})")
    result, thresholds = measure(metric, evaluator, model.activation(evaluator.target))
    record = {"model": model.name, "data_hash": evaluator.data.digest(), **result.to_dict()}
    artifact = None
    if thresholds is not None:
        key = {"model": record["model"], "data_hash": record["data_hash"], "metric": metric.metric,
               "p": metric.p if metric.metric == "ppl-p" else None, "cett": result.cett}
        artifact = thresholds_artifact(thresholds, key)  # collective under TP
    if dist.get_rank() != 0:
        return
    _warn(result.convergence_warning())
    if json_out:
        write_json_atomic(json_out, record)
        if artifact is not None and not thresholds_out:
            thresholds_out = Path(json_out).with_name(Path(json_out).stem + ".thresholds.json")
    if artifact is not None and thresholds_out:
        write_json_atomic(thresholds_out, artifact)
    print(json_text(record), end="")


def _warn(line: str | None) -> None:
    if line:
        print(line, file=sys.stderr, flush=True)


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
    if dist.get_rank() == 0:
        _warn(result.convergence_warning())
    record = result.to_dict()
    record["eval_tokens"] = record.pop("tokens")
    return {"checkpoint": ck.name, "train_tokens": ck.tokens, "step": ck.step, **record}


@dataclass(frozen=True)
class SeriesMember:
    """One model of a checkpoint series: where it is and how many tokens it was trained on."""

    model: ModelRef
    name: str
    tokens: int
    step: int | None = None


def left_out(member: SeriesMember, error: NonFiniteError) -> dict:
    """The record of a model that cannot be measured (non-finite weights or perplexity)."""
    if dist.get_rank() == 0:
        print(f"{member.name}: left out: {error}", flush=True)
    return {"checkpoint": member.name, "tokens": member.tokens, "error": str(error)}


@dataclass
class SeriesSearch:
    """The stabilising strategy's CETT over a series' newest models."""

    cett: float
    converged: bool
    final: dict[str, Evaluator]  # the `last` newest measurable models, calibrated, weights parked
    excluded: dict[str, dict]  # name -> why: models left out of the trajectory


def search_series(members: list[SeriesMember], metric: MetricSettings, data: DataSettings, last: int = 5,
                  tp: int = 1, on_step: Callable[[int, Point], None] | None = None) -> SeriesSearch:
    """The paper's stabilising strategy (members oldest first): one CETT whose mean PPL ratio
    over the `last` newest measurable models is 1 + p/100. The models that fit half the free
    memory stay loaded; beyond that, one model in memory at a time, the others keeping only
    their calibration. `on_step` hears each search step."""
    if last < 1:
        raise SettingError("last", last, "must be at least 1")
    init_parallel(tp)
    if members[-1].model.checkpoint:
        check_fits(members[-1].model.read_checkpoint(), tp)
    final, excluded, room = {}, {}, ModelRoom()
    for member in reversed(members):
        if len(final) == last:
            break
        try:
            final[member.name] = measurable(ReloadingEvaluator(lambda m=member: m.model.load(tp),
                                                               load_eval_data(member.model, data),
                                                               metric.calibration_tokens, room), member.model)
        except NonFiniteError as error:
            excluded[member.name] = left_out(member, error)
    if not final:
        raise NonFiniteError(f"none of the {len(members)} models can be measured: {next(iter(excluded.values()))['error']}")
    solution = stabilised_cett(list(reversed(final.values())), metric.p, on_step)
    if dist.get_rank() == 0:
        _warn(solution.warning(f"the stabilised PPL-{metric.p:g}% search"))
    return SeriesSearch(solution.point.x, solution.converged, final, excluded)


def measure_member(member: SeriesMember, cett: float, metric: MetricSettings, data: DataSettings, tp: int = 1,
                   evaluator: Evaluator | None = None) -> dict:
    """One model of a series at the series' CETT: its point of the trajectory (NonFiniteError
    if it cannot be measured). `evaluator`: the model's, if the search holds it already."""
    init_parallel(tp)
    evaluator = evaluator or load_evaluator(member.model, data, metric, tp)
    with evaluator.loaded() as ev:
        rule = ev.cett_rule(cett, fresh=True)  # the same whether this evaluator searched before or not
        result = ev.result("ppl-p-stabilised", rule, ev.measure(rule))
    record = result.to_dict()
    record["eval_tokens"] = record.pop("tokens")  # "tokens" is the training-token count here
    if dist.get_rank() == 0:
        print(f"{member.name}: activation ratio {result.activation_ratio:.4f}, "
              f"PPL ratio {result.ppl_ratio:.4f}", flush=True)
    return {"checkpoint": member.name, "tokens": member.tokens, "step": member.step, **record}


def trajectory_record(metric: MetricSettings, cett: float, converged: bool, last: int, started: float,
                      points: list[dict], excluded: list[dict]) -> dict:
    """What `evaluate-run` writes as RUN/sparsity.json (and `evaluate-series` extends)."""
    return {"metric": "ppl-p-stabilised", "p": metric.p, "cett": cett, "converged": converged, "last": last,
            "seconds": round(time.time() - started, 3), "checkpoints": sorted(points, key=lambda p: p["tokens"]),
            "excluded": sorted(excluded, key=lambda e: e["tokens"])}


def stabilised_trajectory(members: list[SeriesMember], metric: MetricSettings, data: DataSettings, last: int = 5,
                          tp: int = 1, on_step: Callable[[int, Point], None] | None = None) -> dict:
    """The stabilising strategy over a series, then every model measured at its CETT, in
    this job; the record `evaluate-run` writes (every rank returns it)."""
    started = time.time()
    with validation_read_once():
        search = search_series(members, metric, data, last, tp, on_step)
        used, excluded, points = len(search.final), dict(search.excluded), []
        for member in members:
            if member.name in excluded:
                continue
            try:
                points.append(measure_member(member, search.cett, metric, data, tp, search.final.pop(member.name, None)))
            except NonFiniteError as error:
                excluded[member.name] = left_out(member, error)
    return trajectory_record(metric, search.cett, search.converged, used, started, points, list(excluded.values()))


def evaluate_run(run_dir: str | Path, metric: MetricSettings, data: DataSettings, last: int = 5, tp: int = 1,
                 json_out: str | None = None, on_step: Callable[[int, Point], None] | None = None,
                 extra: dict | None = None) -> None:
    """The stabilising strategy over every checkpoint of one of our runs. Writes
    RUN/sparsity.json (or `json_out`), with `extra`'s fields (the grid's `evaluated_on`)."""
    run = RunDir(run_dir)
    checkpoints = run.checkpoints()
    if not checkpoints:
        raise UserError(f"{run.path}: no complete checkpoints")
    members = [SeriesMember(ModelRef(checkpoint=str(ck.path)), ck.name, ck.tokens, ck.step) for ck in checkpoints]
    record = {**stabilised_trajectory(members, metric, data, last, tp, on_step), **(extra or {})}
    if dist.get_rank() == 0:
        out = Path(json_out) if json_out else run.sparsity
        write_json_atomic(out, record)
        print(f"stabilised CETT {record['cett']:.5f} over the last {record['last']} checkpoints -> {out}")


def evaluate_series(members: list[SeriesMember], metric: MetricSettings, data: DataSettings, last: int, tp: int,
                    out: str | None, publish: Callable | None = None) -> None:
    """`evaluate-series` in this job (on its `tp` ranks)."""
    record = stabilised_trajectory(members, metric, data, last, tp)
    if dist.get_rank() == 0:
        write_series(record, len(members), out, publish)


def write_series(record: dict, models: int, out: str | None, publish: Callable | None = None) -> None:
    """A series' stabilised trajectory in the reference format ({"token_passed",
    "activation_ratio"} plus each point's details) that the law fitting and
    `tools/predict_tokens.py` read. `publish(files, metrics)` (an MLflow run's logger) gets the
    file and `series_activation_ratio` at step = tokens."""
    trajectory = {"token_passed": [p["tokens"] for p in record["checkpoints"]],
                  "activation_ratio": [p["activation_ratio"] for p in record["checkpoints"]], **record}
    if out:
        write_json_atomic(out, trajectory)
    print(f"stabilised CETT {record['cett']:.5f} over the last {record['last']} of {models} models"
          + (f" -> {out}" if out else ""))
    if publish is not None:
        publish([out], [("series_activation_ratio", p["activation_ratio"], p["tokens"])
                        for p in record["checkpoints"]] + [("series_cett", record["cett"], 0)])
