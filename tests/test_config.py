"""Configs: the paper's scales, validation errors, overrides and the checkpoint schedule."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import REPO, run_cli, run_here
from distributed import run_ranks
from sparsity_scaling.config import checkpoint_tokens, load_config
from sparsity_scaling.errors import UserError

PAPER_PARAMS = {"0.1b": 1.08e8, "0.2b": 2.41e8, "0.4b": 4.52e8, "0.8b": 7.60e8, "1.2b": 1.18e9, "2.4b": 2.4e9}
MODELS = REPO / "configs" / "models"


def _count_on_meta(names):
    """Build every paper model on the meta device (no memory) and count its parameters."""
    from sparsity_scaling.model import MiniCPM
    from sparsity_scaling.parallel import init_parallel

    init_parallel(1)
    counts = {}
    for name in names:
        cfg = load_config(MODELS / f"{name}.yaml")
        with torch.device("meta"):
            model = MiniCPM(cfg.model, vocab_size=32000)
        assert all(p.is_meta for p in model.parameters())
        non_embedding = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("embed."))
        counts[name] = (non_embedding, cfg.model.non_embedding_params())
    return counts


def test_paper_scales_match_the_papers_table():
    counts = run_ranks(1, _count_on_meta, list(PAPER_PARAMS))[0]
    for name, target in PAPER_PARAMS.items():
        built, formula = counts[name]
        assert built == formula, name
        assert abs(built - target) / target < 0.01, (name, built, target)  # the README promises 1%
        cfg = load_config(MODELS / f"{name}.yaml").model
        assert 48 <= cfg.width_depth_ratio <= 56, (name, cfg.width_depth_ratio)
        assert cfg.d_ff == 2.5 * cfg.d_model, name


def test_override_accepts_scientific_token_counts():
    config = load_config(MODELS / "micro.yaml", ["train.tokens=2e6", "model.activation=silu"])
    assert config.train.tokens == 2_000_000
    assert config.model.activation == "silu"


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["model.activation=tanh"], "model.activation"),
        (["train.lr_typo=1"], "train.lr_typo"),
        (["parallel.tp=3"], "parallel.tp 3 does not divide model.n_heads"),
        (["train.tokens=abc"], "train.tokens"),
        (["train.batch_tokens=1000"], "data.seq_len"),
    ],
)
def test_bad_values_name_file_and_field(overrides, field):
    with pytest.raises(UserError) as error:
        load_config(MODELS / "micro.yaml", overrides)
    message = str(error.value)
    assert message.startswith(str(MODELS / "micro.yaml")) and field in message
    assert "\n" not in message


def test_cli_reports_bad_config_in_one_line_with_status_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {d_model: 64, n_layers: 2, n_heads: 3, d_ff: 160}\n")
    result = run_here("train", str(bad), "--out", str(tmp_path / "run"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "bad.yaml" in lines[0] and "model" in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()

    missing = run_here("train", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "run"))
    assert missing.returncode == 2 and "nope.yaml" in missing.stderr and "Traceback" not in missing.stderr


def test_checkpoints_are_log_spaced_with_a_dense_final_stretch():
    config = load_config(
        MODELS / "micro.yaml",
        ["train.tokens=1048576", "train.batch_tokens=1024", "checkpoint.first_tokens=1024",
         "checkpoint.count=11", "checkpoint.final_count=5", "checkpoint.final_fraction=0.1"],
    )
    tokens = checkpoint_tokens(config)
    assert tokens[0] == 1024 and tokens[-1] == 1048576
    assert all(t % 1024 == 0 for t in tokens) and tokens == sorted(set(tokens))
    log_part = [t for t in tokens if t < 0.9 * 1048576]
    ratios = [b / a for a, b in zip(log_part, log_part[1:])]
    assert max(ratios) / min(ratios) < 1.5  # geometric spacing
    assert len([t for t in tokens if t > 0.9 * 1048576]) >= 5
    assert math.isclose(ratios[0], 2.0, rel_tol=0.05)
