"""Activation-pattern analyses against direct computation on tiny models: our trained micro
model (TP 1 and 2) and random Hugging Face models (batch-first and flattened layouts)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import wasserstein_distance

from helpers import mlflow_run_dir, run_here
from distributed import run_ranks
from sparsity_scaling.model import Probe
from sparsity_scaling.rundir import RunDir

# 12 sequences of 64 predicted tokens: 768 tokens, fewer than 1000, so a neuron active on
# fewer than 0.1% of them (the default dead threshold) is active on none.
SEQUENCES = 12
HF_VOCAB = 100
HEATMAP_TEXT = "def add(a, b):\n    return a + b\n"


def _validation_tokens(run: Path, sequences: int, path: Path) -> Path:
    """`sequences` validation sequences from the run's own split, as a user would pass with --tokens."""
    from sparsity_scaling.config import load_config
    from sparsity_scaling.data.pipeline import prepare_data
    from sparsity_scaling.data.indexed import open_token_stream

    config = load_config(run / "config.yaml")
    stream = open_token_stream(prepare_data(config.data).valid[0])
    length = config.data.seq_len + 1
    np.save(path, np.asarray(stream[: sequences * length], dtype=np.int64).reshape(sequences, length))
    return path


@pytest.fixture(scope="module")
def tokens_file(micro_run, tmp_path_factory) -> Path:
    return _validation_tokens(micro_run, SEQUENCES, tmp_path_factory.mktemp("tokens") / "valid.npy")


@pytest.fixture(scope="module")
def pareto_tokens(micro_run, tmp_path_factory) -> Path:
    """Twice the sequences: on 12, the micro model's PPL ratio is not monotone in CETT where a
    search ends (seen: 1.00515 at CETT 0.0415 and below 1.005 at 0.044), so two searches can
    stop at different crossings of 1 + p/100, each converged; on 24 they agree within 4e-4."""
    return _validation_tokens(micro_run, 2 * SEQUENCES, tmp_path_factory.mktemp("tokens") / "pareto.npy")


def _word_tokenizer():
    """A tiny word-level Hugging Face tokenizer (w0 ... w97), built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<eos>", "<unk>"] + [f"w{i}" for i in range(HF_VOCAB - 2)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory) -> dict[str, Path]:
    """Random Llama (gated FFN, [batch, seq, d_f]) and OPT (plain FFN, [batch * seq, d_f])."""
    from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    made = {
        "llama": LlamaForCausalLM(LlamaConfig(vocab_size=HF_VOCAB, hidden_size=32, intermediate_size=48,
                                              num_hidden_layers=3, num_attention_heads=4)),
        "opt": OPTForCausalLM(OPTConfig(vocab_size=HF_VOCAB, hidden_size=32, ffn_dim=48, num_hidden_layers=3,
                                        num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=64)),
    }
    paths = {}
    for name, model in made.items():
        paths[name] = tmp_path_factory.mktemp(name)
        model.save_pretrained(paths[name])
        _word_tokenizer().save_pretrained(paths[name])
    return paths


# ---------------------------------------------------------------- direct computation


def _direct(target, sequences: torch.Tensor, keep, seq_first: bool) -> dict:
    """One forward pass over all sequences with the rule applied by hand (`keep(trace)` ->
    bool mask); the masks of every layer as [batch, seq, d_f], reduced the obvious way."""
    inputs = sequences[:, :-1]
    batch, seq = inputs.shape
    masks, gate_max = {}, {}

    class ApplyAndRecord(Probe):
        def on_activation(self, ffn, trace):
            mask = keep(trace)
            masks[trace.layer] = mask.transpose(0, 1) if seq_first else mask.reshape(batch, seq, -1)
            gate_max[trace.layer] = trace.gate.reshape(-1, trace.gate.shape[-1]).amax(0)
            return trace.activation * mask

    with torch.no_grad(), target.probing(ApplyAndRecord()):
        target.token_losses(inputs, sequences[:, 1:])
    m = torch.stack([masks[k] for k in sorted(masks)]).double()  # [layers, batch, seq, d_f]
    layers, width = m.shape[0], m.shape[-1]
    per_entry = m.sum(-1).sum(0).flatten().numpy()  # active (layer, neuron) pairs per token
    ids = inputs.flatten().numpy()
    count = np.bincount(ids, minlength=target.vocab_size)
    with np.errstate(invalid="ignore"):
        token_ratios = np.bincount(ids, weights=per_entry, minlength=target.vocab_size) / (count * layers * width)
    return {
        "frequency": (m.sum((1, 2)) / (batch * seq)).numpy(),
        "token_ratios": token_ratios,
        "position_ratios": (m.sum(-1).sum(1) / (batch * width)).numpy(),
        "gate_max": torch.stack([gate_max[k] for k in sorted(gate_max)]).numpy(),
        "tokens": batch * seq,
    }


def _sequences(tokens_path) -> torch.Tensor:
    return torch.from_numpy(np.load(tokens_path))


def _single_rank(checkpoints: list[Path], tokens_path: Path, hf_dirs: dict[str, Path]) -> dict:
    """Everything measured on one rank, in one spawned process (model loads are shared)."""
    from sparsity_scaling.analysis.activity import measure_activity
    from sparsity_scaling.analysis.models import ModelSpec, vocabulary
    from sparsity_scaling.evaluation.inputs import ModelRef
    from sparsity_scaling.hf import HFCausalLM, load_target
    from sparsity_scaling.metrics.measure import EvalData
    from sparsity_scaling.metrics.rules import FixedThreshold, ReluZero, TopK
    from sparsity_scaling.metrics.search import Evaluator
    from sparsity_scaling.model import ActivationRecorder
    from sparsity_scaling.parallel import init_parallel

    init_parallel(1)
    seqs = _sequences(tokens_path)
    out = {}
    model = load_target(checkpoint=checkpoints[-1])
    rule = Evaluator(model, EvalData(seqs, 4)).cett_rule(0.2)
    out["thresholds"] = rule.thresholds
    out["direct"] = _direct(model, seqs, lambda t: t.activation.abs() >= rule.thresholds[t.layer], True)
    out["one_batch"] = measure_activity(model, EvalData(seqs, SEQUENCES), rule)
    out["batches"] = measure_activity(model, EvalData(seqs, 5), rule)  # 5 + 5 + 2 sequences
    out["single"] = measure_activity(model, EvalData(seqs, 1), rule)
    out["topk"] = measure_activity(model, EvalData(seqs, 5), TopK(k=16))
    out["relu"] = measure_activity(model, EvalData(seqs, 5), ReluZero())
    out["relu_direct"] = _direct(model, seqs, lambda t: t.gate > 0, True)
    # `analyze heatmap --metric relu` recounted: the text's tokens, then any token to predict
    ids = vocabulary(ModelSpec("m", ModelRef(checkpoint=str(checkpoints[-1])))).encode(HEATMAP_TEXT)
    text = torch.tensor([ids + [ids[0]]])
    out["heatmap_direct"] = _direct(model, text, lambda t: t.gate > 0, True)["position_ratios"]

    # a gate threshold that leaves about half of the neurons never reaching it
    gates = _direct(model, seqs, lambda t: torch.ones_like(t.gate, dtype=torch.bool), True)["gate_max"]
    threshold = float(np.median(gates))
    out["gate_threshold"] = threshold
    out["dead_direct"] = {}
    for ck in checkpoints:
        direct = _direct(load_target(checkpoint=ck), seqs, lambda t: t.gate >= threshold, True)
        out["dead_direct"][ck.name] = float((direct["gate_max"] < threshold).mean())
    out["early_relu"] = measure_activity(load_target(checkpoint=checkpoints[0]), EvalData(seqs, 5), ReluZero())

    generator = torch.Generator().manual_seed(3)
    for name, path in hf_dirs.items():
        target = HFCausalLM.load(path)
        hf_seqs = torch.randint(2, HF_VOCAB, (6, 11), generator=generator)
        with target.probing(ActivationRecorder()) as recorder, torch.no_grad():
            target.token_losses(hf_seqs[:, :-1], hf_seqs[:, 1:])
        eps = float(np.quantile(recorder.activations[0].abs().numpy(), 0.75))  # ReLU: half are 0
        out[name] = (measure_activity(target, EvalData(hf_seqs, 4), FixedThreshold(eps=eps)),
                     _direct(target, hf_seqs, lambda t: t.activation.abs() >= eps, False))
    return out


def _tp_ranks(checkpoint: Path, tokens_path: Path, thresholds: dict, tp: int):
    from sparsity_scaling.analysis.activity import measure_activity
    from sparsity_scaling.hf import load_target
    from sparsity_scaling.metrics.comm import local_slice
    from sparsity_scaling.metrics.measure import EvalData
    from sparsity_scaling.metrics.rules import PerNeuronThreshold, TopK
    from sparsity_scaling.parallel import init_parallel

    init_parallel(tp)
    model = load_target(checkpoint=checkpoint, tp=tp)
    data = EvalData(_sequences(tokens_path), 5)
    rule = PerNeuronThreshold(thresholds={k: local_slice(v) for k, v in thresholds.items()})
    return measure_activity(model, data, rule), measure_activity(model, data, TopK(k=16))


@pytest.fixture(scope="module")
def measured(micro_run, tokens_file, hf_models) -> dict:
    checkpoints = [c.path for c in RunDir(micro_run).checkpoints()]
    return run_ranks(1, _single_rank, checkpoints, tokens_file, hf_models)[0]


def _assert_close(activity, expected, exact: bool, tokens: int) -> None:
    """Same counts; `exact` when the forward passes are the same computation, else within a
    couple of flips at the threshold (float rounding differs between batch shapes / TP)."""
    tol = 0 if exact else 2.5 / tokens
    assert activity.tokens == expected["tokens"] == tokens
    assert np.abs(activity.frequency() - expected["frequency"]).max() <= tol
    seen = ~np.isnan(expected["token_ratios"])
    assert np.array_equal(seen, ~np.isnan(activity.token_ratios()))
    assert np.abs(activity.token_ratios()[seen] - expected["token_ratios"][seen]).max() <= max(tol, 1e-12)
    assert np.abs(activity.position_ratios() - expected["position_ratios"]).max() <= max(tol * 2, 1e-12)


# ---------------------------------------------------------------- counts


def test_frequencies_equal_masked_counts_divided_by_tokens(measured):
    direct = measured["direct"]
    tokens = SEQUENCES * 64
    _assert_close(measured["one_batch"], direct, exact=True, tokens=tokens)
    activity = measured["one_batch"]
    assert activity.frequency().shape == (2, 160)
    assert 0.02 < activity.activation_ratio < 0.9  # a real sparsity setting, not all or nothing
    assert activity.activation_ratio == pytest.approx(direct["frequency"].mean(), abs=1e-12)
    assert activity.layer_ratios() == pytest.approx(direct["frequency"].mean(1).tolist(), abs=1e-12)


def test_data_split_into_several_batches_gives_the_same_counts(measured):
    tokens = SEQUENCES * 64
    for split in ("batches", "single"):
        _assert_close(measured[split], measured["direct"], exact=False, tokens=tokens)
    assert np.array_equal(measured["batches"].token_count, measured["one_batch"].token_count)


@pytest.mark.parametrize("name", ["llama", "opt"])
def test_hugging_face_layouts_attribute_counts_to_the_right_tokens(measured, name):
    activity, direct = measured[name]
    _assert_close(activity, direct, exact=False, tokens=60)
    assert 0.2 < activity.activation_ratio < 0.8
    assert activity.position_ratios().shape == (3, 10)


def test_relu_dead_neurons_are_those_whose_gate_never_exceeds_zero(measured):
    from sparsity_scaling.analysis.dead import dead_point

    relu, direct = measured["relu"], measured["relu_direct"]
    point = dead_point(relu, 0.001)
    assert point["dead_neuron_ratio"] == pytest.approx(float((direct["gate_max"] <= 0).mean()))
    assert point["layer_dead_ratios"] == pytest.approx((direct["gate_max"] <= 0).mean(1).tolist())


def test_tensor_parallel_2_gives_the_same_counts(micro_run, tokens_file, measured):
    checkpoint = RunDir(micro_run).checkpoints()[-1].path
    ranks = run_ranks(2, _tp_ranks, checkpoint, tokens_file, measured["thresholds"], 2)
    tokens = SEQUENCES * 64
    for rank in ranks:
        cett, topk = rank
        _assert_close(cett, measured["direct"], exact=False, tokens=tokens)
        assert np.abs(topk.frequency() - measured["topk"].frequency()).max() <= 2.5 / tokens
        assert topk.activation_ratio == pytest.approx(16 / 160)  # exactly k of d_f per token
    assert np.array_equal(ranks[0][0].neuron_active, ranks[1][0].neuron_active)


def _pareto_rank(checkpoint: Path, tokens_path: Path, tp: int) -> dict:
    """The Pareto sweep, and PPL-p% searched for each p alone (no shared points), at TP tp."""
    from sparsity_scaling.analysis.pareto import pareto_points
    from sparsity_scaling.hf import load_target
    from sparsity_scaling.metrics.measure import EvalData
    from sparsity_scaling.metrics.search import Evaluator, ppl_p
    from sparsity_scaling.parallel import init_parallel

    init_parallel(tp)
    target = load_target(checkpoint=checkpoint, tp=tp)
    data = EvalData(_sequences(tokens_path))
    shared = Evaluator(target, data)
    rows = pareto_points(shared, "relu")
    alone = Evaluator(target, data)
    singles = [ppl_p(alone, p).activation_ratio for p in (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)]
    return {"rows": rows, "shared_passes": shared.passes, "alone_passes": alone.passes, "singles": singles,
            "width": target.ffns[0].local_neurons * tp}


def test_pareto_curves_are_monotone_shared_and_the_same_under_tensor_parallelism(micro_run, pareto_tokens):
    checkpoint = RunDir(micro_run).checkpoints()[-1].path
    (one,) = run_ranks(1, _pareto_rank, checkpoint, pareto_tokens, 1)
    ppl = [r for r in one["rows"] if r["method"] == "ppl-p"]
    assert [r["param"] for r in ppl] == [0.25, 0.5, 1.0, 2.0, 4.0, 8.0]
    assert all(abs(r["ppl_ratio"] - (1 + r["param"] / 100)) < 2e-3 for r in ppl)
    activations = [r["activation_ratio"] for r in ppl]
    assert all(a > b for a, b in zip(activations, activations[1:]))  # more PPL allowed, sparser
    # sharing changes no result (each search is within 1e-3 of the exact one)...
    assert activations == pytest.approx(one["singles"], abs=2e-3)
    sweep_passes = one["shared_passes"] - sum(1 for r in one["rows"] if r["method"] != "ppl-p")
    assert sweep_passes < one["alone_passes"]  # ...only what it costs
    for row in one["rows"]:
        if row["method"] == "topk":
            assert row["activation_ratio"] == pytest.approx(row["param"] / one["width"])
    assert {r["method"] for r in one["rows"]} == {"ppl-p", "topk", "fat", "top-p", "relu"}
    two = run_ranks(2, _pareto_rank, checkpoint, pareto_tokens, 2)
    assert two[0]["rows"] == two[1]["rows"]
    for a, b in zip(one["rows"], two[0]["rows"]):
        assert a["method"] == b["method"] and (a["param"] is None) == (b["param"] is None)
        if a["param"] is not None:
            assert a["param"] == pytest.approx(b["param"], rel=1e-5)
        assert a["activation_ratio"] == pytest.approx(b["activation_ratio"], abs=2e-3)


# ---------------------------------------------------------------- reports and plots


def _texts(legend) -> list[str]:
    return [t.get_text() for t in legend.get_texts()]


def _png(path: Path) -> np.ndarray:
    """The PNG decoded as [height, width, RGB] bytes, checked to be a drawn figure: not
    blank, and more than a few colours (text and lines are antialiased)."""
    from matplotlib.image import imread

    rgb = np.round(imread(path)[..., :3] * 255).astype(np.int16)
    assert (rgb < 240).any(-1).mean() > 0.01, "blank"
    assert len(np.unique(rgb.reshape(-1, 3), axis=0)) > 50
    return rgb


def _pixels_of(rgb: np.ndarray, colour) -> int:
    """How many pixels are `colour` (a matplotlib colour), within 2 levels a channel."""
    from matplotlib.colors import to_rgb

    return int((np.abs(rgb - np.round(np.array(to_rgb(colour)) * 255)) <= 2).all(-1).sum())


def test_frequency_report_and_figure(measured, tmp_path):
    from sparsity_scaling.analysis.frequency import frequency_figure, frequency_report

    results = {"early": {"code": measured["early_relu"], "other": measured["one_batch"]},
               "late": {"code": measured["relu"], "other": measured["batches"]}}
    report = frequency_report(results, bins=20)
    late = report["models"]["late"]["code"]
    assert np.allclose(late["neuron_frequency"], measured["relu"].frequency(), atol=1e-6)
    for histogram in late["histograms"].values():
        assert sum(histogram) == pytest.approx(1.0)
    assert late["view_layers"] == {"all": None, "first": 0, "middle": 1, "last": 1}
    (pair,) = report["wasserstein"]["between_models"]["code"]["all"]
    expected = wasserstein_distance(measured["early_relu"].frequency().ravel(), measured["relu"].frequency().ravel())
    assert (pair["a"], pair["b"]) == ("early", "late") and pair["wasserstein"] == pytest.approx(expected)
    (pair,) = report["wasserstein"]["between_datasets"]["late"]["first"]
    assert pair["wasserstein"] == pytest.approx(
        wasserstein_distance(measured["relu"].frequency()[0], measured["batches"].frequency()[0]))

    figure = frequency_figure(report, "test setting")
    axes = figure.axes
    assert len(axes) == 8  # 2 datasets x (all, first, middle, last)
    assert {a.get_title() for a in axes} >= {"code: all layers", "other: last layer"}
    for ax in axes:
        assert ax.get_xlabel() == "activation frequency (share of tokens)"
        assert ax.get_ylabel() == "share of neurons"
        texts = _texts(ax.get_legend())
        assert texts[0].startswith("early") and texts[1].startswith("late (W\u2081 to early: ")
    from sparsity_scaling.figures import save_figure

    save_figure(figure, tmp_path / "frequency.png")  # as `analyze` writes it: 110 dpi, cropped to what is drawn
    rgb = _png(tmp_path / "frequency.png")
    width, height = figure.get_size_inches() * 110
    assert rgb.shape[:2] == pytest.approx((height, width), abs=0.3 * 110)
    # both models' lines drawn (matplotlib's first two colours), not only their legend entries
    assert _pixels_of(rgb, "C0") > 2000 and _pixels_of(rgb, "C1") > 2000


def test_token_report_and_figure(measured, micro_run):
    from sparsity_scaling.analysis.models import ModelSpec, vocabulary
    from sparsity_scaling.evaluation.inputs import ModelRef
    from sparsity_scaling.analysis.tokens import token_report, tokens_figure

    vocab = vocabulary(ModelSpec("m", ModelRef(checkpoint=str(RunDir(micro_run).checkpoints()[-1].path))))
    early, late = measured["early_relu"], measured["relu"]
    report = token_report({"early": early, "late": late}, vocab, min_count=3, top=5)
    (comparison,) = report["comparisons"]
    ids = np.flatnonzero(np.minimum(early.token_count, late.token_count) >= 3)
    assert comparison["points"]["id"] == ids.tolist()
    x, y = early.token_ratios()[ids], late.token_ratios()[ids]
    assert comparison["pearson"] == pytest.approx(np.corrcoef(x, y)[0, 1])
    differences = [abs(r["difference"]) for r in comparison["most_different"]]
    assert differences == sorted(differences, reverse=True) and differences[0] == pytest.approx(np.abs(y - x).max())
    top = comparison["most_different"][0]
    assert top["token"] == vocab.text(top["id"]) and top["token"]
    rows = report["models"]["late"]["token_ratios"]
    assert sum(r["count"] for r in rows) == late.tokens

    figure = tokens_figure(report)
    (ax,) = figure.axes
    assert ax.get_xlabel() == "activation ratio on the token: early"
    assert ax.get_ylabel() == "activation ratio on the token: late"
    assert "Pearson r" in ax.get_title()
    assert "y = x" in _texts(ax.get_legend())
    assert any(f"'{top['token']}'" in t.get_text() for t in ax.texts)  # the most different token is named

    single = tokens_figure(token_report({"late": late}, vocab))
    assert single.axes[0].get_xlabel() == "occurrences of the token" and single.axes[0].get_legend()


def test_dead_and_heatmap_figures(measured):
    from sparsity_scaling.analysis.dead import dead_figure
    from sparsity_scaling.analysis.heatmap import heatmap_figure

    report = {"run": "micro", "dead_below": 0.001, "setting_text": "PPL-1% of each checkpoint",
              "checkpoints": [{"tokens": t, "dead_neuron_ratio": d, "activation_ratio": a}
                              for t, d, a in ((4096, 0.1, 0.3), (32768, 0.2, 0.2))],
              "run_curve": {"tokens": [4096, 32768], "activation_ratio": [0.31, 0.21]}}
    figure = dead_figure(report)
    left, right = figure.axes
    assert (left.get_xlabel(), left.get_ylabel(), right.get_ylabel()) == (
        "training tokens", "dead-neuron ratio", "activation ratio")
    assert _texts(left.get_legend()) == [
        "dead neurons (active on < 0.001 of tokens)", "activation ratio (PPL-1% of each checkpoint)",
        "activation ratio (RUN/sparsity.json, stabilised)"]

    ratios = measured["direct"]["position_ratios"][:, :5]  # counted here, not by the analysis
    figure = heatmap_figure(ratios, ["a", "b", "c", "d", "e"], "title")
    ax = figure.axes[0]
    assert np.array_equal(ax.images[0].get_array(), ratios)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "c", "d", "e"]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("token (position in the text)", "layer")
    assert figure.axes[1].get_ylabel() == "activation ratio (share of active neurons)"  # colour bar


# ---------------------------------------------------------------- the command line


def test_analyze_frequency_cli_overlays_models_and_datasets(micro_run, tmp_path):
    from sparsity_scaling.data.corpus import stdlib_documents

    docs = list(stdlib_documents())
    code = next(d.text for d in docs if d.id == "code/json/decoder.py")
    prose = "\n\n".join(d.text for d in docs if d.kind == "doc")[:20000]
    (tmp_path / "code.txt").write_text(code)
    (tmp_path / "prose.txt").write_text(prose)
    first, last = RunDir(micro_run).checkpoints()[0].path, RunDir(micro_run).checkpoints()[-1].path
    out = tmp_path / "out"
    result = run_here("analyze", "frequency", f"early={first}", f"late={last}", "--data", f"code={tmp_path / 'code.txt'}",
                     "--data", f"prose={tmp_path / 'prose.txt'}", "--eval-tokens", "768", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "frequency.json").read_text())
    assert list(report["models"]) == ["early", "late"]
    for label in ("early", "late"):
        setting = report["settings"][label]
        assert setting["metric"] == "ppl-p" and setting["ppl_ratio"] == pytest.approx(1.01, abs=3e-3)
        assert list(report["models"][label]) == ["code", "prose"]
        code_result = report["models"][label]["code"]
        # the evaluator searched on the first dataset: the same activation ratio here
        assert code_result["activation_ratio"] == pytest.approx(setting["activation_ratio"], abs=1e-9)
        assert np.array(code_result["neuron_frequency"]).shape == (2, 160)
    pairs = report["wasserstein"]["between_datasets"]["late"]["all"]
    assert [(p["a"], p["b"]) for p in pairs] == [("code", "prose")] and pairs[0]["wasserstein"] > 0
    rgb = _png(out / "frequency.png")
    assert rgb.shape[1] > 2 * rgb.shape[0]  # 2 datasets by 4 views of the layers
    assert _pixels_of(rgb, "C0") > 2000 and _pixels_of(rgb, "C1") > 2000  # early's and late's lines


def test_analyze_dead_cli_matches_gates_and_logs_to_mlflow(micro_run, tokens_file, measured, tmp_path):
    mlflow, run_id, grid_run = mlflow_run_dir(tmp_path)
    out = tmp_path / "out"
    threshold = measured["gate_threshold"]
    result = run_here("analyze", "dead", str(micro_run), "--tokens", str(tokens_file), "--metric", "fat",
                     "--site", "gate", "--value", repr(threshold), "--out", str(out), "--mlflow-run", str(grid_run))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "dead.json").read_text())
    checkpoints = RunDir(micro_run).checkpoints()
    assert [p["tokens"] for p in report["checkpoints"]] == [c.tokens for c in checkpoints]
    for point in report["checkpoints"]:
        assert point["dead_neuron_ratio"] == pytest.approx(measured["dead_direct"][point["checkpoint"]], abs=1 / 320)
    assert 0.3 < report["checkpoints"][-1]["dead_neuron_ratio"] < 0.7  # the threshold was the median
    history = sorted((m.step, m.value) for m in mlflow.get_metric_history(run_id, "dead_neuron_ratio"))
    assert [step for step, _ in history] == [p["tokens"] for p in report["checkpoints"]]
    assert [value for _, value in history] == pytest.approx([p["dead_neuron_ratio"] for p in report["checkpoints"]])
    assert sorted(a.path for a in mlflow.list_artifacts(run_id, "analysis")) == ["analysis/dead.json", "analysis/dead.png"]


def test_analyze_heatmap_cli_labels_positions_with_the_text_tokens(micro_run, measured, tmp_path):
    from matplotlib import colormaps

    from sparsity_scaling.analysis.models import ModelSpec, vocabulary
    from sparsity_scaling.evaluation.inputs import ModelRef

    checkpoint = RunDir(micro_run).checkpoints()[-1].path
    text = HEATMAP_TEXT
    out = tmp_path / "out"
    result = run_here("analyze", "heatmap", str(checkpoint), "--text", text, "--metric", "relu", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "heatmap.json").read_text())
    vocab = vocabulary(ModelSpec("m", ModelRef(checkpoint=str(checkpoint))))
    assert report["ids"] == vocab.encode(text)
    assert report["tokens"] == [vocab.text(i) for i in report["ids"]]
    ratios = np.array(report["layer_position_ratios"])
    assert ratios.shape == (2, len(report["ids"])) and ((ratios > 0) & (ratios < 1)).all()
    # the gates' positives counted here, by layer and position (within a neuron's flip)
    assert np.abs(ratios - measured["heatmap_direct"]).max() <= 1.5 / 160
    assert report["activation_ratio"] == pytest.approx(measured["heatmap_direct"].mean(), abs=1 / 160)
    # the PNG shows each cell in viridis on the colour bar's scale, 0 to the largest ratio
    rgb = _png(out / "heatmap.png")
    cells = colormaps["viridis"](ratios / ratios.max())
    drawn = [_pixels_of(rgb, colour[:3]) for colour in cells.reshape(-1, 4)]
    assert min(drawn) > 1000, drawn  # a cell is about 4,800 pixels here


@pytest.mark.parametrize("args, message", [
    (["tokens", "{ck}", "{hf}", "--data", "{text}"], "have different tokenizers"),
    (["frequency", "{ck}", "--data", "{empty}", "--metric", "relu"], "no text"),
    (["pareto", "{ck}", "--p-values", "0,1"], "--p-values 0,1: expected percentages in (0, 100]"),
    (["heatmap", "{ck}", "--metric", "relu"], "give exactly one of --text and --text-file"),
    (["frequency", "{ck}", "--data", "{text}", "--site", "gate", "--metric", "topk"], "--metric topk needs --value"),
])
def test_bad_input_is_one_line(micro_run, hf_models, tmp_path, capsys, args, message):
    """Each stops with one line naming the problem (main() prints it; exit status 2)."""
    from sparsity_scaling.cli import main

    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "text.txt").write_text("w1 w2 w3 " * 50)
    paths = {"ck": RunDir(micro_run).checkpoints()[-1].path, "hf": hf_models["llama"],
             "empty": tmp_path / "empty.txt", "text": tmp_path / "text.txt"}
    code = main(["analyze", *[a.format(**paths) for a in args], "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert err.count("\n") == 1 and err.startswith("sparsity-scaling: error: ") and message in err, err
    assert not (tmp_path / "out").exists()
    # the in-process run left no world-of-one environment behind for later subprocesses
    assert not {"RANK", "WORLD_SIZE", "MASTER_PORT"} & set(os.environ)
