"""Token-wise activation ratio: the mean activation ratio over the occurrences of each
vocabulary token, per model, and how two models with the same tokenizer compare."""

from __future__ import annotations

from itertools import combinations

import numpy as np
from matplotlib.figure import Figure
from scipy.stats import pearsonr, spearmanr

from ..errors import SettingError, UserError
from ..parallel import init_parallel
from .activity import Activity, measure_activity
from .models import ModelSpec, Vocabulary, model_and_rule, one_dataset, vocabulary
from .output import is_rank0, write_results
from .settings import AnalysisSettings


def check_same_tokenizer(vocabs: dict[str, Vocabulary]) -> None:
    labels = list(vocabs)
    for label in labels[1:]:
        if vocabs[label].pieces != vocabs[labels[0]].pieces:
            raise UserError(f"analyze tokens: {labels[0]} and {label} have different tokenizers; "
                            f"token-wise ratios compare models with the same tokenizer")


def token_report(results: dict[str, Activity], vocab: Vocabulary, min_count: int = 5, top: int = 20) -> dict:
    """Per model, every token seen with its count and ratio; per pair of models, the
    correlation over tokens seen at least `min_count` times and the tokens differing most."""
    models = {}
    for model, activity in results.items():
        ratios = activity.token_ratios()
        seen = np.flatnonzero(activity.token_count > 0)
        models[model] = {
            "tokens": activity.tokens, "activation_ratio": activity.activation_ratio,
            "token_ratios": [{"id": int(i), "token": vocab.text(int(i)), "count": int(activity.token_count[i]),
                              "ratio": float(ratios[i])} for i in seen[np.argsort(-ratios[seen], kind="stable")]],
        }
    comparisons = []
    for a, b in combinations(results, 2):
        first, second = results[a], results[b]
        counts = np.minimum(first.token_count, second.token_count)
        ids = np.flatnonzero(counts >= min_count)
        if len(ids) < 3:
            raise SettingError("min_count", min_count, f"fewer than 3 tokens occur this often in the data of "
                               f"both {a} and {b}; use more data or a lower count")
        x, y = first.token_ratios()[ids], second.token_ratios()[ids]
        order = np.argsort(-np.abs(y - x), kind="stable")[:top]
        comparisons.append({
            "a": a, "b": b, "min_count": min_count, "tokens_compared": int(len(ids)),
            "pearson": float(pearsonr(x, y).statistic), "spearman": float(spearmanr(x, y).statistic),
            "mean_difference": float(np.mean(y - x)),
            "points": {"id": ids.tolist(), "a": x.tolist(), "b": y.tolist()},
            "most_different": [{"id": int(ids[k]), "token": vocab.text(int(ids[k])), "count": int(counts[ids[k]]),
                                "a": float(x[k]), "b": float(y[k]), "difference": float(y[k] - x[k])}
                               for k in order],
        })
    return {"min_count": min_count, "models": models, "comparisons": comparisons}


def _quoted(token: str) -> str:
    return f"'{token}'"  # already readable (Vocabulary.text): no second escaping


def _mark_tokens(ax, xs, ys, lines: list[str], label: str) -> None:
    """Number the named points on the plot and list them beside it (labels on the points
    themselves overlap where the points cluster)."""
    ax.scatter(xs, ys, s=40, facecolors="none", edgecolors="tab:red", lw=1.2, label=label)
    for n, (x, y) in enumerate(zip(xs, ys), 1):
        ax.annotate(str(n), (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7, color="tab:red")
    listing = "\n".join(f"{n:>2} {line}" for n, line in enumerate(lines, 1))
    ax.text(1.03, 1.0, listing, transform=ax.transAxes, va="top", fontsize=7, family="monospace")


def tokens_figure(report: dict, label_count: int = 8) -> Figure:
    """One panel per pair of models (scatter against y = x), or, for a single model, its
    token ratios against how often the token occurs."""
    comparisons = report["comparisons"]
    panels = max(1, len(comparisons))
    figure = Figure(figsize=(8 * panels, 5), layout="constrained")
    axes = figure.subplots(1, panels, squeeze=False)[0]
    if not comparisons:
        (model, data), = report["models"].items()
        rows = data["token_ratios"]
        frequent = [r for r in rows if r["count"] >= report["min_count"]]
        ax = axes[0]
        ax.scatter([r["count"] for r in rows], [r["ratio"] for r in rows], s=8, alpha=0.6,
                   label=f"tokens ({len(rows)})")
        ax.axhline(data["activation_ratio"], color="grey", ls="--", lw=1,
                   label=f"overall activation ratio {data['activation_ratio']:.3f}")
        half = label_count // 2
        shown = frequent[:half] + frequent[-half:] if len(frequent) > label_count else frequent
        _mark_tokens(ax, [r["count"] for r in shown], [r["ratio"] for r in shown],
                     [f"{_quoted(r['token']):<14} {r['ratio']:.3f} ({r['count']}x)" for r in shown],
                     f"highest and lowest ratios (tokens seen \u2265 {report['min_count']} times)")
        ax.set(xscale="log", xlabel="occurrences of the token", ylabel="mean activation ratio on the token",
               title=f"{model}: activation ratio by token")
        ax.legend(fontsize=8)
        return figure
    for ax, c in zip(axes, comparisons):
        x, y = np.array(c["points"]["a"]), np.array(c["points"]["b"])
        ax.scatter(x, y, s=8, alpha=0.6, label=f"tokens seen \u2265 {c['min_count']} times ({c['tokens_compared']})")
        low, high = min(x.min(), y.min()), max(x.max(), y.max())
        ax.plot([low, high], [low, high], color="grey", ls="--", lw=1, label="y = x")
        shown = c["most_different"][:label_count]
        _mark_tokens(ax, [r["a"] for r in shown], [r["b"] for r in shown],
                     [f"{_quoted(r['token']):<14} {r['a']:.3f} -> {r['b']:.3f}" for r in shown], "most different")
        ax.set(xlabel=f"activation ratio on the token: {c['a']}", ylabel=f"activation ratio on the token: {c['b']}",
               title=f"Pearson r = {c['pearson']:.3f}, Spearman \u03c1 = {c['spearman']:.3f}")
        ax.legend(fontsize=8, loc="best")
    figure.suptitle("Token-wise activation ratio")
    return figure


def tokens_on_rank(settings: AnalysisSettings, specs: list[ModelSpec], min_count: int = 5, top: int = 20) -> None:
    """`analyze tokens`: every model on one dataset; a collective on every rank."""
    init_parallel(settings.tp)
    results, setting_records = {}, {}
    for spec in specs:
        data = one_dataset(settings, spec)
        target, rule, setting_records[spec.label] = model_and_rule(settings, spec)
        results[spec.label] = measure_activity(target, data, rule, spec.label)
    if is_rank0():
        report = {"settings": setting_records, **token_report(results, vocabulary(specs[0]), min_count, top)}
        write_results(settings, "tokens", report, tokens_figure(report))
