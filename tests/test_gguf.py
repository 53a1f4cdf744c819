"""GGUF files as models: one written here (F32, with its tokenizer) from a tiny Llama
measures as the Hugging Face model it came from, offline; series of GGUF files; refusals."""

from __future__ import annotations

import copy
import io
import json
import os
import subprocess
import sys

import gguf
import numpy as np
import pytest
import sentencepiece as spm
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from helpers import REPO
from sparsity_scaling.cli import main
from sparsity_scaling.data.corpus import file_documents
from sparsity_scaling.evaluation.inputs import tokenize_documents
from test_moe import assert_one_error_line

TEXT = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog.",
        "x = [1, 2, 3]  # three numbers\nprint(sum(x))\n"]
SEQ_LEN, EVAL_TOKENS = 32, 512
MEASURE = ["--seq-len", str(SEQ_LEN), "--eval-tokens", str(EVAL_TOKENS), "--batch-size", "4"]


def _tokenizer() -> spm.SentencePieceProcessor:
    """A tiny llama-style sentencepiece BPE (no normalisation; no byte pieces, to keep it small)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXT * 20), model_writer=model, vocab_size=70,
                                   model_type="bpe", character_coverage=1.0,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   minloglevel=2)
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def _llama(sp, windows: torch.Tensor, snapshots: tuple[int, ...], d_ff: int = 48) -> list[LlamaForCausalLM]:
    """A tiny Llama trained on the validation windows (so that its FFNs matter to its
    perplexity, as PPL-1% needs), as it is after each number of steps in `snapshots`."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=sp.vocab_size(), hidden_size=32, intermediate_size=d_ff, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=sp.bos_id(), eos_token_id=sp.eos_id(), tie_word_embeddings=False)
    return _trained(LlamaForCausalLM(config), windows, snapshots)


def _trained(model, windows: torch.Tensor, snapshots: tuple[int, ...] = (20,)) -> list:
    """The model trained on the validation windows, as it is after each number of steps."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-2)
    taken = []
    for step in range(max(snapshots) + 1):
        if step in snapshots:
            taken.append(copy.deepcopy(model).eval())
        batch = windows[step % 4 :: 4]
        model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return taken


def _permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's row order for q and k (rotary pairs interleaved), which loading undoes."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


ARCHES = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2, "gemma2": gguf.MODEL_ARCH.GEMMA2}


def _gguf_weight(name: str, weight: np.ndarray, config) -> np.ndarray:
    """A Hugging Face tensor as llama.cpp's converter stores it: llama's q and k rows
    permuted, gemma's norm weights w stored as 1 + w (its norms scale by 1 + w)."""
    if config.model_type == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
        heads = config.num_attention_heads if "q_proj" in name else config.num_key_value_heads
        return _permute(weight, heads)
    if config.model_type == "gemma2" and name.endswith("norm.weight"):
        return weight + 1
    return weight


def write_gguf(model, sp, path, quantize: gguf.GGMLQuantizationType | None = None) -> None:
    """The model and tokenizer as a GGUF file, as llama.cpp's converter writes them: F32, or
    its projection weights quantized to `quantize` by gguf.quants. A model that ties its
    output layer to the embedding gets no output tensor, as such files have."""
    c = model.config
    writer = gguf.GGUFWriter(str(path), c.model_type)
    writer.add_name("tiny")
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    if c.model_type == "gemma2":
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_sliding_window(c.sliding_window)
    n = sp.vocab_size()
    writer.add_tokenizer_model("llama")
    writer.add_token_list([sp.id_to_piece(i) for i in range(n)])
    writer.add_token_scores([sp.get_score(i) for i in range(n)])
    kinds = gguf.TokenType
    writer.add_token_types([kinds.UNKNOWN if sp.is_unknown(i) else kinds.CONTROL if sp.is_control(i)
                            else kinds.BYTE if sp.is_byte(i) else kinds.NORMAL for i in range(n)])
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.add_unk_token_id(sp.unk_id())
    names = gguf.get_tensor_name_map(ARCHES[c.model_type], c.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if c.tie_word_embeddings and name == "lm_head.weight":
            continue
        module, kind = name.rsplit(".", 1)
        weight = np.ascontiguousarray(_gguf_weight(name, tensor.float().numpy(), c))
        target = f"{names.get_name(module)}.{kind}"
        if quantize is not None and module.endswith("_proj") and kind == "weight":
            writer.add_tensor(target, gguf.quants.quantize(weight, quantize), raw_dtype=quantize)
        else:
            writer.add_tensor(target, weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A Hugging Face directory, the same model as a GGUF file, two earlier checkpoints of
    its training as GGUF files, validation text, and the text's tokens as the sentencepiece
    model itself gives them."""
    root = tmp_path_factory.mktemp("gguf")
    sp = _tokenizer()
    text = root / "valid.txt"
    text.write_text("\n".join(TEXT * 40))
    windows = tokenize_documents(file_documents(str(text)), (sp.encode, sp.eos_id()), SEQ_LEN, EVAL_TOKENS)
    np.save(root / "valid.npy", windows.numpy())
    step5, step10, model = _llama(sp, windows, snapshots=(5, 10, 20))
    model.save_pretrained(root / "hf")
    write_gguf(model, sp, root / "model.gguf")
    for step, checkpoint in ((5, step5), (10, step10)):  # a series: checkpoints of one training
        write_gguf(checkpoint, sp, root / f"step{step}.gguf")
        checkpoint.save_pretrained(root / f"hf-step{step}")  # the same, to measure on its own
    return root, sp, windows


def test_a_gguf_file_measures_as_the_model_it_came_from_offline(files, tmp_path):
    root, _, _ = files
    assert main(["evaluate", "--hf-model", str(root / "hf"), "--tokens", str(root / "valid.npy"),
                 "--json", str(tmp_path / "hf.json"), "--batch-size", "4"]) == 0  # the file's tokens as they are
    empty_cache = tmp_path / "hf-home"  # nothing cached, and the hub offline: a download would fail
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(empty_cache), "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "sparsity_scaling.cli", "evaluate", "--hf-model",
                             str(root / "model.gguf"), "--data", str(root / "valid.txt"),
                             "--json", str(tmp_path / "gguf.json"), *MEASURE],
                            capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    hf, from_gguf = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("hf", "gguf"))
    assert from_gguf["data_hash"] == hf["data_hash"]  # the GGUF's tokenizer gave the same tokens
    for key in ("dense_ppl", "sparse_ppl", "activation_ratio", "cett"):
        assert from_gguf[key] == pytest.approx(hf[key], rel=1e-5), key
    assert from_gguf["thresholds"] == pytest.approx(hf["thresholds"], rel=1e-4)
    assert from_gguf["layer_activation_ratios"] == pytest.approx(hf["layer_activation_ratios"], abs=1e-6)
    assert 0 < from_gguf["activation_ratio"] < 1 and from_gguf["ppl_ratio"] == pytest.approx(1.01, abs=0.01)
    assert not any(empty_cache.rglob("*.gguf")) and not any(empty_cache.rglob("*.safetensors"))


class _Renamed:
    """A sentencepiece model with one piece renamed: another tokenizer of the same size."""

    def __init__(self, sp):
        self.sp = sp

    def __getattr__(self, name):
        return getattr(self.sp, name)

    def id_to_piece(self, i):
        return self.sp.id_to_piece(i) + ("x" if i == self.sp.vocab_size() - 1 else "")


def test_a_series_of_gguf_files_and_its_checks(files, tmp_path, capsys):
    """Each point is what its checkpoint gives measured on its own (its Hugging Face
    directory, `evaluate --metric cett` at the series' CETT), that CETT is the one whose PPL
    ratio averaged over the --last 2 is 1.01, and a series that is not one model's history
    is refused in one line, with no result file."""
    root, sp, windows = files
    series = [str(root / "step10.gguf"), str(root / "step5.gguf")]  # in any order
    data = ["--data", str(root / "valid.txt")]
    out = tmp_path / "series.json"
    assert main(["evaluate-series", *series, "--tokens-per-step", "1000", *data, "--last", "2", "--out", str(out),
                 *MEASURE]) == 0
    trajectory = json.loads(out.read_text())
    assert trajectory["token_passed"] == [5_000, 10_000]
    alone = []
    for step in (5, 10):
        result = tmp_path / f"alone-{step}.json"
        assert main(["evaluate", "--hf-model", str(root / f"hf-step{step}"), "--tokens", str(root / "valid.npy"),
                     "--metric", "cett", "--value", repr(trajectory["cett"]), "--batch-size", "4",
                     "--json", str(result)]) == 0
        alone.append(json.loads(result.read_text()))
    assert trajectory["activation_ratio"] == pytest.approx([a["activation_ratio"] for a in alone], abs=5e-4)
    assert [p["ppl_ratio"] for p in trajectory["checkpoints"]] == pytest.approx([a["ppl_ratio"] for a in alone],
                                                                                abs=5e-4)
    assert sum(a["ppl_ratio"] for a in alone) / 2 == pytest.approx(1.01, abs=1e-3)
    assert alone[0]["activation_ratio"] != pytest.approx(alone[1]["activation_ratio"], abs=1e-3)  # two models

    wider = tmp_path / "step30.gguf"
    write_gguf(_llama(sp, windows, snapshots=(0,), d_ff=64)[0], sp, wider)
    other_tokenizer = tmp_path / "step40.gguf"
    write_gguf(_llama(sp, windows, snapshots=(0,))[0], _Renamed(sp), other_tokenizer)
    (tmp_path / "iter_5.gguf").write_bytes((root / "step5.gguf").read_bytes())
    refused = [
        ([*series, str(wider)], f"{wider}: its shape"),
        ([*series, str(other_tokenizer)], f"{other_tokenizer}: its tokenizer differs from {series[0]}'s"),
        ([*series, str(tmp_path / "iter_5.gguf")], "two models of the series share the trained-token count 5,000"),
        ([*series, str(root / "model.gguf")], f"{root / 'model.gguf'}: no step number in its name"),
        ([series[1], str(root / "hf-step10")], f"{root / 'hf-step10'}: its tokenizer differs"),  # GGUF and directory
    ]
    for models, says in refused:
        capsys.readouterr()
        assert main(["evaluate-series", *models, "--tokens-per-step", "1000", *data, "--last", "2",
                     "--out", str(tmp_path / "refused.json")]) == 2, says
        assert_one_error_line(capsys.readouterr().err, f"sparsity-scaling: error: {says}")
        assert not (tmp_path / "refused.json").exists()


def test_a_file_that_is_not_gguf_is_refused_in_one_line(tmp_path, capsys):
    """The README's `evaluate --hf-model notes.gguf`: one line, exit status 2, no result file."""
    notes = tmp_path / "notes.gguf"
    notes.write_text("meeting notes, not a model\n")
    (tmp_path / "valid.txt").write_text("\n".join(TEXT))
    out = tmp_path / "result.json"
    capsys.readouterr()
    assert main(["evaluate", "--hf-model", str(notes), "--data", str(tmp_path / "valid.txt"),
                 "--json", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert_one_error_line(err, f"sparsity-scaling: error: {notes}: not a readable GGUF file (GGUF magic invalid)")
    assert not out.exists()


def test_gguf_refusals_are_one_line(files, tmp_path, capsys, monkeypatch):
    root, _, _ = files
    other = tmp_path / "rwkv.gguf"
    writer = gguf.GGUFWriter(str(other), "rwkv6")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tokens = ["--tokens", str(root / "valid.npy")]
    capsys.readouterr()
    assert main(["evaluate", "--hf-model", str(other), *tokens]) == 2
    assert_one_error_line(capsys.readouterr().err,
                          f"sparsity-scaling: error: {other}: GGUF architecture rwkv6 is not supported")

    monkeypatch.setitem(sys.modules, "gguf", None)  # as if the gguf extra were not installed
    assert main(["evaluate", "--hf-model", str(root / "model.gguf"), *tokens]) == 2
    assert_one_error_line(capsys.readouterr().err,
                          f"sparsity-scaling: error: {root / 'model.gguf'}: reading GGUF files needs the gguf "
                          "package; install the extra: pip install 'sparsity-scaling[gguf]'")


def _family(family: str, sp, windows: torch.Tensor, tied: bool):
    """A tiny model of one family transformers' GGUF reader supports, trained on the
    validation windows (so that its FFNs matter to its perplexity)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM, Qwen2Config, Qwen2ForCausalLM

    shape = dict(vocab_size=sp.vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                 bos_token_id=sp.bos_id(), eos_token_id=sp.eos_id(), tie_word_embeddings=tied)
    torch.manual_seed(1)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**shape))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**shape))
    else:
        # A GGUF file carries no query_pre_attn_scalar; transformers reads gemma2's default, 256.
        model = Gemma2ForCausalLM(Gemma2Config(**shape, head_dim=8, query_pre_attn_scalar=256, sliding_window=32))
    return _trained(model, windows)[0]


def _both(model, sp, root, name, quantize=None) -> tuple:
    """The model as a GGUF file and as the Hugging Face directory it must load as."""
    write_gguf(model, sp, root / f"{name}.gguf", quantize)
    model.save_pretrained(root / name)
    return root / f"{name}.gguf", root / name


def _measure(model, tokens, out) -> dict:
    assert main(["evaluate", "--hf-model", str(model), "--tokens", str(tokens), "--metric", "ppl-p", "--p", "1",
                 "--batch-size", "4", "--json", str(out)]) == 0
    return json.loads(out.read_text())


FAMILIES = [("llama", True), ("llama", False), ("qwen2", True), ("qwen2", False), ("gemma2", True)]


@pytest.mark.parametrize("family,tied", FAMILIES, ids=[f"{f}-{'tied' if t else 'untied'}" for f, t in FAMILIES])
def test_each_family_loads_as_its_hugging_face_directory(files, tmp_path, family, tied):
    """Tied files have no output tensor; gemma stores its norms as 1 + w; llama permutes q
    and k: whatever the file's conventions, the logits and PPL-1% are the directory's."""
    from sparsity_scaling.hf.causal_lm import HFCausalLM

    root, sp, windows = files
    model = _family(family, sp, windows, tied)
    from_gguf, directory = (HFCausalLM.load(path) for path in _both(model, sp, tmp_path, family))
    head, embedding = from_gguf.model.get_output_embeddings().weight, from_gguf.model.get_input_embeddings().weight
    assert (head.data_ptr() == embedding.data_ptr()) == tied
    with torch.no_grad():
        expected = model(input_ids=windows[:4]).logits
        assert torch.allclose(directory.logits(windows[:4]), expected, atol=1e-5)
        assert torch.allclose(from_gguf.logits(windows[:4]), expected, atol=1e-5)
    ours, theirs = (_measure(tmp_path / path, root / "valid.npy", tmp_path / f"{path}.json")
                    for path in (f"{family}.gguf", family))
    for key in ("dense_ppl", "sparse_ppl", "activation_ratio", "cett"):
        assert ours[key] == pytest.approx(theirs[key], rel=1e-5), key
    assert 0 < ours["activation_ratio"] < 1 and ours["ppl_ratio"] == pytest.approx(1.01, abs=0.01)


def test_a_quantized_file_reads_as_its_dequantized_weights(files, tmp_path):
    """Q4_1 projections written by gguf.quants load as gguf.quants.dequantize gives them
    (the reference directory holds the dequantized weights), not as the unquantized ones."""
    from sparsity_scaling.hf.causal_lm import HFCausalLM

    root, sp, windows = files
    model = _family("llama", sp, windows, tied=True)
    quantized = tmp_path / "q4_1.gguf"
    write_gguf(model, sp, quantized, gguf.GGMLQuantizationType.Q4_1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("_proj.weight"):
                blocks = gguf.quants.quantize(param.numpy(), gguf.GGMLQuantizationType.Q4_1)
                param.copy_(torch.from_numpy(gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q4_1)))
    model.save_pretrained(tmp_path / "dequantized")
    loaded = HFCausalLM.load(quantized)
    reference = dict(model.named_parameters())
    gate = reference["model.layers.0.mlp.gate_proj.weight"]
    assert 0 < len(torch.unique(gate[0])) <= 16  # 4 bits per weight in each block of 32
    for name, param in loaded.model.named_parameters():
        assert param.dtype == torch.float32 and torch.equal(param, reference[name]), name
    ours, theirs = (_measure(path, root / "valid.npy", tmp_path / f"{path.name}.json")
                    for path in (quantized, tmp_path / "dequantized"))
    for key in ("dense_ppl", "activation_ratio", "cett"):
        assert ours[key] == pytest.approx(theirs[key], rel=1e-5), key


def _broken(model, where: str) -> None:
    """Break a sound model the ways a bad load does."""
    with torch.no_grad():
        if where == "output layer":
            model.lm_head.weight.zero_()
        elif where == "final norm":  # every hidden state zero before the (sound) output layer
            model.model.norm.weight.copy_(-torch.ones_like(model.model.norm.weight))  # gemma scales by 1 + w
        else:  # every FFN's output scaled to zero after the FFN: masking its neurons changes nothing
            for layer in model.model.layers:
                layer.post_feedforward_layernorm.weight.copy_(-torch.ones_like(layer.post_feedforward_layernorm.weight))


BROKEN = [
    ("llama", False, "output layer", "is all zeros: weights not loaded?"),
    ("gemma2", True, "final norm", "is the vocabulary size 70: the model predicts every token as equally likely"),
    ("gemma2", True, "ffn outputs", "masking every FFN neuron leaves the perplexity unchanged"),
]


@pytest.mark.parametrize("family,tied,where,says", BROKEN, ids=[b[2].replace(" ", "-") for b in BROKEN])
def test_a_model_that_cannot_be_right_is_refused(files, tmp_path, capsys, family, tied, where, says):
    """Whatever its source (a GGUF file, a Hugging Face directory), a model whose output
    cannot depend on its FFNs is refused in one line with the likely cause; no result file."""
    root, sp, windows = files
    model = _family(family, sp, windows, tied)
    _broken(model, where)
    for path in _both(model, sp, tmp_path, "broken"):
        out = tmp_path / f"{path.name}.json"
        capsys.readouterr()
        assert main(["evaluate", "--hf-model", str(path), "--tokens", str(root / "valid.npy"), "--metric", "ppl-p",
                     "--p", "1", "--batch-size", "4", "--json", str(out)]) == 2
        err = capsys.readouterr().err
        assert_one_error_line(err, "sparsity-scaling: error: ")
        assert says in err and "too small" not in err, err
        assert not out.exists()
