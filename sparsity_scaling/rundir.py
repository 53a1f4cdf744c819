"""The run directory: the one place that knows where each file of a run and of its
checkpoints lives. Every other module asks `RunDir` or `Checkpoint` for a path.

    RUN/run.json                     which run this directory belongs to (config hash)
    RUN/config.yaml                  the resolved run config
    RUN/tokenizer.model, data.json   the tokenizer (a Hugging Face one: RUN/tokenizer/) and the
                                     record of the data trained on
    RUN/metrics.jsonl                training and validation points, one JSON object a line
    RUN/checkpoints/tokens_<N>/      one checkpoint:
        manifest.json                tokens, step, config hash, sha256 of every file
        model.pt                     unsharded fp32 weights (any TP size can load them)
        config.yaml                  the run config, so a checkpoint stands on its own
        engine/                      DeepSpeed state for exact resume (optimizer shards); only
                                     the newest checkpoint.keep_engine checkpoints keep it
    RUN/evaluations/tokens_<N>.json  PPL-p% of one checkpoint (a grid's evaluation jobs)
    RUN/evaluations/failed/tokens_<N>.json  why a checkpoint could not be measured (non-finite
                                     weights or perplexity): left out of the curves and fits
    RUN/sparsity.json                the stabilised activation curve and thresholds (evaluate-run)
    RUN/pareto.json, pareto.png      Pareto curves of every sparsity method at the last checkpoint
    RUN/activation_curve.png         the activation ratio against training tokens
    RUN/mlflow_run.json              the run's MLflow run (a grid's runs), with
        mlflow_cursor.json, mlflow.lock  what has been delivered to it, and the delivery lock
    RUN/nodes/<node id>.json         each cluster node that trained the run (a grid's runs)
    RUN/jobs/<job>.json              an evaluation job while it runs: its node, attempt, search step
    RUN/logs/                        a grid run's output: train-rank<R>.log, evaluation.log
    RUN/trainer.lock                 the process (training rank 0) that trains the run now:
                                     one trainer at a time, whoever started it
    RUN/failed.json                  why the run's last attempt failed (a diverged step; in a
                                     grid, any error), and its log

A checkpoint is written into `checkpoints/.tmp-<name>` and renamed into place after its
manifest is written, so a checkpoint directory without the `.tmp-` prefix is always
complete, and an interrupted write leaves older checkpoints untouched.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from .config import RunConfig, load_config
from .errors import SettingError, UserError
from .files import OwnerLock, json_line, sha256_file, write_json_atomic, write_text_atomic

MANIFEST = "manifest.json"
TMP_PREFIX = ".tmp-"


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint: its directory and manifest."""

    path: Path
    manifest: dict

    WEIGHTS = "model.pt"
    CONFIG = "config.yaml"
    ENGINE_TAG = "engine"  # DeepSpeed's tag: its state goes into path/engine

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def tokens(self) -> int:
        return self.manifest["tokens"]

    @property
    def step(self) -> int:
        return self.manifest["step"]

    @property
    def run(self) -> "RunDir":
        return RunDir(self.path.parent.parent)

    @property
    def weights(self) -> Path:
        return self.path / self.WEIGHTS

    @property
    def config_file(self) -> Path:
        return self.path / self.CONFIG

    @property
    def engine(self) -> Path:
        return self.path / self.ENGINE_TAG

    @property
    def has_engine(self) -> bool:
        """Whether the checkpoint still keeps the DeepSpeed state that resuming needs."""
        return any(rel.startswith(self.ENGINE_TAG + "/") for rel in self.manifest["files"])

    def config(self) -> RunConfig:
        """The run config the checkpoint was trained with."""
        return load_config(self.config_file)

    def verify(self) -> None:
        """Check every file against the manifest's checksums (slow on big models)."""
        for rel, digest in self.manifest["files"].items():
            file = self.path / rel
            if not file.is_file() or sha256_file(file) != digest:
                raise UserError(f"{self.path}: {rel} is missing or does not match its checksum")


def read_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (FileNotFoundError, NotADirectoryError):
        raise UserError(f"{path}: not a complete checkpoint (no {MANIFEST})") from None
    except json.JSONDecodeError:
        raise UserError(f"{path}/{MANIFEST}: not valid JSON") from None
    return Checkpoint(path, manifest)


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


class RunDir:
    """One training run's directory (see the module docstring for its layout)."""

    SPARSITY = "sparsity.json"
    PARETO = "pareto.json"
    SPEEDUP = "speedup.json"
    DOWNSTREAM = "downstream.json"
    PARETO_PLOT = "pareto.png"
    ACTIVATION_PLOT = "activation_curve.png"
    CONFIG = "config.yaml"

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def name(self) -> str:
        return self.path.name

    # ------------------------------------------------------------ files

    @property
    def config_file(self) -> Path:
        return self.path / self.CONFIG

    @property
    def identity(self) -> Path:
        return self.path / "run.json"

    @property
    def tokenizer(self) -> Path:
        """tokenizer.model (sentencepiece), or the directory tokenizer/ (Hugging Face)."""
        directory = self.path / "tokenizer"
        return directory if directory.is_dir() else self.path / "tokenizer.model"

    @property
    def data_record(self) -> Path:
        return self.path / "data.json"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def evaluations_dir(self) -> Path:
        return self.path / "evaluations"

    @property
    def sparsity(self) -> Path:
        return self.path / self.SPARSITY

    @property
    def pareto(self) -> Path:
        return self.path / self.PARETO

    @property
    def speedup(self) -> Path:
        """The last `sparsity-scaling speedup` of one of the run's checkpoints."""
        return self.path / self.SPEEDUP

    @property
    def downstream(self) -> Path:
        """The last `sparsity-scaling downstream` of one of the run's checkpoints."""
        return self.path / self.DOWNSTREAM

    @property
    def pareto_plot(self) -> Path:
        return self.path / self.PARETO_PLOT

    @property
    def activation_plot(self) -> Path:
        return self.path / self.ACTIVATION_PLOT

    @property
    def results(self) -> tuple[Path, ...]:
        """The result files kept beside the run's metrics (and as its MLflow artifacts)."""
        return self.sparsity, self.activation_plot, self.pareto, self.pareto_plot

    @property
    def mlflow_run(self) -> Path:
        return self.path / "mlflow_run.json"

    @property
    def mlflow_cursor(self) -> Path:
        return self.path / "mlflow_cursor.json"

    @property
    def mlflow_lock(self) -> Path:
        return self.path / "mlflow.lock"

    @property
    def nodes_dir(self) -> Path:
        return self.path / "nodes"

    @property
    def jobs_dir(self) -> Path:
        return self.path / "jobs"

    @property
    def logs_dir(self) -> Path:
        return self.path / "logs"

    @property
    def failure(self) -> Path:
        return self.path / "failed.json"

    @property
    def trainer_lock(self) -> Path:
        return self.path / "trainer.lock"

    def trainer(self, on_lost=None) -> OwnerLock:
        """The lock of the one process (training rank 0) that trains the run at a time."""
        return OwnerLock(self.trainer_lock, "trainer", on_lost=on_lost)

    def train_log(self, rank: int) -> Path:
        return self.logs_dir / f"train-rank{rank}.log"

    @property
    def evaluation_log(self) -> Path:
        return self.logs_dir / "evaluation.log"

    def job_status(self, job: str) -> Path:
        """Where a running evaluation job (a checkpoint's name, or "stabilised") reports."""
        return self.jobs_dir / f"{job}.json"

    def evaluation_of(self, checkpoint_dir: Path) -> Path:
        """Where the grid's PPL-p% result of the checkpoint in `checkpoint_dir` goes."""
        return self.evaluations_dir / f"{checkpoint_dir.name}.json"

    def evaluation_failure_of(self, checkpoint_dir: Path) -> Path:
        """Where the grid records why the checkpoint in `checkpoint_dir` could not be measured."""
        return self.evaluations_dir / "failed" / f"{checkpoint_dir.name}.json"

    # ------------------------------------------------------------ reading

    def checkpoints(self) -> list[Checkpoint]:
        """Complete checkpoints, oldest first."""
        root = self.checkpoints_dir
        if not root.is_dir():
            return []
        found = [read_checkpoint(p) for p in root.iterdir()
                 if not p.name.startswith(TMP_PREFIX) and is_checkpoint(p)]
        return sorted(found, key=lambda c: c.tokens)

    def metric_points(self) -> list[dict]:
        """metrics.jsonl: {"kind": "train" | "val", "step", "tokens", "loss", ...} in order."""
        if not self.metrics.is_file():
            return []
        return [json.loads(line) for line in self.metrics.read_text().splitlines() if line.strip()]

    def evaluations(self) -> list[dict]:
        """The per-checkpoint PPL-p% results, by training tokens."""
        if not self.evaluations_dir.is_dir():
            return []
        records = (json.loads(f.read_text()) for f in self.evaluations_dir.glob("tokens_*.json"))
        return sorted(records, key=lambda r: r["train_tokens"])

    def evaluation_failures(self) -> list[dict]:
        """Checkpoints the grid could not measure ({"checkpoint", "train_tokens", "error"}), by tokens."""
        records = (json.loads(f.read_text()) for f in (self.evaluations_dir / "failed").glob("tokens_*.json"))
        return sorted(records, key=lambda r: r["train_tokens"])

    def nodes(self) -> list[dict]:
        """The nodes that trained the run ({"node_id", "ip", "since"}), first used first."""
        if not self.nodes_dir.is_dir():
            return []
        return sorted((json.loads(f.read_text()) for f in self.nodes_dir.glob("*.json")), key=lambda n: n["since"])

    def running_jobs(self) -> list[dict]:
        """Status of the evaluation jobs now running (or cut off without a retry)."""
        if not self.jobs_dir.is_dir():
            return []
        found = []
        for f in sorted(self.jobs_dir.glob("*.json")):
            try:
                found.append(json.loads(f.read_text()))
            except (OSError, ValueError):  # removed or replaced meanwhile
                continue
        return found

    def failed(self) -> dict | None:
        """failed.json ({"error", "log"}) if the run's last attempt failed."""
        try:
            return json.loads(self.failure.read_text())
        except (OSError, ValueError):
            return None

    def sparsity_record(self) -> dict | None:
        """sparsity.json (the stabilised curve), or None before evaluate-run wrote it."""
        return _record(self.sparsity, "a sparsity record of evaluate-run",
                       lambda r: r["checkpoints"][0]["activation_ratio"])

    def speedup_record(self) -> dict | None:
        """speedup.json (decode latencies, dense against sparse), or None if never measured."""
        return _record(self.speedup, "a record of sparsity-scaling speedup", lambda r: r["points"][0]["ffn_speedup"])

    def downstream_record(self) -> dict | None:
        """downstream.json (task scores, dense against sparse), or None if never measured."""
        return _record(self.downstream, "a record of sparsity-scaling downstream", lambda r: (r["rows"], r["tasks"]))

    # ------------------------------------------------------------ writing

    def claim(self, config: RunConfig) -> None:
        """Make the directory this run's, or refuse if it holds another run's checkpoints."""
        config_hash = config.hash()
        if self.identity.is_file():
            try:
                theirs = json.loads(self.identity.read_text()).get("config_hash")
            except json.JSONDecodeError:
                theirs = None
            if theirs != config_hash:
                raise SettingError("run_dir", self.path, f"holds another run (config hash {theirs}, "
                                   f"this run {config_hash}); choose a new directory")
            return
        if self.checkpoints():
            raise SettingError("run_dir", self.path, "holds checkpoints of an unknown run; choose a new directory")
        self.path.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.config_file, config.to_yaml())
        write_json_atomic(self.identity, {"config_hash": config_hash})

    def record_data(self, tokenizer: str | Path, record: dict) -> None:
        """Keep the run's tokenizer and what it trained on beside its checkpoints."""
        tokenizer = Path(tokenizer)
        if tokenizer.is_dir():  # a Hugging Face tokenizer: its definition and settings
            target = self.path / "tokenizer"
            target.mkdir(exist_ok=True)
            for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
                if (tokenizer / name).is_file():
                    shutil.copyfile(tokenizer / name, target / name)
        else:
            shutil.copyfile(tokenizer, self.path / "tokenizer.model")
        write_json_atomic(self.data_record, record)

    def mark_failed(self, error: str, log: str | Path | None = None) -> None:
        """Record why the run stopped (failed.json: {"error", "log"}); `failed()` reads it."""
        write_json_atomic(self.failure, {"error": error, "log": None if log is None else str(log)})

    def clear_failure(self) -> None:
        self.failure.unlink(missing_ok=True)

    def record_node(self, node_id: str, ip: str, since: float) -> None:
        """Note that a cluster node trains the run (one file per node: no lock needed)."""
        path = self.nodes_dir / f"{node_id}.json"
        if not path.is_file():
            write_json_atomic(path, {"node_id": node_id, "ip": ip, "since": since})

    def append_metric(self, point: dict) -> None:
        with self.metrics.open("a") as f:
            f.write(json_line(point) + "\n")

    def truncate_metrics_after(self, tokens: int) -> None:
        """Drop points logged after the checkpoint a run resumes from: none appears twice."""
        if self.metrics.exists():
            kept = [p for p in self.metric_points() if p["tokens"] <= tokens]
            write_text_atomic(self.metrics, "".join(json_line(p) + "\n" for p in kept))

    def checkpoint_dir(self, tokens: int) -> Path:
        """Where the complete checkpoint at `tokens` lives."""
        return self.checkpoints_dir / f"tokens_{tokens:015d}"

    def partial_checkpoint(self, tokens: int) -> Path:
        """The temporary directory the checkpoint at `tokens` is written into."""
        return self.checkpoints_dir / f"{TMP_PREFIX}{self.checkpoint_dir(tokens).name}"

    def start_checkpoint(self, tokens: int) -> Path:
        """A fresh `partial_checkpoint(tokens)` (stale leftovers removed).

        Fill it, then call `finish_checkpoint`; until then it is invisible to `checkpoints`,
        and a crash leaves only a `.tmp-` directory that the next start removes.
        """
        tmp = self.partial_checkpoint(tokens)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        return tmp

    def finish_checkpoint(self, tmp: Path, manifest: dict) -> Checkpoint:
        """Checksum the files, write the manifest, and rename the directory into place."""
        files = {str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        write_json_atomic(tmp / MANIFEST, {**manifest, "files": files})
        final = tmp.with_name(tmp.name.removeprefix(TMP_PREFIX))
        if final.exists():  # the same checkpoint again (a rerun of the same step): keep the old
            shutil.rmtree(tmp)
        else:
            os.rename(tmp, final)
        return read_checkpoint(final)

    def drop_engine_states(self, keep: int) -> list[Checkpoint]:
        """Remove the DeepSpeed state of all but the newest `keep` (>= 1) complete checkpoints.

        The weights stay (evaluation and export need only them). The manifest stops listing
        the engine's files before they are deleted, so an interrupted removal leaves a
        checkpoint whose manifest is still true; the next call removes the leftovers.
        """
        dropped = []
        for checkpoint in self.checkpoints()[:-keep]:
            if checkpoint.has_engine:
                files = {rel: digest for rel, digest in checkpoint.manifest["files"].items()
                         if not rel.startswith(Checkpoint.ENGINE_TAG + "/")}
                write_json_atomic(checkpoint.path / MANIFEST, {**checkpoint.manifest, "files": files})
                dropped.append(checkpoint)
            shutil.rmtree(checkpoint.engine, ignore_errors=True)
        return dropped

    def remove_partial_checkpoints(self) -> None:
        """Delete leftovers of interrupted writes (never a complete checkpoint)."""
        if self.checkpoints_dir.is_dir():
            for path in self.checkpoints_dir.iterdir():
                if path.name.startswith(TMP_PREFIX):
                    shutil.rmtree(path, ignore_errors=True)


def _record(path: Path, what: str, check) -> dict | None:
    """A JSON record of the run, or None if it was never written; `check(record)` reads the
    fields its readers rely on, so a file of another kind is one clear error."""
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        check(record)
    except (ValueError, KeyError, TypeError, IndexError) as error:
        raise UserError(f"{path}: not {what} ({error})") from None
    return record
