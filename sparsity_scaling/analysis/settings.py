"""What every analysis shares, as typed settings: where its results go, the sparsity setting
that says which neurons are active, and the data it runs on."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

from ..errors import SettingError
from ..evaluation.settings import DataSettings, MetricSettings

# Publishes written result files elsewhere (an MLflow run): (files, [(metric, value, step)]).
Publisher = Callable[[Sequence[Path], Sequence[tuple[str, float, int]]], None]


def named(text: str) -> tuple[str, str]:
    """'NAME=PATH' -> (NAME, PATH); a plain PATH (or one that exists as written) -> ('', PATH)."""
    if "=" in text and not Path(text).exists():
        name, path = text.split("=", 1)
        return name, path
    return "", text


@dataclass(frozen=True)
class Dataset:
    """One named dataset: validation text or tokens (see DataSettings)."""

    name: str
    path: str
    kind: str  # "text_file" or "tokens", as in DataSettings

    def settings(self, base: DataSettings) -> DataSettings:
        return replace(base, **{"text_file": None, "tokens": None, self.kind: self.path})


def parse_datasets(texts: Sequence[str] = (), tokens: Sequence[str] = ()) -> tuple[Dataset, ...]:
    """Datasets from '[NAME=]FILE' strings (the name defaults to the file's stem)."""
    out = []
    for kind, items in (("text_file", texts), ("tokens", tokens)):
        for item in items:
            name, path = named(item)
            if not Path(path).is_file():
                raise SettingError(kind, path, "no such file")
            out.append(Dataset(name or Path(path).stem, path, kind))
    names = [d.name for d in out]
    if len(set(names)) != len(names):
        raise SettingError("text_file", None, f"dataset names must differ ({', '.join(names)}); name them NAME=FILE")
    return tuple(out)


@dataclass(frozen=True)
class AnalysisSettings:
    """The settings every analysis takes."""

    out: str
    """The directory for the analysis' JSON and PNG."""
    metric: MetricSettings | None
    """The sparsity setting; None where every model brings saved per-neuron thresholds."""
    data: DataSettings = DataSettings()
    """Token counts and sequence length; its text/tokens are ignored (see `datasets`)."""
    datasets: tuple[Dataset, ...] = ()
    """The data to analyse; none: a checkpoint's own validation split."""
    tp: int = 1
    """Tensor-parallel ranks (each model is sharded over them)."""
    publish: Publisher | None = None
    """Where results go besides `out` (an MLflow run), called on rank 0."""

    def __post_init__(self):
        if self.tp < 1:
            raise SettingError("tp", self.tp, "must be at least 1")

    @property
    def first_data(self) -> DataSettings:
        """The first dataset (the one a single-dataset analysis and the threshold search
        use), or none: a checkpoint's validation split."""
        return self.datasets[0].settings(self.data) if self.datasets else self.data

    def single_dataset(self, analysis: str) -> None:
        if len(self.datasets) > 1:
            raise SettingError("text_file", None, f"analyze {analysis} takes one dataset")

    def describe(self) -> str:
        """The sparsity setting in a few words, for plot titles."""
        return "saved thresholds" if self.metric is None else self.metric.describe()
