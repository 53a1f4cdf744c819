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

from conftest import REPO
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
    model = LlamaForCausalLM(config)
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


def write_gguf(model: LlamaForCausalLM, sp, path, architecture: str = "llama") -> None:
    """The model and tokenizer as a GGUF file, as llama.cpp's converter writes them, in F32."""
    c = model.config
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("tiny")
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
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
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        module, kind = name.rsplit(".", 1)
        weight = tensor.float().numpy()
        if module.endswith("q_proj"):
            weight = _permute(weight, c.num_attention_heads)
        elif module.endswith("k_proj"):
            weight = _permute(weight, c.num_key_value_heads)
        writer.add_tensor(f"{names.get_name(module)}.{kind}", np.ascontiguousarray(weight))
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
    write_gguf(step5, sp, root / "step5.gguf")  # a series: checkpoints of one training
    write_gguf(step10, sp, root / "step10.gguf")
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


def test_a_series_of_gguf_files_and_its_checks(files, tmp_path, capsys):
    root, sp, windows = files
    series = [str(root / "step10.gguf"), str(root / "step5.gguf")]
    out = tmp_path / "series.json"
    assert main(["evaluate-series", *series, "--tokens-per-step", "1000", "--data", str(root / "valid.txt"),
                 "--last", "2", "--out", str(out), *MEASURE]) == 0
    trajectory = json.loads(out.read_text())
    assert trajectory["token_passed"] == [5_000, 10_000]
    assert all(0 < ratio < 1 for ratio in trajectory["activation_ratio"])

    write_gguf(_llama(sp, windows, snapshots=(0,), d_ff=64)[0], sp, tmp_path / "step30.gguf")
    capsys.readouterr()
    assert main(["evaluate-series", *series, str(tmp_path / "step30.gguf"), "--tokens-per-step", "1000",
                 "--data", str(root / "valid.txt"), "--last", "2"]) == 2
    assert_one_error_line(capsys.readouterr().err, f"sparsity-scaling: error: {tmp_path / 'step30.gguf'}: its shape")


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
