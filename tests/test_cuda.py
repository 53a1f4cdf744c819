"""On a GPU: the bf16 training step, the evaluator on CUDA against fp32 on the CPU, and an
exported model's logits on CUDA. Skipped where no GPU is present (CI); run by
`tools/bench/gpu_check.sh` on a GPU machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import MICRO, REPO, run_cli
from sparsity_scaling.rundir import RunDir

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
    """The micro config trained on the GPU in bf16 (DeepSpeed's bf16 with fp32 master weights)."""
    out = tmp_path_factory.mktemp("cuda") / "run"
    result = run_cli("train", str(MICRO), "--out", str(out), "--set", "train.dtype=bf16")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "bf16" in result.stdout
    return RunDir(out)


def test_bf16_training_on_the_gpu_learns(bf16_run):
    losses = torch.tensor([p["loss"] for p in bf16_run.metric_points() if p["kind"] == "train"])
    assert torch.isfinite(losses).all()
    assert losses[-1] < losses[0] - 0.5  # it learns, as the fp32 CPU run does


def _evaluate(checkpoint, out, tokens, gpu: bool) -> dict:
    env = {**os.environ, **({} if gpu else {"CUDA_VISIBLE_DEVICES": ""})}
    result = subprocess.run([sys.executable, "-m", "sparsity_scaling.cli", "evaluate", "--checkpoint", str(checkpoint),
                             "--eval-tokens", str(tokens), "--json", str(out)],
                            cwd=REPO, capture_output=True, text=True, env=env, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


def test_evaluator_on_cuda_agrees_with_fp32_on_the_cpu(bf16_run, tmp_path):
    """PPL-1% of one checkpoint on the GPU (bf16 model, fp32/fp64 sums) and on the CPU in fp32."""
    checkpoint = bf16_run.checkpoints()[-1].path
    gpu = _evaluate(checkpoint, tmp_path / "gpu.json", 16384, gpu=True)
    cpu = _evaluate(checkpoint, tmp_path / "cpu.json", 16384, gpu=False)
    print(f"activation ratio: GPU {gpu['activation_ratio']:.5f}, CPU {cpu['activation_ratio']:.5f}")
    assert gpu["activation_ratio"] == pytest.approx(cpu["activation_ratio"], abs=0.002)
    assert gpu["dense_ppl"] == pytest.approx(cpu["dense_ppl"], rel=1e-2)


def test_exported_model_gives_the_cpu_losses_on_cuda(bf16_run, tmp_path):
    from sparsity_scaling.hf import HFCausalLM, export_llama, load_target

    out = export_llama(bf16_run.checkpoints()[-1].path, tmp_path / "llama")
    gpu, cpu = load_target(hf_model=out), HFCausalLM.load(out, device="cpu")
    assert gpu.device.type == "cuda"
    tokens = torch.randint(0, cpu.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        on_gpu = gpu.token_losses(tokens[:, :-1], tokens[:, 1:]).cpu()
        on_cpu = cpu.token_losses(tokens[:, :-1], tokens[:, 1:])
    assert torch.allclose(on_gpu, on_cpu, atol=1e-3)
