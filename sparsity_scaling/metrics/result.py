"""One output schema for every sparsity measurement, and the reusable thresholds artifact."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..model.probe import ThresholdNeurons
from .comm import gather_neurons, local_slice


@dataclass
class SparsityResult:
    metric: str
    params: dict
    activation_ratio: float
    layer_activation_ratios: list[float]
    dense_ppl: float
    sparse_ppl: float
    ppl_ratio: float
    tokens: int
    forward_passes: float
    seconds: float
    cett: float | None = None
    thresholds: list[float] | None = None  # per-layer eps (CETT metrics)
    converged: bool | None = None  # PPL-p%: whether the search met its tolerance (None: no search)
    extra: dict = field(default_factory=dict)

    @property
    def sparsity_ratio(self) -> float:
        return 1.0 - self.activation_ratio

    def convergence_warning(self) -> str | None:
        """A line for the user when a PPL-p% search ran out of steps, else None."""
        if self.converged is not False:
            return None
        return unconverged_warning(f"the PPL-{self.params['p']:g}% search", self.extra.get("activation_gap"))

    def to_dict(self) -> dict:
        return {**asdict(self), "sparsity_ratio": self.sparsity_ratio}


def unconverged_warning(what: str, activation_gap: float | None) -> str:
    """The line a user sees when a PPL-ratio search ran out of steps."""
    if activation_gap is None:
        return (f"warning: {what} did not converge: it never bracketed the target PPL ratio, so the "
                f"reported activation ratio may be far from the one at the target")
    return (f"warning: {what} did not converge: its bracket's activation ratios are still {activation_gap:.4f} "
            f"apart after its last step, so the reported activation ratio is uncertain by up to that much")


def thresholds_artifact(neuron_thresholds: dict[int, torch.Tensor], key: dict) -> dict:
    """Full per-neuron thresholds (gathered across TP) with what they were computed for."""
    layers = {str(k): gather_neurons(v.float()).tolist() for k, v in sorted(neuron_thresholds.items())}
    return {"key": key, "rule": "|a_i| >= threshold_i", "thresholds": layers}


def load_thresholds(path: str | Path) -> ThresholdNeurons:
    """A probe that applies saved thresholds to a model of any TP size (for later inference)."""
    return thresholds_probe(json.loads(Path(path).read_text()))


def thresholds_probe(artifact: dict) -> ThresholdNeurons:
    """The probe of a thresholds artifact already read (see `thresholds_artifact`)."""
    return ThresholdNeurons(
        {int(k): local_slice(torch.tensor(v)) for k, v in artifact["thresholds"].items()}
    )
