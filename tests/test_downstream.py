"""`sparsity-scaling downstream`: lm-eval tasks dense and at a sparsity setting, offline."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from conftest import mlflow_run_dir
from sparsity_scaling.cli import main

TASKS = "sparsity_smoke"
LIMIT = "8"


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    """A Hugging Face Llama directory with random weights and a byte-level BPE tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tiny_llama")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = Path(json.__file__).read_text() + Path(torch.__file__).read_text()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(out)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                         hidden_act="silu", bos_token_id=0, eos_token_id=1)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def _scores(record: dict, column: str) -> dict:
    return {(r["task"], r["metric"]): r[column] for r in record["rows"]}


def test_dense_scores_equal_lm_evals_own_run_and_an_empty_setting_changes_nothing(tiny_llama, tmp_path, capfd):
    from lm_eval import simple_evaluate

    from sparsity_scaling.downstream.tasks import go_offline, task_manager

    out = tmp_path / "down.json"
    # FAT at eps 0 keeps every neuron: the sparse column must equal the dense one
    status = main(["downstream", str(tiny_llama), "--tasks", TASKS, "--limit", LIMIT, "--metric", "fat",
                   "--value", "0", "--json", str(out)])
    assert status == 0
    printed = capfd.readouterr().out
    record = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    dense, sparse = _scores(record, "dense"), _scores(record, "sparse")
    assert {task for task, _ in dense} == {"sparsity_smoke_prose", "sparsity_smoke_code"}
    assert sparse == dense
    assert all(r["activation_ratio"] == pytest.approx(1.0) for r in record["rows"])
    assert "sparsity_smoke_prose" in printed and "activation ratio" in printed

    go_offline()
    theirs = simple_evaluate(model="hf", model_args={"pretrained": str(tiny_llama), "dtype": "float32"},
                             tasks=[TASKS], limit=int(LIMIT), batch_size=1, bootstrap_iters=0, device="cpu",
                             task_manager=task_manager([], Path(os.environ["SPARSITY_SCALING_CACHE"])))
    expected = {(task, key.split(",")[0]): value for task, metrics in theirs["results"].items()
                for key, value in metrics.items() if key.endswith(",none") and "_stderr" not in key}
    assert dense == expected


def test_thresholds_mask_the_task_text_and_the_ratio_is_the_probes_count(micro_run, tmp_path):
    from sparsity_scaling.data.tokenizer import load_tokenizer
    from sparsity_scaling.downstream.tasks import smoke_tasks_dir
    from sparsity_scaling.hf import load_target
    from sparsity_scaling.metrics.result import load_thresholds
    from sparsity_scaling.metrics.rules import PerNeuronThreshold, SparsifyingProbe
    from sparsity_scaling.parallel import init_parallel, shutdown_parallel
    from sparsity_scaling.rundir import RunDir, read_checkpoint

    checkpoint = RunDir(micro_run).checkpoints()[-1].path
    evaluation = tmp_path / "ppl1.json"
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--eval-tokens", "2048", "--json", str(evaluation)]) == 0
    thresholds = evaluation.with_name("ppl1.thresholds.json")
    out = tmp_path / "down.json"
    mlflow, run_id, run_dir = mlflow_run_dir(tmp_path)
    assert main(["downstream", str(checkpoint), "--tasks", "sparsity_smoke_prose", "--limit", LIMIT,
                 "--thresholds", str(thresholds), "--json", str(out), "--mlflow-run", str(run_dir)]) == 0
    record = json.loads(out.read_text())
    reported = {r["activation_ratio"] for r in record["rows"]}
    assert len(reported) == 1 and 0 < next(iter(reported)) < 1
    kept = RunDir(micro_run).downstream_record()  # what the grid report shows
    assert kept["rows"] == record["rows"] and kept["checkpoint"] == checkpoint.name
    logged = mlflow.get_run(run_id).data.metrics
    acc = next(r for r in record["rows"] if r["metric"] == "acc")
    assert logged["downstream/sparsity_smoke_prose/acc/dense"] == pytest.approx(acc["dense"])
    assert logged["downstream/sparsity_smoke_prose/acc/sparse"] == pytest.approx(acc["sparse"])
    assert logged["downstream/sparsity_smoke_prose/activation_ratio"] == pytest.approx(next(iter(reported)))
    assert sorted(a.path for a in mlflow.list_artifacts(run_id, "downstream")) == ["downstream/down.json",
                                                                                   "downstream/down.png"]

    # recount: every choice of every item, tokenized as lm-eval's causal models do, through the probe
    items = [json.loads(line) for line in
             (smoke_tasks_dir(Path(os.environ["SPARSITY_SCALING_CACHE"])) / "sparsity_smoke_prose.jsonl")
             .read_text().splitlines()][: int(LIMIT)]
    tok = load_tokenizer(RunDir(micro_run).tokenizer)
    init_parallel(1)
    try:
        model = load_target(checkpoint=checkpoint)
        probe = SparsifyingProbe(PerNeuronThreshold(thresholds=load_thresholds(thresholds).thresholds))
        seq_len = read_checkpoint(checkpoint).config().data.seq_len
        with torch.no_grad(), model.probing(probe):
            for item in items:
                for choice in item["choices"]:
                    whole = tok.encode([item["context"] + choice])[0]
                    model.logits(torch.tensor([whole[-(seq_len + 1):][:-1]]))
    finally:
        shutdown_parallel()
    assert next(iter(reported)) == pytest.approx(sum(probe.active.values()) / sum(probe.total.values()), rel=1e-12)


def test_bad_input_is_one_error_line(micro_run, tmp_path, capfd):
    from sparsity_scaling.rundir import RunDir

    checkpoint = str(RunDir(micro_run).checkpoints()[-1].path)
    foreign = tmp_path / "foreign.thresholds.json"
    foreign.write_text(json.dumps({"key": {}, "rule": "|a_i| >= threshold_i", "thresholds": {"0": [0.1] * 3}}))
    cases = {
        ("--tasks", "no_such_task"): "no_such_task",
        ("--tasks", "piqa"): "piqa: its data is not on this machine",  # in the registry, never downloaded
        ("--tasks", TASKS, "--thresholds", str(foreign)): "do not fit",
        ("--tasks", TASKS, "--include-path", str(tmp_path / "missing")): "--include-path",
        ("--tasks", TASKS, "--thresholds", str(foreign), "--metric", "relu"): "not both",
    }
    for args, words in cases.items():
        capfd.readouterr()
        status = main(["downstream", checkpoint, *args, "--json", str(tmp_path / "never.json")])
        err = capfd.readouterr().err
        assert status == 2, (args, err[-2000:])
        errors = [line for line in err.strip().splitlines() if "error" in line.lower() or "Traceback" in line]
        assert len(errors) == 1 and errors[0] == err.strip().splitlines()[-1], (args, err[-2000:])
        assert errors[0].startswith("sparsity-scaling: error: ") and words in errors[0], (args, err[-2000:])
        assert not (tmp_path / "never.json").exists()
