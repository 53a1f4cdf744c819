"""Grid files: a base run config, axes of overrides, and the resources of each run.

    name: sparsing_law
    base: ../models/0.1b.yaml          # relative to the grid file
    axes:                              # a list of blocks, combined as a product
      - product: {base: [../models/0.1b.yaml, ../models/0.2b.yaml], model.activation: [relu, silu]}
      - zipped: {label: [wd14, wd21], model.d_model: [512, 576], model.n_layers: [36, 28]}
      - list: [{model.d_model: 512}, {model.d_model: 768, train.lr: 0.005}]
    overrides: {train.tokens: 2e6}     # for every run
    points: {0.1b-relu: {train.lr: 0.005}}   # for one run, by name
    resources: {tp: 1, dp: 1, cpus_per_worker: 1, gpus_per_worker: 0, node_wait_s: 600}
    evaluation: {p: 1.0, eval_tokens: 65536, last: 5, cpus: 1, pareto: true}
    report: {targets: [0.07], tasks: [sparsity_smoke], task_limit: 100}   # budgets predicted for these
                                       # ratios; lm-eval tasks scored dense and sparse
    max_failures: 3

Paths in a grid file (base, and data paths: data.tokenizer, data.blend[].prefix,
train.decay_data[].prefix, ...) are relative to the grid file, so a grid and its corpora
travel together. Run names come from the axis values, or an axis' `label` list (no
timestamps), so resubmitting finds the same runs.
"""

from __future__ import annotations

import functools
import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from sparsity_scaling.config import RunConfig, load_config
from sparsity_scaling.errors import SettingError, UserError
from sparsity_scaling.formatting import sci


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class Resources(_Section):
    """What one run of the grid asks of the cluster."""

    tp: int = 1
    """Tensor-parallel size of each run (overrides its parallel.tp)."""
    dp: int = 1
    """Data-parallel size of each run."""
    cpus_per_worker: float = 1
    """Logical CPUs of each of the run's tp x dp workers."""
    gpus_per_worker: float = 0
    """GPUs of each worker."""
    node_wait_s: float = 600
    """How long a run or evaluation job waits once no node of the cluster could hold it (an
    autoscaler may add one) before the grid stops, checkpoints intact for a resubmit."""

    @property
    def workers(self) -> int:
        return self.tp * self.dp

    def worker_resources(self) -> dict[str, float]:
        """What each training worker asks Ray for (as `Evaluation.rank_resources` per rank)."""
        return {"CPU": self.cpus_per_worker, **({"GPU": self.gpus_per_worker} if self.gpus_per_worker else {})}


class Evaluation(_Section):
    """How each run's checkpoints are measured while it trains, and when it ends."""

    p: float = 1.0
    """PPL-p%: the allowed perplexity increase, percent."""
    eval_tokens: int = 65536
    """Validation tokens of each measurement."""
    last: int = 5
    """The stabilising strategy sets one CETT on this many final checkpoints."""
    calibration_tokens: int = 8192
    """Dense activations kept to calibrate thresholds."""
    cpus: float = 1
    """Logical CPUs of each rank of an evaluation job (below 1 to share cores with training)."""
    gpus: float = 0
    """GPUs of each rank of an evaluation job (fractional to share a GPU)."""
    tp: int = 1
    """Tensor-parallel ranks of one evaluation job (for checkpoints too large for one device)."""
    pareto: bool = True
    """Draw the Pareto curves of every method at the last checkpoint."""

    @model_validator(mode="after")
    def _check(self) -> "Evaluation":
        try:
            self.metric(), self.data()  # the library's own checks
        except SettingError as error:
            raise ValueError(str(error)) from None
        if self.last < 1:
            raise ValueError("last must be at least 1")
        if self.tp < 1 or self.cpus <= 0 or self.gpus < 0:
            raise ValueError("tp must be at least 1, cpus positive and gpus at least 0")
        return self

    def rank_resources(self) -> dict[str, float]:
        """What each rank of an evaluation job asks Ray for."""
        return {"CPU": self.cpus, **({"GPU": self.gpus} if self.gpus else {})}

    def describe(self) -> str:
        per_rank = f"{self.cpus:g} CPU, {self.gpus:g} GPU"
        return f"evaluation jobs: {self.tp} rank(s) of {per_rank}" if self.tp > 1 else f"evaluation jobs: {per_rank}"

    def metric(self):
        """The PPL-p% measurement these settings ask for."""
        from sparsity_scaling.evaluation.settings import MetricSettings

        return MetricSettings(metric="ppl-p", p=self.p, calibration_tokens=self.calibration_tokens)

    def data(self):
        """Each run's own validation split, `eval_tokens` of it."""
        from sparsity_scaling.evaluation.settings import DataSettings

        return DataSettings(eval_tokens=self.eval_tokens)


class Report(_Section):
    """What the grid's report predicts."""

    targets: list[float] = [0.07]
    """Activation ratios whose token budgets the report predicts."""
    tasks: list[str] = []
    """lm-eval tasks the report scores each run's last checkpoint on, dense and at its
    stabilised CETT (`sparsity-scaling downstream`; e.g. sparsity_smoke)."""
    task_limit: Optional[int] = 100
    """Examples per task (None: all)."""

    @field_validator("targets")
    @classmethod
    def _ratios(cls, targets: list[float]) -> list[float]:
        if not targets or not all(0 < t < 1 for t in targets):
            raise ValueError("targets must be activation ratios in (0, 1)")
        return targets


class GridFile(_Section):
    """A grid file, as written (see the module docstring)."""

    name: str
    """The grid's name: its MLflow experiment and default workdir runs/NAME."""
    base: str
    """The base run config, relative to the grid file."""
    axes: list[dict[str, Any]] = []
    """Blocks of overrides (product, zipped or list), combined as a product."""
    overrides: dict[str, Any] = {}
    """Overrides for every run."""
    points: dict[str, dict[str, Any]] = {}
    """Overrides for single runs, by name."""
    resources: Resources = Resources()
    evaluation: Evaluation = Evaluation()
    report: Report = Report()
    max_failures: int = 3
    """How often Ray restarts a failed run from its newest checkpoint."""


@dataclass(frozen=True)
class RunSpec:
    """One run of a grid: its name, resolved config and the tags MLflow gets."""

    name: str
    config: RunConfig
    base: str
    overrides: tuple[str, ...]

    @property
    def pair_key(self) -> str:
        """The same for two runs whose configs differ in `model.activation` alone: the
        config's hash with the activation set to one value (the report's ReLU/SiLU pairs)."""
        model = self.config.model.model_copy(update={"activation": "relu"})
        return self.config.model_copy(update={"model": model}).hash()

    def tags(self, grid: str) -> dict[str, str]:
        model = self.config.model
        return {
            "grid": grid,
            "run": self.name,
            "scale": Path(self.base).stem,
            "activation": model.activation,
            "width_depth_ratio": f"{model.width_depth_ratio:.1f}",
            "params": str(model.non_embedding_params()),
        }


@dataclass(frozen=True)
class Grid:
    path: Path
    spec: GridFile
    runs: list[RunSpec]

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def on_gpus(self) -> bool:
        """Whether the grid's runs train on GPUs (its workers ask for them)."""
        return self.spec.resources.gpus_per_worker > 0

    def bf16(self, run: RunSpec) -> bool:
        from sparsity_scaling.costs import trains_in_bf16

        return trains_in_bf16(run.config.train, self.on_gpus)

    def memory(self, run: RunSpec):
        """The estimated peak memory of one of the run's training ranks (`costs.MemoryEstimate`)."""
        from sparsity_scaling.costs import MemoryEstimate

        return MemoryEstimate.of(run.config, _vocab_size(run.config), self.spec.resources.dp, self.bf16(run),
                                 self.on_gpus)


def _block_points(block: dict[str, Any], where: str) -> list[dict[str, Any]]:
    if len(block) != 1:
        raise UserError(f"{where}: each axis block is one of product, zipped or list")
    (kind, body), = block.items()
    if kind == "list":
        if not isinstance(body, list) or not all(isinstance(p, dict) for p in body):
            raise UserError(f"{where}.list: expected a list of mappings")
        return list(body)
    if not isinstance(body, dict) or not all(isinstance(v, list) and v for v in body.values()):
        raise UserError(f"{where}.{kind}: expected a mapping of keys to non-empty lists")
    keys = list(body)
    if kind == "product":
        return [dict(zip(keys, values)) for values in itertools.product(*body.values())]
    if kind == "zipped":
        lengths = {len(v) for v in body.values()}
        if len(lengths) != 1:
            raise UserError(f"{where}.zipped: all lists must have the same length")
        return [dict(zip(keys, values)) for values in zip(*body.values())]
    raise UserError(f"{where}: unknown axis kind {kind!r} (product, zipped or list)")


def _label(value: Any) -> str:
    text = Path(value).stem if isinstance(value, str) and value.endswith(".yaml") else str(value)
    return re.sub(r"[^A-Za-z0-9_.]+", "_", text)


def _named(point: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """A point's name part ('label' if given, else its values) and its overrides."""
    point = dict(point)
    label = point.pop("label", None)
    return (_label(label) if label is not None else "-".join(_label(v) for v in point.values())), point


def load_grid(path: str | Path) -> Grid:
    """Parse, expand and validate a grid file; every error names the file and the field."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: no such grid file") from None
    except yaml.YAMLError as error:
        raise UserError(f"{path}: cannot read YAML ({str(error).splitlines()[0]})") from None
    try:
        spec = GridFile.model_validate(raw if isinstance(raw, dict) else {})
    except ValidationError as error:
        item = error.errors()[0]
        message = item["msg"].removeprefix("Value error, ")
        raise UserError(f"{path}: {'.'.join(map(str, item['loc']))}: {message}") from None

    points: list[tuple[str, dict[str, Any]]] = [("", {})]
    for index, block in enumerate(spec.axes):
        more = [_named(p) for p in _block_points(block, f"{path}: axes[{index}]")]
        points = [("-".join(filter(None, (na, nb))), {**a, **b}) for na, a in points for nb, b in more]

    runs, seen = [], {}
    for name, point in points:
        name = name or "run"
        if name in seen:
            raise UserError(f"{path}: runs {seen[name]} and {point} would share the output directory {name}")
        seen[name] = point
        base = str((path.parent / point.get("base", spec.base)).resolve())
        values = {**spec.overrides, **{k: v for k, v in point.items() if k != "base"}, **spec.points.get(name, {})}
        values = {key: _from_grid_file(key, value, path.parent) for key, value in values.items()}
        values["parallel.tp"] = spec.resources.tp
        overrides = tuple(f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
                          for k, v in values.items())
        try:
            config = load_config(base, list(overrides))
        except UserError as error:
            raise UserError(f"{path}: run {name}: {error}") from None
        for field in ("n_heads", "d_ff"):
            if getattr(config.model, field) % spec.evaluation.tp:
                raise UserError(f"{path}: evaluation.tp {spec.evaluation.tp} does not divide model.{field} "
                                f"{getattr(config.model, field)} of run {name}")
        runs.append(RunSpec(name, config, base, overrides))
    unknown = set(spec.points) - set(seen)
    if unknown:
        raise UserError(f"{path}: points: {sorted(unknown)} match no run of the grid")
    return Grid(path, spec, runs)


PATH_FIELDS = ("data.corpus", "data.train_prefix", "data.valid_prefix", "data.tokenizer", "data.cache_dir")
BLEND_FIELDS = ("data.blend", "train.decay_data")


def _from_grid_file(key: str, value: Any, folder: Path) -> Any:
    """A data path written in the grid file, made absolute from the grid file's folder (the
    built-in corpus `stdlib` and absolute paths stay as they are)."""
    def absolute(text):
        if not isinstance(text, str) or text == "stdlib" or Path(text).expanduser().is_absolute():
            return text
        return str((folder / text).resolve())

    if key in PATH_FIELDS:
        return absolute(value)
    if key in BLEND_FIELDS and isinstance(value, list):
        return [{**part, "prefix": absolute(part.get("prefix"))} if isinstance(part, dict) else part for part in value]
    return value


def _amount(value: float) -> str:
    """1,308 or 0.0054: whole numbers when large, two significant digits when small."""
    return f"{value:,.0f}" if value >= 100 else f"{value:.2g}"


def _gigabytes(value: float) -> str:
    """79.0 or 0.0051: one decimal from 1 GB on (a limit is near), two significant digits below."""
    return f"{value:.1f}" if value >= 1 else f"{value:.2g}"


def _vocab_size(config: RunConfig) -> int:
    """The tokenizer's vocabulary if it exists already, else data.vocab_size (to be trained)."""
    return _vocabulary(config.data.tokenizer, config.data.vocab_size)


@functools.lru_cache(maxsize=None)
def _vocabulary(tokenizer: str | None, vocab_size: int) -> int:
    from sparsity_scaling.data.tokenizer import load_tokenizer

    if tokenizer:
        try:
            return load_tokenizer(tokenizer).vocab_size
        except UserError:
            pass
    return vocab_size


def plan_table(grid: Grid, mfu: float, peak_tflops: float, problems=()) -> str:
    """What `grid plan` prints: per run its size, budget, cost (FLOPs, GPU-hours, checkpoint
    storage; formulas in `sparsity_scaling.costs`), what measuring its checkpoints costs
    (evaluation FLOPs and GPU-hours at the same MFU), estimated peak memory of a rank, the
    fields the preflight finds a problem with (`launcher.preflight.Problem`) and its corpus,
    then the totals."""
    from sparsity_scaling.costs import GB, EvaluationCost, RunCost
    from sparsity_scaling.data.pipeline import corpus_tokens
    from sparsity_scaling.formatting import table

    res = grid.spec.resources
    rows, total = [], {"flops": 0.0, "gpu_hours": 0.0, "storage": 0, "eval_flops": 0.0, "eval_gpu_hours": 0.0}
    evaluation = grid.spec.evaluation
    for run in grid.runs:
        config = run.config
        m, t = config.model, config.train
        cost = RunCost.of(config, _vocab_size(config), grid.bf16(run), mfu, peak_tflops)
        measuring = EvaluationCost.of(config, _vocab_size(config), evaluation.eval_tokens, evaluation.last, mfu,
                                      peak_tflops)
        corpus = corpus_tokens(config.data)
        if corpus is None:
            corpus_text, epochs = f"not prepared ({config.data.source})", "-"
        else:
            weights = [p.weight for p in config.data.blend] if config.data.blend else [1.0]
            corpus_text = sci(sum(corpus))
            epochs = f"{max(cost.tokens * w / sum(weights) / max(n, 1) for n, w in zip(corpus, weights)):.2f}"
        params = m.non_embedding_params()
        fields = sorted({p.field for p in problems if p.run == run.name})
        rows.append([run.name, m.activation, m.d_model, m.n_layers, f"{m.width_depth_ratio:.1f}", sci(params),
                     sci(t.tokens), f"{t.tokens / params:.0f}", sci(cost.flops), _amount(cost.gpu_hours),
                     sci(measuring.flops), _amount(measuring.gpu_hours), f"{cost.checkpoints}",
                     _amount(cost.storage_bytes / 1e9), _gigabytes(grid.memory(run).total / GB),
                     ", ".join(fields) or "ok", corpus_text, epochs])
        total["flops"] += cost.flops
        total["gpu_hours"] += cost.gpu_hours
        total["storage"] += cost.storage_bytes
        total["eval_flops"] += measuring.flops
        total["eval_gpu_hours"] += measuring.gpu_hours
    headers = ["run", "activation", "d_model", "layers", "w/d", "params", "tokens", "tok/param", "FLOPs",
               "GPU-h", "eval FLOPs", "eval GPU-h", "ckpts", "storage GB", "peak GB/rank", "preflight",
               "corpus tokens", "epochs"]
    return "\n".join([
        f"grid {grid.name}: {len(grid.runs)} runs, each {res.workers} workers "
        f"(tp {res.tp} x dp {res.dp}; {res.cpus_per_worker:g} CPU, {res.gpus_per_worker:g} GPU per worker); "
        f"{grid.spec.evaluation.describe()}",
        table(headers, rows),
        f"total: {sci(total['flops'])} FLOPs, {_amount(total['gpu_hours'])} GPU-hours at MFU {mfu:g} of "
        f"{peak_tflops:g} TFLOP/s, {_amount(total['storage'] / 1e9)} GB of checkpoints "
        f"(weights of every checkpoint, engine state of the newest checkpoint.keep_engine); "
        f"measuring them: {sci(total['eval_flops'])} FLOPs, {_amount(total['eval_gpu_hours'])} GPU-hours "
        f"(PPL-{evaluation.p:g}% at every checkpoint over {evaluation.eval_tokens:,} tokens, the stabilising "
        f"strategy over the last {evaluation.last})",
    ])
