"""`sparsity-scaling speedup`: its points, the activation ratios it reports, and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import OPTConfig, OPTForCausalLM

from sparsity_scaling.cli.program import main
from sparsity_scaling.rundir import RunDir

FAST = ["--prompt", "4", "--steps", "4", "--repeats", "1", "--eval-tokens", "1024"]
PROMPT, STEPS = 4, 8  # the thresholds run: tokens read, then decoded


def _run_copy(micro_run: Path, tmp_path: Path) -> Path:
    """The micro run, copied: the command writes RUN/speedup.json, never into the shared run."""
    run = tmp_path / "run"
    shutil.copytree(micro_run, run)
    return run


def _llama_ffns(run: Path):
    """The run's newest checkpoint as a Llama of our own, and its FFNs' down projections
    (whose input is the activation a)."""
    from sparsity_scaling.hf.export import llama_model

    model = llama_model(RunDir(run).checkpoints()[-1].path)
    return model, [layer.mlp.down_proj for layer in model.model.layers]


def _recount(model, downs, tokens: torch.Tensor, prompt: int, thresholds: dict[int, torch.Tensor]):
    """(kept, counted, borderline) of |a_i| >= threshold_i at the decoded positions, the
    activations masked as they go: one forward pass over whole sequences, no KV cache, with
    hooks of this test's own. `borderline` entries lie within float rounding of their
    threshold (a decode step by step may round them the other way)."""
    kept = counted = borderline = 0

    def masking(layer):
        def hook(module, args):
            nonlocal kept, counted, borderline
            a = args[0]
            mask = a.abs() >= thresholds[layer]
            decoded = mask[:, prompt:]
            kept += int(decoded.sum())
            counted += decoded.numel()
            borderline += int(((a.abs() - thresholds[layer]).abs() <= 1e-5 * thresholds[layer])[:, prompt:].sum())
            return (a * mask,)
        return hook

    handles = [down.register_forward_pre_hook(masking(layer)) for layer, down in enumerate(downs)]
    try:
        with torch.no_grad():
            model(input_ids=tokens, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return kept, counted, borderline


@pytest.fixture(scope="module")
def thresholds_run(micro_run, tmp_path_factory):
    """`speedup RUN --thresholds FILE --tokens FILE --batch 2 --threads N`, on thresholds and
    tokens of this test's own: the record, and what it was given."""
    tmp = tmp_path_factory.mktemp("speedup")
    run = _run_copy(micro_run, tmp)
    model, downs = _llama_ffns(run)
    tokens = torch.randint(0, 512, (4, PROMPT + STEPS), generator=torch.Generator().manual_seed(0))
    seen = {}
    handles = [down.register_forward_pre_hook(lambda m, args, layer=layer: seen.__setitem__(layer, args[0]))
               for layer, down in enumerate(downs)]
    with torch.no_grad():
        model(input_ids=tokens[2:], use_cache=False)  # thresholds from the rows not decoded
    for handle in handles:
        handle.remove()
    # per neuron, the 85th percentile of |a|, never 0 (a zero activation is never active)
    thresholds = {layer: torch.quantile(a.abs().flatten(0, 1), 0.85, dim=0).clamp_min(1e-3)
                  for layer, a in seen.items()}
    (tmp / "thresholds.json").write_text(json.dumps({"thresholds": {str(k): v.tolist() for k, v in thresholds.items()}}))
    np.save(tmp / "tokens.npy", tokens.numpy())
    threads = torch.get_num_threads()
    asked = threads + 1  # not what torch uses already
    try:
        assert main(["speedup", str(run), "--thresholds", str(tmp / "thresholds.json"), "--tokens", str(tmp / "tokens.npy"),
                     "--batch", "2", "--threads", str(asked), "--prompt", str(PROMPT), "--steps", str(STEPS),
                     "--repeats", "1", "--json", str(tmp / "s.json")]) == 0
    finally:
        torch.set_num_threads(threads)  # the command runs in this process
    return {"record": json.loads((tmp / "s.json").read_text()), "tokens": tokens, "thresholds": thresholds,
            "threads": asked, "model": model, "downs": downs, "run": run}


def test_the_activation_ratio_is_the_probes_count_while_decoding(thresholds_run):
    """The ratio the command reports is the count of the same thresholds over the decoded
    tokens of the --batch sequences, recounted here by other means."""
    t = thresholds_run
    kept, counted, borderline = _recount(t["model"], t["downs"], t["tokens"][:2], PROMPT, t["thresholds"])
    assert counted == 2 * STEPS * 2 * 160  # sequences, decoded tokens, layers, neurons
    assert 0.05 < kept / counted < 0.95  # the thresholds decide: some kept, some not
    [point] = t["record"]["points"]
    assert abs(point["activation_ratio"] * counted - kept) <= borderline, (point["activation_ratio"], kept / counted)


def test_threads_and_batch_are_the_ones_asked_for(thresholds_run):
    t = thresholds_run
    assert t["record"]["threads"] == t["threads"] and t["record"]["batch"] == 2
    # one sequence alone, or the prompt counted too, gives another count
    first, counted, _ = _recount(t["model"], t["downs"], t["tokens"][:1], PROMPT, t["thresholds"])
    with_prompt, all_counted, _ = _recount(t["model"], t["downs"], t["tokens"][:2], 0, t["thresholds"])
    ratio = t["record"]["points"][0]["activation_ratio"]
    assert ratio != first / counted and ratio != with_prompt / all_counted


def test_dense_products_run_the_way_asked_for(micro_run, tmp_path):
    """--dense rows and --dense linear, whichever this machine would have chosen itself."""
    run = _run_copy(micro_run, tmp_path)
    for dense in ("rows", "linear"):
        out = tmp_path / f"{dense}.json"
        assert main(["speedup", str(run), "--metric", "fat", "--value", "0.05", "--dense", dense,
                     "--json", str(out), *FAST]) == 0
        assert [p["dense_products"] for p in json.loads(out.read_text())["points"]] == [dense]


def _timed(micro_run, tmp_path, capsys, monkeypatch, slowed: str) -> str:
    """The command's progress lines when `slowed` FFNs (dense or sparse) are slowed by other
    work on the machine: here, each of their calls waits 50 ms."""
    import time

    from sparsity_scaling.sparse_ffn import SparseFFN

    forward = SparseFFN.forward

    def busy(self, x):
        if (self.rule is None) == (slowed == "dense"):
            time.sleep(0.05)
        return forward(self, x)

    monkeypatch.setattr(SparseFFN, "forward", busy)
    tokens = tmp_path / "tokens.npy"
    np.save(tokens, np.random.default_rng(0).integers(0, 512, (1, 8)))
    assert main(["speedup", str(_run_copy(micro_run, tmp_path)), "--metric", "fat", "--value", "0.05",
                 "--tokens", str(tokens), *FAST]) == 0
    return capsys.readouterr().err


def test_a_measurement_disturbed_by_other_work_is_flagged(micro_run, tmp_path, capsys, monkeypatch):
    """Dense FFN steps slowed by other work give a speedup the FLOPs cannot: a warning."""
    err = _timed(micro_run, tmp_path, capsys, monkeypatch, "dense")
    [warning] = [line for line in err.splitlines() if line.startswith("warning:")]
    assert "fat (intermediate, eps 0.05)" in warning and "FLOP bound" in warning and "--repeats" in warning


def test_sparse_steps_slowed_are_no_warning(micro_run, tmp_path, capsys, monkeypatch):
    err = _timed(micro_run, tmp_path, capsys, monkeypatch, "sparse")
    assert "warning" not in err


def test_a_sweep_reports_speedups_at_the_ratios_the_rule_gives(micro_run, tmp_path, capsys):
    """Each point's thresholds, set for an activation ratio, keep that share of the
    activations while decoding (ratios below the share of non-zero ReLU activations)."""
    run = _run_copy(micro_run, tmp_path)
    out = tmp_path / "out"
    assert main(["speedup", str(run), "--sweep", "0.3,0.1", "--out", str(out), "--json",
                 str(tmp_path / "s.json"), *FAST, "--steps", "12"]) == 0
    record = json.loads((tmp_path / "s.json").read_text())
    assert [p["setting"]["target_ratio"] for p in record["points"]] == [0.3, 0.1]
    for point in record["points"]:
        assert abs(point["activation_ratio"] - point["setting"]["target_ratio"]) < 0.05, point
    assert (out / "speedup.png").stat().st_size > 0 and json.loads((out / "speedup.json").read_text()) == record
    assert RunDir(run).speedup_record()["points"] == record["points"]  # for the grid report
    assert "FFN speedup" in capsys.readouterr().out


def _error(capsys, *argv) -> str:
    """The error line of a refused command (progress lines may come before it)."""
    assert main(["speedup", *argv, *FAST]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("sparsity-scaling: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_bad_input_is_one_line(micro_run, tmp_path, capsys, monkeypatch):
    run = _run_copy(micro_run, tmp_path)
    before = _files(run)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a machine without a GPU, even on one with
    assert "--device cuda" in _error(capsys, str(run), "--device", "cuda")
    widths = {"0": [0.1] * 160, "1": [0.1] * 160}
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text(json.dumps({"key": {"model": str(tmp_path / "other")}, "thresholds": widths}))
    assert f"computed for {tmp_path / 'other'}" in _error(capsys, str(run), "--thresholds", str(elsewhere))
    wrong_shape = tmp_path / "three_layers.json"
    wrong_shape.write_text(json.dumps({"thresholds": {**widths, "2": [0.1] * 160}}))
    assert "do not fit" in _error(capsys, str(run), "--thresholds", str(wrong_shape))
    assert _files(run) == before  # a refused command writes nothing into the run
    plain = tmp_path / "opt"
    OPTForCausalLM(OPTConfig(vocab_size=100, hidden_size=32, ffn_dim=48, num_hidden_layers=1, num_attention_heads=4,
                             word_embed_proj_dim=32, max_position_embeddings=64)).save_pretrained(plain)
    line = _error(capsys, str(plain), "--metric", "fat", "--value", "0.1", "--site", "gate")
    assert "--site gate" in line and "plain FFN" in line
