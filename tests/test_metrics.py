"""The evaluator against brute-force computation on a trained micro model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import mlflow_run_dir, run_cli, run_here
from distributed import run_ranks
from sparsity_scaling.rundir import RunDir


@pytest.fixture(scope="module")
def tokens_file(micro_run, tmp_path_factory) -> Path:
    """Validation sequences from the run's own split, as a user would pass with --tokens."""
    from sparsity_scaling.config import load_config
    from sparsity_scaling.data.pipeline import prepare_data
    from sparsity_scaling.data.indexed import open_token_stream

    config = load_config(micro_run / "config.yaml")
    stream = open_token_stream(prepare_data(config.data).valid[0])
    length = config.data.seq_len + 1
    count = min(len(stream) // length, 96)
    path = tmp_path_factory.mktemp("tokens") / "valid.npy"
    np.save(path, np.asarray(stream[: count * length], dtype=np.int64).reshape(count, length))
    return path


def _evaluator(checkpoint, tokens_path, tp=1):
    from sparsity_scaling.hf import load_target
    from sparsity_scaling.metrics.measure import EvalData
    from sparsity_scaling.metrics.search import Evaluator
    from sparsity_scaling.parallel import init_parallel

    init_parallel(tp)
    model = load_target(checkpoint=checkpoint, tp=tp)
    return Evaluator(model, EvalData(torch.from_numpy(np.load(tokens_path)))), model


def _brute_force_cett(a: torch.Tensor, w_out: torch.Tensor, eps: float) -> float:
    """Mean over tokens of ||sum of inactive n_i|| / ||sum of all n_i||, from each neuron's
    own output n_i = W_out[:, i] a_i (not the search's masked matrix product)."""
    values = []
    for chunk in a.double().split(256):
        n = w_out.double()[None] * chunk[:, None, :]  # [tokens, d, f]: column i is n_i
        inactive = n.norm(dim=1) < eps
        total = n.sum(dim=2).norm(dim=1)
        residual = (n * inactive[:, None, :]).sum(dim=2).norm(dim=1)
        values.append((residual / total)[total > 0])
    return float(torch.cat(values).mean())


def _cett_checks(checkpoint, tokens_path):
    from sparsity_scaling.metrics.search import ppl_p, solve_ppl_ratio

    from sparsity_scaling.hf import load_target
    from sparsity_scaling.metrics.measure import EvalData
    from sparsity_scaling.metrics.search import Evaluator
    from sparsity_scaling.parallel import init_parallel

    init_parallel(1)
    model = load_target(checkpoint=checkpoint)
    forwarded = [0]  # tokens through the model, counted by a hook, not by the evaluator
    model.register_forward_hook(lambda module, args, output: forwarded.__setitem__(0, forwarded[0] + args[0].numel()))
    data = EvalData(torch.from_numpy(np.load(tokens_path)))
    ev = Evaluator(model, data)
    evaluations = []  # the threshold searches' CETT evaluations: one product W_out (a * mask) each
    evaluate = ev.cett.cett
    ev.cett.cett = lambda layer, eps: evaluations.append(layer) or evaluate(layer, eps)
    out = {"result": ppl_p(ev, 1.0).to_dict()}  # first: its cost counts from the dense pass
    per_pass = 2 * sum(p.numel() for p in model.parameters() if p.dim() == 2) * data.tokens
    search = sum(2 * ev.dense.calibration[layer].numel() * 64 for layer in evaluations)  # d_model 64
    out["counted_passes"] = forwarded[0] / data.tokens + search / per_pass
    eps = ev.cett.thresholds(0.2)
    # every calibration token (what the search calibrates on), each neuron's output on its own
    out["brute"] = [_brute_force_cett(ev.dense.calibration[f.layer], f.output_weight(), eps[f.layer])
                    for f in model.ffns]
    sweep = []
    for c in (0.05, 0.1, 0.2, 0.4, 0.8):
        sparse = ev.measure(ev.cett_rule(c))
        sweep.append((c, sparse.activation_ratio, sparse.ppl / ev.dense.ppl))
    out["sweep"] = sweep

    # the same search driven to a far tighter bracket: the reported ratio must be within 0.001
    def measure(c):
        from sparsity_scaling.metrics.search import Point

        sparse = ev.measure(ev.cett_rule(c))
        return Point(c, sparse.ppl / ev.dense.ppl, sparse.activation_ratio)

    exact = solve_ppl_ratio(measure, 1.01, act_tol=1e-5, ratio_tol=1e-9, max_steps=40).point
    out["exact_activation"] = exact.activation
    cut_short = ppl_p(ev, 1.0, max_steps=2)  # a fresh search with too few steps to converge
    out["cut_short"] = cut_short.to_dict()
    out["cut_short_warning"] = cut_short.convergence_warning()
    return out


def test_cett_thresholds_and_ppl_p_match_brute_force(micro_run, tokens_file):
    checkpoint = RunDir(micro_run).checkpoints()[-1].path
    out = run_ranks(1, _cett_checks, checkpoint, tokens_file)[0]
    for value in out["brute"]:  # within the search's tolerance on CETT (1e-4), plus rounding
        assert value == pytest.approx(0.2, abs=1.5e-4)
    cetts, acts, ratios = zip(*out["sweep"])
    assert all(a > b for a, b in zip(acts, acts[1:])), acts  # activation falls with CETT
    assert all(a <= b + 1e-4 for a, b in zip(ratios, ratios[1:])), ratios  # PPL rises
    result = out["result"]
    assert result["ppl_ratio"] == pytest.approx(1.01, abs=2e-3)
    assert abs(result["activation_ratio"] - out["exact_activation"]) <= 1e-3
    assert result["forward_passes"] <= 6  # the dense pass, three or four sparse ones, the threshold searches
    assert result["forward_passes"] == pytest.approx(out["counted_passes"], abs=1e-3)  # rounded to 3 places
    assert len(result["thresholds"]) == len(result["layer_activation_ratios"]) == 2
    assert result["converged"] is True
    short = out["cut_short"]
    assert short["converged"] is False and short["extra"]["activation_gap"] > 1e-3
    assert out["cut_short_warning"].startswith("warning: the PPL-1% search did not converge")


def test_a_search_that_runs_out_of_steps_says_it_did_not_converge():
    from sparsity_scaling.metrics.search import Point, solve_ppl_ratio

    def measure(c):  # PPL ratio 1 + c**4: far from linear in log, so interpolation is slow
        return Point(c, 1 + c ** 4, 1 - c)

    short = solve_ppl_ratio(measure, 1.01, max_steps=3)
    assert not short.converged and short.activation_gap > 1e-3
    assert "did not converge" in short.warning("the search") and "uncertain by up to" in short.warning("the search")
    full = solve_ppl_ratio(measure, 1.01)
    assert full.converged and full.warning("the search") is None
    assert full.point.x == pytest.approx(0.1 ** 0.5, abs=1e-3)  # 1 + c**4 = 1.01


def _tp_result(checkpoint, tokens_path, tp):
    from sparsity_scaling.metrics.search import ppl_p

    ev, _ = _evaluator(checkpoint, tokens_path, tp)
    return ppl_p(ev, 1.0).to_dict()


def test_tensor_parallel_gives_the_same_answer(micro_run, tokens_file):
    checkpoint = RunDir(micro_run).checkpoints()[-1].path
    one = run_ranks(1, _tp_result, checkpoint, tokens_file, 1)[0]
    two = run_ranks(2, _tp_result, checkpoint, tokens_file, 2)
    assert two[0] == two[1] or two[0]["activation_ratio"] == two[1]["activation_ratio"]
    assert two[0]["activation_ratio"] == pytest.approx(one["activation_ratio"], abs=1e-3)
    assert two[0]["cett"] == pytest.approx(one["cett"], abs=1e-3)
    assert two[0]["dense_ppl"] == pytest.approx(one["dense_ppl"], rel=1e-5)


def _rule_checks(checkpoint, tokens_path):
    from sparsity_scaling.model import ActivationRecorder
    from sparsity_scaling.metrics.rules import ReluZero, TopK, TopP

    ev, model = _evaluator(checkpoint, tokens_path)
    gates = {}

    class Gates(ActivationRecorder):
        def on_activation(self, ffn, trace):
            gates.setdefault(trace.layer, []).append((trace.gate > 0).sum().item())
            gates.setdefault(f"n{trace.layer}", []).append(trace.gate.numel())

    from sparsity_scaling.metrics.measure import loss_pass

    loss_pass(model, ev.data, Gates())
    positive = sum(sum(gates[f.layer]) for f in model.ffns) / sum(sum(gates[f"n{f.layer}"]) for f in model.ffns)
    relu = ev.measure(ReluZero())
    topk = ev.measure(TopK(k=16))
    top_p = ev.measure(TopP(p=0.5))
    return {
        "positive": positive, "relu": relu.activation_ratio, "relu_ppl_ratio": relu.ppl / ev.dense.ppl,
        "topk": topk.activation_ratio, "top_p": top_p.activation_ratio,
    }


def test_relu_zero_and_topk_count_what_they_should(micro_run, tokens_file):
    checkpoint = RunDir(micro_run).checkpoints()[-1].path
    out = run_ranks(1, _rule_checks, checkpoint, tokens_file)[0]
    assert out["relu"] == pytest.approx(out["positive"], abs=1e-12)
    assert out["relu_ppl_ratio"] == pytest.approx(1.0, abs=1e-6)  # zeros masked: nothing changes
    assert out["topk"] == pytest.approx(16 / 160)
    assert 0 < out["top_p"] < out["relu"]


def test_top_p_keeps_the_minimal_set():
    from sparsity_scaling.metrics.rules import TopP

    scores = torch.rand(64, 50, dtype=torch.float64) ** 3
    for p in (0.1, 0.5, 0.9, 1.0):
        keep = TopP(p=p).keep(scores, layer=0, sharded=False)
        for row, kept in zip(scores, keep):
            total = row.sum()
            assert row[kept].sum() >= p * total - 1e-12
            assert row[kept].min() >= row[~kept].max() if (~kept).any() else True
            smallest = row[kept].min()  # without its smallest member the set falls short
            assert row[kept].sum() - smallest < p * total or kept.sum() == 1


def test_evaluate_cli_writes_result_and_reusable_thresholds(micro_run, tokens_file, tmp_path):
    checkpoint = RunDir(micro_run).checkpoints()[-1].path
    out = tmp_path / "result.json"
    result = run_here("evaluate", "--checkpoint", str(checkpoint), "--tokens", str(tokens_file), "--json", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(out.read_text())
    for key in ("metric", "params", "cett", "thresholds", "layer_activation_ratios", "activation_ratio",
                "dense_ppl", "sparse_ppl", "ppl_ratio", "tokens", "forward_passes", "seconds"):
        assert key in record
    assert record["converged"] is True and "warning" not in result.stderr
    artifact = json.loads((tmp_path / "result.thresholds.json").read_text())
    assert artifact["key"]["p"] == 1.0 and artifact["key"]["data_hash"] == record["data_hash"]
    assert [len(v) for v in artifact["thresholds"].values()] == [160, 160]
    ratio = run_ranks(1, _apply_saved, checkpoint, tokens_file, tmp_path / "result.thresholds.json")[0]
    assert ratio == pytest.approx(record["activation_ratio"], abs=1e-9)
    # --thresholds alone (no --json): the thresholds are written, the result printed
    alone = tmp_path / "alone.json"
    result = run_here("evaluate", "--checkpoint", str(checkpoint), "--tokens", str(tokens_file), "--metric", "cett",
                     "--value", "0.2", "--thresholds", str(alone))
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(alone.read_text())["key"]["cett"] == json.loads(result.stdout)["cett"] == 0.2


def _apply_saved(checkpoint, tokens_path, thresholds):
    from sparsity_scaling.metrics.result import load_thresholds
    from sparsity_scaling.metrics.rules import PerNeuronThreshold

    ev, _ = _evaluator(checkpoint, tokens_path)
    saved = load_thresholds(thresholds)
    return ev.measure(PerNeuronThreshold(thresholds=saved.thresholds)).activation_ratio


@pytest.mark.parametrize(
    "args, message",
    [
        (["--p", "0"], "--p 0.0: must be in (0, 100]"),
        (["--p", "150"], "must be in (0, 100]"),
        (["--metric", "topk"], "needs --value"),
    ],
)
def test_evaluate_cli_bad_input(micro_run, tokens_file, tmp_path, args, message):
    checkpoint = RunDir(micro_run).checkpoints()[-1].path
    out = tmp_path / "result.json"
    result = run_here("evaluate", "--checkpoint", str(checkpoint), "--tokens", str(tokens_file),
                     "--json", str(out), *args)
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
    assert result.stderr.count("\n") == 1 and not out.exists()


@pytest.mark.parametrize("args, message", [
    (["--seq-len", "32"], "--seq-len 32: a token file gives the validation tokens and their length as they are"),
    (["--eval-tokens", "1024"], "--eval-tokens 1024: a token file gives"),
    (["--metric", "cett", "--value", "0.2", "--site", "gate"], "--site gate: metric cett reads its own site"),
    (["--site", "up"], "--site up: metric ppl-p reads its own site"),
    (["--metric", "relu", "--site", "input"], "--site input: metric relu reads its own site"),
    (["--metric", "critical", "--rule", "cett", "--site", "gate"], "--site gate: critical with rule cett"),
    (["--metric", "topk", "--value", "8", "--thresholds", "t.json"],
     "--thresholds t.json: metric topk has no per-neuron thresholds; ppl-p and cett do"),
])
def test_evaluate_refuses_flags_it_would_ignore(tmp_path, capsys, args, message):
    """Refused in one line before any model or data is read (in-process: nothing starts)."""
    from sparsity_scaling.cli import main

    out = tmp_path / "result.json"
    code = main(["evaluate", "--checkpoint", str(tmp_path / "unread"), "--tokens", "unread.npy", "--json", str(out),
                 *args])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"sparsity-scaling: error: {message}"), err
    assert err.count("\n") == 1 and err.endswith("\n") and not out.exists()


def test_evaluate_cli_refuses_incomplete_checkpoint_and_foreign_tokens(micro_run, tmp_path):
    incomplete = tmp_path / "tokens_000000000000001"
    incomplete.mkdir()
    result = run_here("evaluate", "--checkpoint", str(incomplete))
    assert result.returncode == 2 and "not a complete checkpoint" in result.stderr
    big = tmp_path / "big.npy"
    np.save(big, np.full((2, 65), 10_000, dtype=np.int64))
    checkpoint = RunDir(micro_run).checkpoints()[-1].path
    result = run_here("evaluate", "--checkpoint", str(checkpoint), "--tokens", str(big))
    assert result.returncode == 2 and "does not match the model" in result.stderr
    assert result.stderr.count("\n") == 1


def test_evaluate_run_applies_one_stabilised_cett(micro_run, tmp_path):
    run = tmp_path / "run"  # it writes RUN/sparsity.json: not into the shared run, which `analyze` reads
    shutil.copytree(micro_run, run)
    result = run_here("evaluate-run", str(run), "--eval-tokens", "4096")
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((run / "sparsity.json").read_text())
    points = record["checkpoints"]
    assert [p["tokens"] for p in points] == [c.tokens for c in RunDir(run).checkpoints()]
    assert {p["cett"] for p in points} == {record["cett"]}
    last = points[-record["last"]:]
    mean_ratio = sum(p["ppl_ratio"] for p in last) / len(last)
    assert mean_ratio == pytest.approx(1.01, abs=3e-3)


def _stabilising_checks(paths: list[str], tokens_path) -> dict:
    import gc

    from sparsity_scaling.hf import load_target
    from sparsity_scaling.metrics.measure import EvalData
    from sparsity_scaling.parallel import init_parallel

    init_parallel(1)
    # a few sequences: what is checked (how many models are loaded, the same arithmetic
    # whatever is kept) does not depend on how many; the search runs four times
    data = EvalData(torch.from_numpy(np.load(tokens_path)[:24]))
    load_target(checkpoint=paths[0])  # its imports done: what exists now is not collected again
    gc.collect()
    gc.freeze()  # the collections before each load count the models left (0.3 s each over every import)
    try:
        return _stabilising_counts(paths, data)
    finally:
        gc.unfreeze()


def _stabilising_counts(paths: list[str], data) -> dict:
    import gc
    import weakref

    from sparsity_scaling.hf import load_target
    from sparsity_scaling.metrics.search import Evaluator, ModelRoom, ReloadingEvaluator, model_bytes, stabilised_cett

    alive, peak = weakref.WeakSet(), [0]

    def loader(path):
        def load():
            gc.collect()
            target = load_target(checkpoint=path)
            alive.add(target)
            peak[0] = max(peak[0], len(alive))
            return target
        return load

    reloading = [ReloadingEvaluator(loader(p), data) for p in paths]
    gc.collect()
    between = len(alive)
    bounded = stabilised_cett(reloading, 1.0).point.x
    bounded_peak = peak[0]
    parked = all(ev.target is None and all(layer.w_out is None for layer in ev.cett.layers.values())
                 for ev in reloading)
    every_model_kept = stabilised_cett([Evaluator(load_target(checkpoint=p), data) for p in paths], 1.0).point.x

    # with room for every model: each is read once for the whole search, and the same CETT
    loads = {p: 0 for p in paths}

    def counted(path):
        def load():
            loads[path] += 1
            return load_target(checkpoint=path)
        return load

    roomy = stabilised_cett([ReloadingEvaluator(counted(p), data, room=ModelRoom()) for p in paths], 1.0).point.x
    # room for one and a half models: the first is kept, the others come and go, one at a time
    room = ModelRoom()
    room.left = int(model_bytes(load_target(checkpoint=paths[0])) * 1.5)
    alive.clear()
    gc.collect()
    peak[0] = 0
    some = [ReloadingEvaluator(loader(p), data, room=room) for p in paths]
    partly = stabilised_cett(some, 1.0).point.x
    return {"between": between, "peak": bounded_peak, "parked": parked, "bounded": bounded, "kept": every_model_kept,
            "loads": list(loads.values()), "roomy": roomy, "kept_flags": [ev.kept for ev in some],
            "partly_peak": peak[0], "partly": partly}


def test_stabilising_strategy_holds_one_model_at_a_time_and_gives_the_same_cett(micro_run, tokens_file):
    """Without room, the last checkpoints keep their calibration, not their models: the search
    loads each model for a measurement and frees it. With room, the models that fit stay
    loaded, each read once. Every way finds the same CETT as with every model kept."""
    paths = [str(c.path) for c in RunDir(micro_run).checkpoints()]
    out = run_ranks(1, _stabilising_checks, paths, tokens_file)[0]
    assert out["between"] == 0  # between measurements no model stays in memory
    assert out["peak"] == 1  # while measuring, one
    assert out["parked"]  # a parked evaluator keeps its calibration, no weights
    assert out["bounded"] == out["kept"]  # the same search, the same arithmetic: exactly equal
    # models the memory holds are read from disk once for the whole search, not at every step
    assert out["loads"] == [1] * len(paths) and out["roomy"] == out["kept"]
    assert out["kept_flags"] == [True] + [False] * (len(paths) - 1)
    assert out["partly_peak"] == 2 and out["partly"] == out["kept"]  # the kept one, and one at a time


def test_exported_llama_gives_the_same_ppl_p_as_our_checkpoint(micro_run, tokens_file, tmp_path):
    from sparsity_scaling.hf import export_llama

    checkpoint = RunDir(micro_run).checkpoints()[-1].path
    exported = export_llama(checkpoint, tmp_path / "llama")
    ours, theirs = tmp_path / "ours.json", tmp_path / "theirs.json"
    for flag, path, out in (("--checkpoint", checkpoint, ours), ("--hf-model", exported, theirs)):
        result = run_here("evaluate", flag, str(path), "--tokens", str(tokens_file), "--json", str(out))
        assert result.returncode == 0, result.stderr[-3000:]
    ours, theirs = json.loads(ours.read_text()), json.loads(theirs.read_text())
    assert theirs["dense_ppl"] == pytest.approx(ours["dense_ppl"], rel=1e-4)
    assert theirs["activation_ratio"] == pytest.approx(ours["activation_ratio"], abs=1e-3)
    assert theirs["cett"] == pytest.approx(ours["cett"], abs=1e-3)


def test_data_parallel_evaluation_under_torchrun_matches_one_process(micro_run, tokens_file, tmp_path):
    checkpoint = RunDir(micro_run).checkpoints()[-1].path
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    result = run_here("evaluate", "--checkpoint", str(checkpoint), "--tokens", str(tokens_file), "--json", str(one))
    assert result.returncode == 0, result.stderr[-3000:]
    torchrun = Path(sys.executable).with_name("torchrun")
    result = subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", "-m", "sparsity_scaling.cli", "evaluate", "--checkpoint",
         str(checkpoint), "--tokens", str(tokens_file), "--json", str(two)],
        capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = json.loads(one.read_text()), json.loads(two.read_text())
    assert two["dense_ppl"] == pytest.approx(one["dense_ppl"], rel=1e-9)  # batches split, sums reduced
    assert two["tokens"] == one["tokens"]
    assert two["activation_ratio"] == pytest.approx(one["activation_ratio"], abs=2e-3)


def test_a_series_reads_its_runs_validation_once_and_a_later_read_is_fresh(micro_run, monkeypatch):
    """Within one series the checkpoints of a run share its validation windows (finding the
    split reads the whole corpus); outside one, as in a Ray worker kept for the next job,
    each read prepares the data again, so a corpus prepared again since is what it reads."""
    from sparsity_scaling.data import pipeline
    from sparsity_scaling.evaluation.inputs import ModelRef, load_eval_data, validation_read_once
    from sparsity_scaling.evaluation.settings import DataSettings

    prepared = []
    real = pipeline.prepare_data
    monkeypatch.setattr(pipeline, "prepare_data", lambda *a, **k: prepared.append(1) or real(*a, **k))
    first, last = (ModelRef(checkpoint=str(c.path)) for c in RunDir(micro_run).checkpoints()[::3])
    data = DataSettings(eval_tokens=512)
    for _ in range(2):
        load_eval_data(first, data)
    assert len(prepared) == 2
    with validation_read_once():
        a, b = load_eval_data(first, data), load_eval_data(last, data)
        assert len(prepared) == 3 and a.sequences is b.sequences
    fresh = load_eval_data(last, data)
    assert len(prepared) == 4 and torch.equal(fresh.sequences, a.sequences)


def test_a_series_of_checkpoints_gives_evaluate_runs_trajectory(micro_run, tokens_file, tmp_path):
    """`evaluate-series` on the run's own checkpoints is `evaluate-run` (the same record, in
    the reference format); on the same checkpoints exported to Hugging Face directories
    named by step, with --tokens-per-step, it gives the same trajectory."""
    from sparsity_scaling.cli import main
    from sparsity_scaling.hf import export_llama

    checkpoints = RunDir(micro_run).checkpoints()
    run_out, series_out = tmp_path / "run.json", tmp_path / "series.json"
    common = ["--last", "3", "--eval-tokens", "2048"]
    assert main(["evaluate-run", str(micro_run), "--json", str(run_out), *common]) == 0  # in process: no start-up
    shuffled = [str(c.path) for c in reversed(checkpoints)]  # any order: sorted by trained tokens
    assert main(["evaluate-series", *shuffled, "--out", str(series_out), *common]) == 0
    run, series = json.loads(run_out.read_text()), json.loads(series_out.read_text())
    assert series["token_passed"] == [c.tokens for c in checkpoints]
    assert series["activation_ratio"] == [p["activation_ratio"] for p in run["checkpoints"]]
    assert series["cett"] == run["cett"]
    # Against `evaluate --metric cett` of each checkpoint on its own at the series' CETT (not
    # the trajectory's code): each point is that checkpoint's measurement, and the CETT is
    # the one whose PPL ratio, averaged over the 3 newest checkpoints, is 1 + p/100.
    alone = []
    for checkpoint in checkpoints:
        out = tmp_path / f"alone-{checkpoint.name}.json"
        assert main(["evaluate", "--checkpoint", str(checkpoint.path), "--metric", "cett", "--value",
                     repr(series["cett"]), "--eval-tokens", "2048", "--json", str(out)]) == 0
        alone.append(json.loads(out.read_text()))
    # Within the per-layer eps search's tolerance (1e-4 in CETT, from a bracket that depends
    # on what was searched before): 5e-5 apart in activation ratio here.
    assert series["activation_ratio"] == pytest.approx([a["activation_ratio"] for a in alone], abs=5e-4)
    assert [p["ppl_ratio"] for p in series["checkpoints"]] == pytest.approx([a["ppl_ratio"] for a in alone], abs=5e-4)
    newest = [a["ppl_ratio"] for a in alone[-3:]]
    assert sum(newest) / 3 == pytest.approx(1.01, abs=1e-3), [a["ppl_ratio"] for a in alone]

    batch = checkpoints[0].tokens // checkpoints[0].step
    exported = [str(export_llama(c.path, tmp_path / f"step{c.step}")) for c in checkpoints]
    ours_out, hf_out = tmp_path / "ours.json", tmp_path / "hf.json"
    tokens = ["--last", "3", "--token-file", str(tokens_file)]  # the file's tokens, all of them
    mlflow, run_id, run_dir = mlflow_run_dir(tmp_path)
    assert main(["evaluate-series", *shuffled, "--out", str(ours_out), *tokens, "--mlflow-run", str(run_dir)]) == 0
    assert main(["evaluate-series", *exported, "--tokens-per-step", str(batch), "--out", str(hf_out), *tokens]) == 0
    ours, hf = json.loads(ours_out.read_text()), json.loads(hf_out.read_text())
    assert hf["token_passed"] == ours["token_passed"]
    assert hf["activation_ratio"] == pytest.approx(ours["activation_ratio"], abs=2e-3)
    logged = sorted((m.step, m.value) for m in mlflow.get_metric_history(run_id, "series_activation_ratio"))
    assert [step for step, _ in logged] == ours["token_passed"]
    assert [value for _, value in logged] == pytest.approx(ours["activation_ratio"])
    assert [a.path for a in mlflow.list_artifacts(run_id, "series")] == ["series/ours.json"]


@pytest.mark.parametrize("args, message", [
    (["--tokens", "1e6", "2e6"], "--tokens 1000000 2000000: 2 counts for 3 models"),
    (["--last", "9"], "--last 9: the series has only 3 models"),
    (["--tokens", "1e6", "1e6", "2e6", "--last", "2"], "share the trained-token count 1,000,000"),
])
def test_bad_series_are_refused_in_one_line(micro_run, tmp_path, args, message, capfd):
    from sparsity_scaling.cli import main

    paths = [str(c.path) for c in RunDir(micro_run).checkpoints()[:3]]
    out = tmp_path / "series.json"
    capfd.readouterr()
    status = main(["evaluate-series", *paths, "--out", str(out), *args])
    err = capfd.readouterr().err
    assert status == 2 and message in err, err[-2000:]
    assert err.count("\n") == 1 and not out.exists()


@pytest.mark.parametrize("args, message", [
    (["--address", "local"], "--address runs the series as cluster jobs, whose result is a file: give --out too"),
    (["--address", "local", "--out", "{tmp}/s.json", "--cpus", "0"], "--cpus 0.0: must be positive"),
])
def test_a_series_on_ray_is_refused_before_joining_ray(micro_run, tmp_path, args, message, capfd):
    from sparsity_scaling.cli import main

    paths = [str(c.path) for c in RunDir(micro_run).checkpoints()[:3]]
    capfd.readouterr()
    status = main(["evaluate-series", *paths, "--last", "2", *[a.format(tmp=tmp_path) for a in args]])
    err = capfd.readouterr().err
    assert status == 2 and message in err and err.count("\n") == 1, err[-2000:]
    assert not list(tmp_path.iterdir())


# --- critical sparsity: each rule against a brute-force scan of its parameter, at TP 1 and 2 ----

CRITICAL_CASES = [  # (rule, site, power, tolerance in percent)
    ("top-p", "intermediate", 1.0, 1.0), ("top-p", "gate", 1.0, 1.0), ("top-p", "up", 1.0, 1.0),
    ("top-p", "input", 1.0, 1.0), ("top-p", "intermediate", 2.0, 1.0), ("max-p", "intermediate", 1.0, 1.0),
    ("topk", "intermediate", 1.0, 0.05),  # tight: the critical k lies past d_f / 2 on this model
    ("fat", "intermediate", 1.0, 1.0), ("cett", "intermediate", 1.0, 1.0),
]
PARAMETER = {"top-p": "p", "max-p": "p", "topk": "k", "fat": "eps", "cett": "cett"}
SPARSER_WHEN_LARGER = {"top-p": False, "max-p": True, "topk": False, "fat": True, "cett": True}


@pytest.fixture(scope="module")
def silu_checkpoint(micro_run, tmp_path_factory) -> Path:
    """The micro run's trained weights under SiLU: every neuron is active, so top-k and
    top-p have something to cut at every k and p (the ReLU model's zeros hide the top end)."""
    from sparsity_scaling.config import load_config

    source = RunDir(micro_run).checkpoints()[-1]
    config = load_config(source.path / "config.yaml")
    config = config.model_copy(update={"model": config.model.model_copy(update={"activation": "silu"})})
    run = RunDir(tmp_path_factory.mktemp("silu") / "run")
    tmp = run.start_checkpoint(source.tokens)
    (tmp / "model.pt").write_bytes((source.path / "model.pt").read_bytes())
    (tmp / "config.yaml").write_text(config.to_yaml())
    return run.finish_checkpoint(tmp, {"tokens": source.tokens, "step": source.step,
                                       "vocab_size": config.data.vocab_size}).path


def _scan_values(rule: str, found: float, low: float, high: float, full: bool) -> list[float]:
    """The settings one search step sparser than the one found (one neuron for top-k, the
    range / 2**14 otherwise), then, for a `full` scan, a uniform grid over the rule's whole
    range and a finer one around the setting found."""
    step = 1 if rule == "topk" else (high - low) / 2 ** 14
    sparser = 1 if SPARSER_WHEN_LARGER[rule] else -1
    values = [found + sparser * step]
    if full:
        values += [low + (high - low) * i / 4 for i in range(5)]
        values += [found + i * max(step, (high - low) / 2 ** 9) for i in (-2, 2)]
    return [round(x) if rule == "topk" else x for x in values if low <= x <= high]


def _critical_checks(checkpoint, tokens_path, tp, full_scan):
    """Each case's critical result, and settings of its rule's parameter measured directly."""
    import torch.distributed as dist

    from sparsity_scaling.evaluation.metric import measure
    from sparsity_scaling.evaluation.settings import MetricSettings
    from sparsity_scaling.hf import load_target
    from sparsity_scaling.metrics.measure import EvalData
    from sparsity_scaling.metrics.rules import FixedThreshold, MaxP, TopK, TopP
    from sparsity_scaling.metrics.search import Evaluator
    from sparsity_scaling.parallel import init_parallel

    init_parallel(tp)
    model = load_target(checkpoint=checkpoint, tp=tp)
    ev = Evaluator(model, EvalData(torch.from_numpy(np.load(tokens_path)[:16])))
    peak = torch.tensor(max(float(a.abs().max()) for a in ev.dense.calibration.values()))
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)  # the largest activation on any rank
    rules = {"top-p": lambda x, site, power: TopP(site=site, p=x, power=power),
             "max-p": lambda x, site, power: MaxP(site=site, p=x),
             "topk": lambda x, site, power: TopK(site=site, k=int(x)),
             "fat": lambda x, site, power: FixedThreshold(site=site, eps=x),
             "cett": lambda x, site, power: ev.cett_rule(x, fresh=True)}
    ranges = {"topk": (0, 160), "fat": (0.0, float(peak))}
    out = []
    for rule, site, power, tolerance in CRITICAL_CASES:
        settings = MetricSettings(metric="critical", rule=rule, site=site, power=power, tolerance=tolerance)
        try:
            result = measure(settings, ev, "silu")[0].to_dict()
        except Exception as error:  # reported, so the other cases still run
            out.append({"case": (rule, site, power, tolerance), "error": str(error)})
            continue
        found = result["params"][PARAMETER[rule]]
        scan = []
        for x in _scan_values(rule, found, *ranges.get(rule, (0.0, 1.0)), full_scan):
            sparse = ev.measure(rules[rule](x, site, power))
            scan.append((x, sparse.ppl / ev.dense.ppl, sparse.activation_ratio))
        out.append({"case": (rule, site, power, tolerance), "found": found, "ppl_ratio": result["ppl_ratio"],
                    "activation_ratio": result["activation_ratio"], "scan": scan})
    return out


def _check_against_scan(case: dict) -> None:
    """Within the tolerance, no scanned setting sparser than the one found, and the setting
    one search step sparser exceeds it."""
    assert "error" not in case, case
    limit = 1 + case["case"][-1] / 100
    assert case["ppl_ratio"] <= limit, case
    (_, sparser_ratio, _), *scan = case["scan"]
    assert sparser_ratio > limit, case
    for x, ratio, activation in scan:
        assert ratio > limit or activation >= case["activation_ratio"] - 1e-9, (case["case"], case["found"], x)


def test_critical_sparsity_is_the_sparsest_setting_within_tolerance_at_tp_1_and_2(silu_checkpoint, tokens_file):
    """Every rule, top-p at every site and with a power; at TP 2 (where top-k counts over
    all d_f neurons and FAT's threshold must be one across ranks) the same settings."""
    one = run_ranks(1, _critical_checks, silu_checkpoint, tokens_file, 1, True)[0]
    two = run_ranks(2, _critical_checks, silu_checkpoint, tokens_file, 2, False)
    for case in one + two[0]:
        _check_against_scan(case)
    topk = next(c for c in one if c["case"][0] == "topk")
    assert topk["found"] > 80  # past d_f / TP: the TP 2 search must reach it too
    assert two[0] == two[1]  # every rank searched the same settings
    for a, b in zip(one, two[0]):
        assert b["found"] == pytest.approx(a["found"], rel=1e-3, abs=1e-3), (a["case"], a["found"], b["found"])


# --- checkpoints that cannot be measured: left out of the stabilised trajectory, named --------

def _rewrite_weights(checkpoint, change) -> None:
    """change(state) on the checkpoint's weights, its manifest's hash updated: a complete
    checkpoint, as training writes one."""
    from sparsity_scaling.files import sha256_file

    weights = torch.load(checkpoint.weights, weights_only=True)
    change(weights)
    torch.save(weights, checkpoint.weights)
    manifest = {**checkpoint.manifest, "files": {**checkpoint.manifest["files"], "model.pt": sha256_file(checkpoint.weights)}}
    (checkpoint.path / "manifest.json").write_text(json.dumps(manifest))


def test_checkpoints_that_cannot_be_measured_are_left_out_and_named_under_excluded(micro_run, tokens_file,
                                                                                   tmp_path):
    """The micro run with a NaN in its oldest checkpoint's weights and its newest's dense
    perplexity infinite (final norm x 1e30, every weight finite), each recorded in
    RUN/evaluations/failed/ as the grid records it (the commands find them unmeasurable
    themselves; they do not read that record): `evaluate-run` and `evaluate-series` leave both
    out, name them under `excluded` with the reason, and give the trajectory the same command
    gives without them: evaluate-run on the run copied without them, evaluate-series given only
    the two others (the --last 2 that set the CETT are then those two middle checkpoints)."""
    from sparsity_scaling.cli import main
    from sparsity_scaling.files import write_json_atomic

    run, without = tmp_path / "run", tmp_path / "without"
    shutil.copytree(micro_run, run)
    checkpoints = RunDir(run).checkpoints()
    oldest, newest = checkpoints[0], checkpoints[-1]
    assert len(checkpoints) == 4
    shutil.copytree(micro_run, without, ignore=shutil.ignore_patterns(oldest.name, newest.name))
    nan_weight = next(iter(torch.load(oldest.weights, weights_only=True)))
    _rewrite_weights(oldest, lambda w: w[nan_weight].view(-1).__setitem__(0, float("nan")))
    _rewrite_weights(newest, lambda w: w["final_norm.weight"].mul_(1e30))
    why = {oldest.name: f"{oldest.weights}: weight {nan_weight} holds NaN or infinite values; a model with "
                        "non-finite weights cannot be measured",
           newest.name: f"{newest.path}: dense perplexity inf on the validation data is not finite; the model "
                        "cannot be measured"}
    for ck in (oldest, newest):  # as launcher/eval_queue.py's checkpoint job writes it
        write_json_atomic(RunDir(run).evaluation_failure_of(ck.path),
                          {"checkpoint": ck.name, "train_tokens": ck.tokens, "error": why[ck.name]})

    def trajectory(record):
        return [{key: p[key] for key in ("checkpoint", "tokens", "cett", "activation_ratio", "ppl_ratio",
                                         "layer_activation_ratios")} for p in record["checkpoints"]]

    def check(record, expected):
        assert expected["excluded"] == [] and [p["tokens"] for p in expected["checkpoints"]] == [
            c.tokens for c in checkpoints[1:-1]]
        assert (record["cett"], record["last"]) == (expected["cett"], 2)
        assert trajectory(record) == trajectory(expected)
        assert record["excluded"] == [{"checkpoint": ck.name, "tokens": ck.tokens, "error": why[ck.name]}
                                      for ck in (oldest, newest)]

    last = ["--last", "2"]
    for run_dir in (without, run):  # on 512 tokens of the run's validation split
        assert main(["evaluate-run", str(run_dir), *last, "--eval-tokens", "512"]) == 0
    check(json.loads((run / "sparsity.json").read_text()), json.loads((without / "sparsity.json").read_text()))
    # evaluate-series on 8 of the module's validation sequences
    tokens = tmp_path / "valid.npy"
    np.save(tokens, np.load(tokens_file)[:8])
    series = {}
    for name, members in (("all", checkpoints), ("measurable", checkpoints[1:-1])):
        out = tmp_path / f"{name}.json"
        assert main(["evaluate-series", *(str(c.path) for c in members), *last, "--token-file", str(tokens), "--out",
                     str(out)]) == 0
        series[name] = json.loads(out.read_text())
    check(series["all"], series["measurable"])
    assert series["all"]["token_passed"] == [c.tokens for c in checkpoints[1:-1]]


def _load_counting_initialisation(checkpoint):
    from sparsity_scaling.hf import load_target
    from sparsity_scaling.hf.load import read_weights
    from sparsity_scaling.parallel import full_state_dict, init_parallel

    init_parallel(1)
    calls = []
    normal = torch.nn.init.normal_
    torch.nn.init.normal_ = lambda tensor, *args, **kwargs: calls.append(tensor.numel()) or normal(tensor, *args, **kwargs)
    try:
        model = load_target(checkpoint=checkpoint)
    finally:
        torch.nn.init.normal_ = normal
    _, _, state = read_weights(checkpoint)
    loaded = full_state_dict(model)
    return {"initialised": sum(calls), "equal": all(torch.equal(loaded[k], state[k]) for k in state),
            "names": sorted(loaded) == sorted(state)}


def test_loading_a_checkpoint_for_evaluation_skips_the_random_initialisation(micro_run):
    """A checkpoint's model is built with its weights unset and then given every one of
    them: the initialisation (a normal draw per weight, on the CPU) would be thrown away."""
    checkpoint = RunDir(micro_run).checkpoints()[-1].path
    out = run_ranks(1, _load_counting_initialisation, checkpoint)[0]
    assert out["initialised"] == 0
    assert out["names"] and out["equal"]


def _tf32_seen_by_cett_products() -> list:
    """Whether TF32 was on at each of a CETT search's products, called inside a GPU pass."""
    from sparsity_scaling.metrics import cett as cett_module
    from sparsity_scaling.metrics.cett import CETTSearch
    from sparsity_scaling.metrics.measure import pass_precision
    from sparsity_scaling.parallel import init_parallel

    class FFN:
        layer, local_neurons, neuron_offset = 0, 6, 0

        def output_weight(self):
            return torch.randn(4, 6, generator=torch.Generator().manual_seed(0))

    class Target:
        ffns = [FFN()]

        def parameters(self):
            return iter([torch.nn.Parameter(torch.zeros(1))])

    init_parallel(1)
    seen, sum_tp = [], cett_module.sum_tp
    cett_module.sum_tp = lambda t: seen.append(torch.backends.cuda.matmul.allow_tf32) or sum_tp(t)
    with pass_precision(torch.device("cuda", 0)):
        search = CETTSearch(Target(), {0: torch.rand(32, 6, generator=torch.Generator().manual_seed(1))})
        search.cett(0, 0.5)
    return seen


def test_forward_passes_multiply_in_tf32_on_a_gpu_and_the_cett_sums_in_full_fp32():
    """The decision, not the GPU: inside a pass on a CUDA device TF32 is on; the CETT
    products run with it off even when called from inside one; on the CPU nothing changes."""
    from sparsity_scaling.metrics.measure import pass_precision

    matmul = torch.backends.cuda.matmul
    before = matmul.allow_tf32  # a property of torch's cuBLAS module: set and restored by hand
    matmul.allow_tf32 = False
    try:
        with pass_precision(torch.device("cuda", 0)):
            assert matmul.allow_tf32 is True
        assert matmul.allow_tf32 is False
        with pass_precision(torch.device("cpu")):
            assert matmul.allow_tf32 is False
    finally:
        matmul.allow_tf32 = before
    assert run_ranks(1, _tf32_seen_by_cett_products)[0] == [False, False]  # the FFN output norms, the residual
