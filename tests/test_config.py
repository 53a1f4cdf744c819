"""Configs: the paper's scales, validation errors, overrides and the checkpoint schedule."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import REPO, run_cli, run_here
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


# The shipped configs' run hashes, and a few variants of micro's, as the code computed them
# before fields declared their part in a run's identity (commit fd5d2d2): a run directory made
# then must still be claimed by the same config.
SHIPPED_HASHES = {"0.1b": "8b18b23ffef11601", "0.2b": "9ec05e4009350590", "0.4b": "74be5fab0164185b",
                  "0.8b": "086fb53452fcef4b", "1.2b": "734d8b94c6da169b", "2.4b": "00fa30fc178b06d6",
                  "micro": "719dc57a168ed86e", "tiny": "e44cd7216db0b1cd"}
MICRO_VARIANTS = [
    (["checkpoint.keep_engine=5"], "719dc57a168ed86e"),
    (["train.activation_checkpointing=true"], "719dc57a168ed86e"),
    (["train.skip_nonfinite_steps=3"], "719dc57a168ed86e"),
    (["data.max_epochs=3"], "719dc57a168ed86e"),
    (["data.blend=[{prefix: a/b, weight: 1.0}]", "data.tokenizer=t.model", "data.corpus=null"], "31846e6699ac9224"),
    (["train.decay_data=[{prefix: c/d, weight: 2.0}]", "data.tokenizer=t.model"], "1cd7d2485c1ab29d"),
    (["data.cache_dir=/x"], "d847911ce46ea1da"),
    (["train.log_every=5"], "cb5264947d323906"),
    (["model.name=other"], "1537f95ffd4fbf0d"),
    (["train.lr=0.02"], "ec1dc196f03c4025"),
]


def test_every_shipped_config_keeps_its_run_hash():
    assert {path.stem: load_config(path).hash() for path in sorted(MODELS.glob("*.yaml"))} == SHIPPED_HASHES


@pytest.mark.parametrize("overrides, expected", MICRO_VARIANTS, ids=[" ".join(o)[:40] for o, _ in MICRO_VARIANTS])
def test_settings_enter_the_run_hash_as_they_did(overrides, expected):
    assert load_config(MODELS / "micro.yaml", overrides).hash() == expected


def test_a_field_added_when_set_orphans_no_run_and_an_unmarked_one_would():
    """What the golden hashes guard against: a new field with a default, unmarked, changes
    the hash of every existing run; marked `WHEN_SET`, only of runs that set it."""
    from typing import Annotated

    from sparsity_scaling.config import WHEN_SET, TrainConfig

    class Marked(TrainConfig):
        new_knob: Annotated[float, WHEN_SET] = 0.5

    class Unmarked(TrainConfig):
        new_knob: float = 0.5

    config = load_config(MODELS / "micro.yaml")
    with_field = {cls: config.model_copy(update={"train": cls(**config.train.model_dump())}) for cls in (Marked, Unmarked)}
    assert with_field[Marked].hash() == config.hash() != with_field[Unmarked].hash()
    moved = config.model_copy(update={"train": Marked(**config.train.model_dump(), new_knob=0.7)})
    assert moved.hash() != config.hash()
