"""`sparsity-scaling downstream`: lm-eval tasks dense and at a sparsity setting, offline."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from helpers import mlflow_run_dir
from sparsity_scaling.cli import main

TASKS = "sparsity_smoke"
LIMIT = "8"
FORKS: list[int] = []  # a pid for each os.fork() in this process (subprocesses do not count)
os.register_at_fork(before=lambda: FORKS.append(os.getpid()))


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


def _yaml(task: str, data: Path, output: str, metrics: str, extra: str = "") -> str:
    return (f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
            f"test_split: test\noutput_type: {output}\ndoc_to_text: context\ndoc_to_target: target\n"
            f"target_delimiter: \"\"\nfewshot_delimiter: \"\\n\\n\"\nmetric_list:\n{metrics}{extra}")


class _Model:
    """The checkpoint with hooks of this test's own on its FFNs' down projections (whose input
    is the activation a): log-likelihoods and greedy generations, dense or with
    |a_i| >= threshold_i applied to every FFN, counting the entries kept and seen."""

    def __init__(self, checkpoint: Path, tokenizer: Path, seq_len: int):
        from sparsity_scaling.data.tokenizer import load_tokenizer
        from sparsity_scaling.hf import load_target

        self.target, self.tok, self.seq_len = load_target(checkpoint=checkpoint), load_tokenizer(tokenizer), seq_len
        self.downs = [ffn.down for ffn in self.target.ffns]
        self.thresholds = None
        self.kept = self.total = 0

    def encode(self, text: str) -> list[int]:
        return self.tok.encode([text])[0]

    @torch.no_grad()
    def logits(self, tokens: list[int]) -> torch.Tensor:
        def masking(layer):
            def hook(module, args):
                a = args[0]
                mask = a.abs() >= self.thresholds[layer]
                self.kept, self.total = self.kept + int(mask.sum()), self.total + mask.numel()
                return (a * mask, *args[1:])
            return hook

        handles = [] if self.thresholds is None else [d.register_forward_pre_hook(masking(i))
                                                       for i, d in enumerate(self.downs)]
        try:
            return self.target.logits(torch.tensor([tokens]))[0]
        finally:
            for handle in handles:
                handle.remove()

    def loglikelihood(self, context: str, continuation: str) -> float:
        """log p(continuation | context), tokenized as lm-eval's causal models do."""
        context_ids, whole = self.encode(context), self.encode(context + continuation)
        wanted = whole[len(context_ids):]
        tokens = whole[-(self.seq_len + 1):][:-1]  # what fits the model: the last tokens
        wanted = wanted[-len(tokens):]
        logprobs = torch.log_softmax(self.logits(tokens)[-len(wanted):], dim=-1)
        return float(logprobs.gather(1, torch.tensor(wanted)[:, None]).sum())

    def generate(self, context: str, budget: int) -> str:
        """Greedy decoding of `budget` tokens at most, stopping at end of text or a newline."""
        tokens, new = self.encode(context)[-max(1, self.seq_len - budget):], []
        while len(new) < budget:
            next_id = int(self.logits(tokens + new)[-1, : self.tok.vocab_size].argmax())
            if next_id == self.tok.eos_id:
                break
            new.append(next_id)
            if "\n" in self.tok.decode(new):
                break
        return self.tok.decode(new).split("\n")[0]


def test_thresholds_mask_the_task_text_and_the_ratio_is_the_probes_count(micro_run, tmp_path, monkeypatch):
    """On tasks of each request type, the sparse column is what the thresholds give when
    they mask the task's text (recomputed here with hooks of this test's own on the model's
    down projections, not the probe), unlike the dense one; the activation ratio is their count."""
    import shutil

    from sparsity_scaling.downstream.tasks import smoke_tasks_dir
    from sparsity_scaling.parallel import init_parallel, shutdown_parallel
    from sparsity_scaling.rundir import RunDir, read_checkpoint

    try:
        run = tmp_path / "run"  # the command writes RUN/downstream.json: not into the shared run
        shutil.copytree(micro_run, run)
        checkpoint = RunDir(run).checkpoints()[-1].path
        init_parallel(1)  # the command ends it as it finishes, and here it starts again
        ours = _Model(checkpoint, RunDir(run).tokenizer, read_checkpoint(checkpoint).config().data.seq_len)
        items = [json.loads(line) for line in
                 (smoke_tasks_dir(Path(os.environ["SPARSITY_SCALING_CACHE"])) / "sparsity_smoke_prose.jsonl")
                 .read_text().splitlines()]
        seen = {}
        handles = [d.register_forward_pre_hook(lambda m, args, i=i: seen.setdefault(i, []).append(args[0].flatten(0, -2)))
                   for i, d in enumerate(ours.downs)]
        for item in items[-8:]:  # thresholds from text the tasks do not use
            ours.logits(ours.encode(item["context"]))
        for handle in handles:
            handle.remove()
        # per neuron, the 85th percentile of |a|, never 0 (a zero activation is never active)
        thresholds = {i: torch.quantile(torch.cat(a).abs(), 0.85, dim=0).clamp_min(1e-3) for i, a in seen.items()}
        saved = tmp_path / "mine.thresholds.json"
        saved.write_text(json.dumps({"thresholds": {str(i): t.tolist() for i, t in thresholds.items()}}))

        # tasks of our own: log-likelihood of the right continuation; greedy generation of 3 tokens,
        # two targets what dense decoding gives (the other two never), so dense exact match is 0.5
        tasks = tmp_path / "tasks"
        tasks.mkdir()
        loglikelihood = [{"context": i["context"], "target": i["choices"][i["label"]]} for i in items[:6]]
        (tasks / "ll.jsonl").write_text("".join(json.dumps(d) + "\n" for d in loglikelihood))
        (tasks / "tiny_ll.yaml").write_text(_yaml("tiny_ll", tasks / "ll.jsonl", "loglikelihood",
                                                  "  - {metric: perplexity, aggregation: perplexity, higher_is_better: false}\n"))
        generation = [{"context": i["context"], "target": ours.generate(i["context"], 3) if n < 2 else "never"}
                      for n, i in enumerate(items[6:10])]
        assert generation[0]["target"] and generation[1]["target"]
        (tasks / "gen.jsonl").write_text("".join(json.dumps(d) + "\n" for d in generation))
        (tasks / "tiny_gen.yaml").write_text(_yaml("tiny_gen", tasks / "gen.jsonl", "generate_until",
                                                   "  - {metric: exact_match, aggregation: mean, higher_is_better: true}\n",
                                                   "generation_kwargs: {until: [\"\\n\"], max_gen_toks: 3}\n"))

        out = tmp_path / "down.json"
        mlflow, run_id, run_dir = mlflow_run_dir(tmp_path)
        monkeypatch.delenv("DISABLE_MULTIPROC", raising=False)  # as a fresh process has it
        forks = len(FORKS)
        assert main(["downstream", str(checkpoint), "--tasks", "sparsity_smoke_prose,tiny_ll,tiny_gen", "--limit", LIMIT,
                     "--include-path", str(tasks), "--thresholds", str(saved), "--json", str(out),
                     "--mlflow-run", str(run_dir)]) == 0
        # perplexity's bootstrap standard error ran in this process: lm-eval's pool would fork this
        # one, with its torch and gloo threads, and a forked child can deadlock (it hung CI for 600 s)
        assert len(FORKS) == forks
        init_parallel(1)
        record = json.loads(out.read_text())
        rows = {(r["task"], r["metric"]): r for r in record["rows"]}

        def recount(texts):
            ours.thresholds, ours.kept, ours.total = thresholds, 0, 0
            for context, continuation in texts:
                ours.loglikelihood(context, continuation)
            return ours.kept, ours.total

        prose = [(i["context"], c) for i in items[: int(LIMIT)] for c in i["choices"]]
        for task, texts in (("sparsity_smoke_prose", prose), ("tiny_ll", [(d["context"], d["target"]) for d in loglikelihood])):
            kept, total = recount(texts)
            assert 0.05 < kept / total < 0.95  # the thresholds decide: some kept, some not
            ratio = {r["activation_ratio"] for key, r in rows.items() if key[0] == task}
            assert len(ratio) == 1 and ratio.pop() == pytest.approx(kept / total, rel=1e-12), task

        def perplexity(masked):
            ours.thresholds = thresholds if masked else None
            return math.exp(-sum(ours.loglikelihood(d["context"], d["target"]) for d in loglikelihood) / len(loglikelihood))

        dense, sparse = perplexity(False), perplexity(True)
        assert abs(sparse / dense - 1) > 1e-3  # the thresholds change what the model predicts
        assert rows[("tiny_ll", "perplexity")]["dense"] == pytest.approx(dense, rel=1e-4)
        assert rows[("tiny_ll", "perplexity")]["sparse"] == pytest.approx(sparse, rel=1e-4)
        assert rows[("tiny_gen", "exact_match")]["dense"] == 0.5
        ours.thresholds = thresholds
        sparse_match = sum(ours.generate(d["context"], 3) == d["target"] for d in generation) / len(generation)
        assert rows[("tiny_gen", "exact_match")]["sparse"] == sparse_match

        kept = RunDir(run).downstream_record()  # what the grid report shows
        assert kept["rows"] == record["rows"] and kept["checkpoint"] == checkpoint.name
        logged = mlflow.get_run(run_id).data.metrics
        acc = rows[("sparsity_smoke_prose", "acc")]
        assert logged["downstream/sparsity_smoke_prose/acc/dense"] == pytest.approx(acc["dense"])
        assert logged["downstream/sparsity_smoke_prose/acc/sparse"] == pytest.approx(acc["sparse"])
        assert logged["downstream/tiny_ll/activation_ratio"] == pytest.approx(rows[("tiny_ll", "perplexity")]["activation_ratio"])
        assert sorted(a.path for a in mlflow.list_artifacts(run_id, "downstream")) == ["downstream/down.json",
                                                                                       "downstream/down.png"]

        # --num-fewshot 1 on two documents: each one's context is the other, then its own
        pair = tmp_path / "pair"
        pair.mkdir()
        a, b = ({"context": " ".join(d["context"].split()[:3]), "target": " " + " ".join(d["target"].split()[:2])} for d in loglikelihood[:2])
        assert len(ours.encode(b["context"] + b["target"] + "\n\n" + a["context"] + a["target"])) <= ours.seq_len
        (pair / "pair.jsonl").write_text("".join(json.dumps(d) + "\n" for d in (a, b)))  # short: both fit the model
        (pair / "tiny_pair.yaml").write_text(_yaml("tiny_pair", pair / "pair.jsonl", "loglikelihood",
                                                   "  - {metric: perplexity, aggregation: perplexity, higher_is_better: false}\n"))
        assert main(["downstream", str(checkpoint), "--tasks", "tiny_pair", "--include-path", str(pair), "--num-fewshot", "1",
                     "--metric", "fat", "--value", "0", "--json", str(tmp_path / "pair.json")]) == 0
        init_parallel(1)
        [row] = json.loads((tmp_path / "pair.json").read_text())["rows"]
        ours.thresholds = None
        shots = [ours.loglikelihood(b["context"] + b["target"] + "\n\n" + a["context"], a["target"]),
                 ours.loglikelihood(a["context"] + a["target"] + "\n\n" + b["context"], b["target"])]
        assert row["dense"] == pytest.approx(math.exp(-sum(shots) / 2), rel=1e-4)
        zero_shot = [ours.loglikelihood(a["context"], a["target"]), ours.loglikelihood(b["context"], b["target"])]
        assert row["dense"] != pytest.approx(math.exp(-sum(zero_shot) / 2), rel=1e-4)
    finally:
        shutdown_parallel()


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
