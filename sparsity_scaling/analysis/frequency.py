"""Neuron activation frequency: for every neuron, the share of tokens on which it is active.

Distributions are compared per dataset over all layers together and for the first, middle
and last layer (relative positions, so models of different depths line up), across models
and across datasets, with the Wasserstein-1 distance between the per-neuron frequencies.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np
from matplotlib.figure import Figure
from scipy.stats import wasserstein_distance

from ..parallel import init_parallel
from .activity import Activity, measure_activity
from .models import ModelSpec, load_datasets, model_and_rule
from .output import is_rank0, write_results
from .settings import AnalysisSettings

VIEWS = ("all", "first", "middle", "last")
VIEW_TITLES = {"all": "all layers", "first": "first layer", "middle": "middle layer", "last": "last layer"}


def views(frequency: np.ndarray) -> dict[str, np.ndarray]:
    """Per-neuron frequencies [layers, d_f] of all layers pooled, and of three single layers.

    Pooling all neurons is the histogram averaged over layers (every layer has d_f neurons).
    """
    layers = frequency.shape[0]
    return {"all": frequency.ravel(), "first": frequency[0], "middle": frequency[layers // 2],
            "last": frequency[-1]}


def view_layer(view: str, layers: int) -> int | None:
    return {"all": None, "first": 0, "middle": layers // 2, "last": layers - 1}[view]


def distances(samples: dict[str, np.ndarray]) -> list[dict]:
    """Wasserstein-1 distance between every pair of frequency samples."""
    return [{"a": a, "b": b, "wasserstein": float(wasserstein_distance(samples[a], samples[b]))}
            for a, b in combinations(samples, 2)]


def frequency_report(results: dict[str, dict[str, Activity]], bins: int = 50) -> dict:
    """{model: {dataset: Activity}} -> frequencies, histograms and distances (JSON-ready)."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    freq = {m: {d: a.frequency() for d, a in by_data.items()} for m, by_data in results.items()}
    models = {}
    for model, by_data in results.items():
        models[model] = {}
        for dataset, activity in by_data.items():
            f = freq[model][dataset]
            models[model][dataset] = {
                "tokens": activity.tokens,
                "activation_ratio": activity.activation_ratio,
                "layer_activation_ratios": activity.layer_ratios(),
                "sparse_ppl": activity.ppl,
                "histograms": {v: (np.histogram(x, edges)[0] / x.size).tolist() for v, x in views(f).items()},
                "view_layers": {v: view_layer(v, f.shape[0]) for v in VIEWS},
                "neuron_frequency": np.round(f, 7).tolist(),
            }
    datasets = list(dict.fromkeys(d for by_data in results.values() for d in by_data))
    between_models = {
        d: {v: distances({m: views(freq[m][d])[v] for m in results if d in freq[m]}) for v in VIEWS}
        for d in datasets
    }
    between_datasets = {
        m: {v: distances({d: views(f)[v] for d, f in freq[m].items()}) for v in VIEWS} for m in results
    }
    return {"bin_edges": np.round(edges, 10).tolist(), "models": models,
            "wasserstein": {"between_models": between_models, "between_datasets": between_datasets}}


def frequency_figure(report: dict, setting: str = "") -> Figure:
    """Rows: datasets; columns: all layers, first, middle, last; one line per model, its
    legend entry carrying its Wasserstein distance to the first model."""
    edges = np.array(report["bin_edges"])
    models = report["models"]
    datasets = list(dict.fromkeys(d for by_data in models.values() for d in by_data))
    figure = Figure(figsize=(4.2 * len(VIEWS), 3.3 * len(datasets)), layout="constrained")
    axes = figure.subplots(len(datasets), len(VIEWS), squeeze=False)
    for row, dataset in zip(axes, datasets):
        pairs = report["wasserstein"]["between_models"][dataset]
        for ax, view in zip(row, VIEWS):
            present = [m for m in models if dataset in models[m]]
            for model in present:
                label = model
                if model != present[0]:
                    d = next(p["wasserstein"] for p in pairs[view] if {p["a"], p["b"]} == {present[0], model})
                    label += f" (W\u2081 to {present[0]}: {d:.3f})"
                layer = models[model][dataset]["view_layers"][view]
                if layer is not None:
                    label += f", layer {layer}"
                ax.stairs(models[model][dataset]["histograms"][view], edges, label=label, lw=1.5)
            ax.set_xlabel("activation frequency (share of tokens)")
            ax.set_ylabel("share of neurons")
            ax.set_title(f"{dataset}: {VIEW_TITLES[view]}")
            ax.set_xlim(0, 1)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    figure.suptitle("Neuron activation frequency" + (f" under {setting}" if setting else ""))
    return figure


def frequency_on_rank(settings: AnalysisSettings, specs: list[ModelSpec], bins: int = 50) -> None:
    """`analyze frequency`: every model on every dataset; a collective on every rank."""
    init_parallel(settings.tp)
    results, setting_records = {}, {}
    for spec in specs:
        datasets = load_datasets(settings, spec)
        target, rule, setting_records[spec.label] = model_and_rule(settings, spec)
        results[spec.label] = {name: measure_activity(target, data, rule, f"{spec.label}: {name}")
                               for name, data in datasets.items()}
    if is_rank0():
        report = {"settings": setting_records, **frequency_report(results, bins)}
        write_results(settings, "frequency", report, frequency_figure(report, settings.describe()))
