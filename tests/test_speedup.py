"""`sparsity-scaling speedup`: its points, the activation ratios it reports, and bad input."""

from __future__ import annotations

import json
import shutil

import torch
from transformers import OPTConfig, OPTForCausalLM

from sparsity_scaling.cli.program import main
from sparsity_scaling.rundir import RunDir

FAST = ["--prompt", "4", "--steps", "4", "--repeats", "1", "--eval-tokens", "1024"]


def test_a_sweep_reports_speedups_at_the_ratios_the_rule_gives(micro_run, tmp_path, capsys):
    run = tmp_path / "run"  # the command writes RUN/speedup.json: not into the shared run
    shutil.copytree(micro_run, run)
    out = tmp_path / "out"
    assert main(["speedup", str(run), "--sweep", "0.3,0.1", "--out", str(out), "--json",
                 str(tmp_path / "s.json"), *FAST]) == 0
    record = json.loads((tmp_path / "s.json").read_text())
    assert [p["setting"]["target_ratio"] for p in record["points"]] == [0.3, 0.1]
    for point in record["points"]:
        assert 0 < point["activation_ratio"] < 1 and 0 < point["ffn_flop_fraction"] < 1
        assert point["flop_bound"] == 1 / point["ffn_flop_fraction"]
        assert point["ffn_speedup"] == point["ffn_ms_dense"] / point["ffn_ms_sparse"]
    assert record["points"][1]["activation_ratio"] < record["points"][0]["activation_ratio"]
    assert (out / "speedup.png").stat().st_size > 0 and json.loads((out / "speedup.json").read_text()) == record
    assert RunDir(run).speedup_record()["points"] == record["points"]  # for the grid report
    assert "FFN speedup" in capsys.readouterr().out


def test_the_activation_ratio_is_the_probes_count_while_decoding(micro_run, world_of_one):
    from sparsity_scaling.analysis.models import parse_model
    from sparsity_scaling.analysis.speedup import SpeedupSettings, decode, decode_target, measure
    from sparsity_scaling.metrics.rules import SparsifyingProbe, TopK
    target = decode_target(parse_model(str(micro_run)), "cpu")
    tokens = torch.randint(0, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    rule = TopK(k=20)
    point = measure(target, rule, tokens, SpeedupSettings(batch=2, prompt=4, steps=8, repeats=1))
    probe = SparsifyingProbe(rule)
    with target.probing(probe):
        decode(target.model, tokens, 4, after_prompt=lambda: (probe.active.clear(), probe.total.clear()))
    assert point["activation_ratio"] == sum(probe.active.values()) / sum(probe.total.values())
    assert 20 / 160 * 0.5 < point["activation_ratio"] <= 20 / 160


def _error(capsys, *argv) -> str:
    """The error line of a refused command (progress lines may come before it)."""
    assert main(["speedup", *argv, *FAST]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("sparsity-scaling: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def test_bad_input_is_one_line(micro_run, tmp_path, capsys):
    assert "--device cuda" in _error(capsys, str(micro_run), "--device", "cuda") or torch.cuda.is_available()
    widths = {"0": [0.1] * 160, "1": [0.1] * 160}
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text(json.dumps({"key": {"model": str(tmp_path / "other")}, "thresholds": widths}))
    assert f"computed for {tmp_path / 'other'}" in _error(capsys, str(micro_run), "--thresholds", str(elsewhere))
    wrong_shape = tmp_path / "three_layers.json"
    wrong_shape.write_text(json.dumps({"thresholds": {**widths, "2": [0.1] * 160}}))
    assert "do not fit" in _error(capsys, str(micro_run), "--thresholds", str(wrong_shape))
    plain = tmp_path / "opt"
    OPTForCausalLM(OPTConfig(vocab_size=100, hidden_size=32, ffn_dim=48, num_hidden_layers=1, num_attention_heads=4,
                             word_embed_proj_dim=32, max_position_embeddings=64)).save_pretrained(plain)
    line = _error(capsys, str(plain), "--metric", "fat", "--value", "0.1", "--site", "gate")
    assert "--site gate" in line and "plain FFN" in line
