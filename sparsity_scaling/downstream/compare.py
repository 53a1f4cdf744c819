"""`sparsity-scaling downstream`: lm-eval tasks scored dense and at a sparsity setting.

The claim under test is Sparsing Law's: the neurons PPL-p% finds inactive can be skipped at
almost no cost on downstream tasks. Each task runs twice on the same model, the same
few-shot examples and the same requests: dense, then with the sparsity rule set on every FFN
through the probe; the table gives both scores, their difference and standard errors, and
the activation ratio the rule achieved on the task's own text.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

from ..analysis.models import ModelSpec, describe, sparsity_setting
from ..analysis.output import say
from ..analysis.settings import AnalysisSettings, Publisher
from ..errors import SettingError
from ..figures import save_figure
from ..files import json_text, write_json_atomic
from ..formatting import table
from ..parallel import init_parallel
from ..rundir import RunDir
from .lm import ProbedLM, TextCodec
from .tasks import go_offline, load_task, task_manager

BOOTSTRAP_ITERS = 1000  # standard errors of non-mean metrics (perplexity); lm-eval's default is 100000
HF_MAX_LENGTH = 2048  # a Hugging Face model that states no maximum length


@dataclass(frozen=True)
class DownstreamSettings:
    """What to run: lm-eval tasks by name, where extra task YAML lives, and how much of each."""

    tasks: tuple[str, ...]
    include_paths: tuple[str, ...] = ()
    limit: int | None = None  # examples per task (all if None)
    num_fewshot: int | None = None  # lm-eval's per-task default if None
    cache: str = ""  # where the smoke tasks are written

    def __post_init__(self):
        if not self.tasks:
            raise SettingError("tasks", "", "name at least one task")
        if self.limit is not None and self.limit < 1:
            raise SettingError("limit", self.limit, "must be at least 1")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise SettingError("num_fewshot", self.num_fewshot, "must be 0 or more")


def codec_of(spec: ModelSpec) -> TextCodec:
    """The model's tokenizer as the LM uses it (see `downstream.lm`)."""
    model = spec.model
    if model.checkpoint:
        tok = model.run_tokenizer()
        return TextCodec(lambda text: tok.encode([text])[0], tok.decode, tok.eos_id, tok.eos_id, tok.vocab_size)
    tok = model.hf_tokenizer()
    eos = tok.eos_token_id if tok.eos_token_id is not None else 0
    prefix = tok.bos_token_id if tok.bos_token_id is not None else eos
    return TextCodec(tok.encode, tok.decode, eos, prefix, len(tok))


def max_length_of(spec: ModelSpec, target) -> int:
    """The longest sequence the model was made for: a run's training length, or the
    Hugging Face config's maximum positions."""
    if spec.model.checkpoint:
        return spec.model.read_checkpoint().config().data.seq_len
    config = target.model.config
    for name in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    return HF_MAX_LENGTH


def score_rows(dense: dict, sparse: dict, ratios: dict[str, float | None]) -> list[dict]:
    """One row per task and metric from two lm-eval `results` dicts."""
    rows = []
    for task, metrics in dense.items():
        for key, value in metrics.items():
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            stderr_key = f"{metric}_stderr,{filt}"
            other = sparse.get(task, {})
            row = {"task": task, "metric": metric if filt == "none" else f"{metric} ({filt})",
                   "dense": _number(value), "dense_stderr": _number(metrics.get(stderr_key)),
                   "sparse": _number(other.get(key)), "sparse_stderr": _number(other.get(stderr_key))}
            row["difference"] = (None if row["dense"] is None or row["sparse"] is None
                                 else row["sparse"] - row["dense"])
            row["activation_ratio"] = ratios.get(task)
            rows.append(row)
    return rows


def _number(value) -> float | None:
    """A finite float, or None (lm-eval writes "N/A" where it has no standard error)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _cell(value, stderr=None) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")


def render_table(rows: list[dict]) -> str:
    headers = ("task", "metric", "dense", "sparse", "difference", "activation ratio")
    lines = [(r["task"], r["metric"], _cell(r["dense"], r["dense_stderr"]), _cell(r["sparse"], r["sparse_stderr"]),
              "-" if r["difference"] is None else f"{r['difference']:+.4f}",
              "-" if r["activation_ratio"] is None else f"{r['activation_ratio']:.4f}") for r in rows]
    return table(headers, lines)


def _figure(rows: list[dict], title: str):
    from matplotlib.figure import Figure

    rows = [r for r in rows if r["dense"] is not None and r["sparse"] is not None]
    figure = Figure(figsize=(max(5.0, 1.2 * len(rows) + 2), 4))
    ax = figure.subplots()
    xs = range(len(rows))
    for offset, column, color in ((-0.2, "dense", "tab:gray"), (0.2, "sparse", "tab:blue")):
        ax.bar([x + offset for x in xs], [r[column] for r in rows], width=0.4, color=color, label=column,
               yerr=[r[f"{column}_stderr"] or 0.0 for r in rows], capsize=3)
    ax.set_xticks(list(xs), [f"{r['task']}\n{r['metric']}" for r in rows], fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.legend()
    return figure


def run_downstream(spec: ModelSpec, analysis: AnalysisSettings, settings: DownstreamSettings,
                   json_out: str | None = None, publish: Publisher | None = None) -> dict:
    """Score every task dense and sparse; print the table; write JSON (and a PNG beside it)."""
    from lm_eval import simple_evaluate

    go_offline()  # (again: a caller may not be the command line)
    manager = task_manager(list(settings.include_paths), Path(settings.cache), settings.tasks)
    for name in settings.tasks:  # every task's data checked before any model runs
        load_task(name, manager)
    init_parallel(1)
    say(f"{spec.label}: loading")
    target = spec.model.load(1)
    say(f"{spec.label}: setting the sparsity rule ({'thresholds' if spec.thresholds else analysis.metric.metric})")
    rule, setting = sparsity_setting(analysis, spec, target)
    codec, max_length = codec_of(spec), max_length_of(spec, target)
    results: dict[str, dict] = {"dense": {}, "sparse": {}}
    ratios: dict[str, float | None] = {}
    started = time.time()
    for name in settings.tasks:
        for column, lm_rule in (("dense", None), ("sparse", rule)):
            say(f"{name}: {column}")
            lm = ProbedLM(target, codec, max_length, lm_rule, progress=say)
            out = simple_evaluate(model=lm, tasks=[name], num_fewshot=settings.num_fewshot, limit=settings.limit,
                                  task_manager=manager, bootstrap_iters=BOOTSTRAP_ITERS, log_samples=False,
                                  verbosity="ERROR")
            results[column].update(out["results"])
            if lm_rule is not None:
                ratios.update({task: lm.activation_ratio(task) for task in lm.counts})
    rows = score_rows(results["dense"], results["sparse"], ratios)
    record = {"model": spec.model.name, "label": spec.label, "setting": setting,
              "tasks": list(settings.tasks), "limit": settings.limit, "num_fewshot": settings.num_fewshot,
              "seconds": round(time.time() - started, 1), "rows": rows}
    print(render_table(rows))
    if spec.model.checkpoint:  # the run keeps its latest downstream record, for the grid report
        ck = spec.model.read_checkpoint()
        write_json_atomic(RunDir(ck.run.path).downstream, {"checkpoint": ck.name, "train_tokens": ck.tokens, **record})
    if json_out:
        json_path = Path(json_out)
        png = json_path.with_suffix(".png")
        write_json_atomic(json_path, record)
        save_figure(_figure(rows, f"{spec.label}: dense vs {describe(setting)}"), png)
        print(f"wrote {json_path} and {png}")
        if publish is not None:
            publish([json_path, png], downstream_metrics(rows))
    else:
        print(json_text({k: v for k, v in record.items() if k != "rows"}), end="")
    return record


def downstream_metrics(rows: list[dict]) -> list[tuple[str, float, int]]:
    """MLflow metrics: downstream/TASK/METRIC/{dense,sparse} and the task's activation ratio."""
    out = []
    for row in rows:
        base = f"downstream/{row['task']}/{row['metric'].replace(' ', '_').replace('(', '').replace(')', '')}"
        out += [(f"{base}/{column}", row[column], 0) for column in ("dense", "sparse") if row[column] is not None]
        if row["activation_ratio"] is not None:
            out.append((f"downstream/{row['task']}/activation_ratio", row["activation_ratio"], 0))
    return sorted(set(out))
