"""Benchmark: PPL-1% with our evaluator against the paper's released algorithm (re-implemented).

The released algorithm (re-implemented here from its description) bisects the CETT value
about 20 times to a tolerance of 1e-6; every step re-runs the dense pass, searches each
layer's threshold with 16 bisection steps over 65,536 candidates on all tokens, and runs a
sparse pass. Ours runs the dense pass once, calibrates thresholds on a subsample and
interpolates the CETT value. The benchmark prints both costs and their ratio.

    python tools/bench/ppl_p_speed.py [--checkpoint DIR | --hf-model DIR_OR_GGUF --tokens FILE.npy] [--eval-tokens N]

Without --checkpoint it trains the micro config into a temporary directory first.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def released_ppl_p(target, data, p: float = 1.0, tolerance: float = 1e-6, candidates: int = 65536):
    """The released algorithm as its description gives it (not the released code): nested bisections,
    the dense pass repeated at every step."""
    from sparsity_scaling.metrics.measure import dense_pass, sparse_pass
    from sparsity_scaling.metrics.rules import PerNeuronThreshold

    goal = 1 + p / 100
    lo, hi, best = 0.0, 1.0, None
    dense_passes, sparse_passes, searches = 0, 0, 0.0
    while hi - lo > tolerance:
        cett = (lo + hi) / 2
        dense = dense_pass(target, data, calibration_tokens=10**12)  # every token, every step
        dense_passes += 1
        thresholds = {}
        for ffn in target.ffns:
            a = dense.calibration[ffn.layer]
            w = ffn.output_weight()
            norms = w.norm(dim=0)
            m = a.abs() * norms
            y = (a @ w.t()).norm(dim=-1)
            grid = torch.linspace(0, float(m.max()), candidates)
            left, right = 0, candidates - 1
            while left < right:  # 16 steps over 2**16 candidates
                mid = (left + right) // 2
                residual = ((a * (m < grid[mid])) @ w.t()).norm(dim=-1)
                value = (residual[y > 0] / y[y > 0]).mean().item()
                searches += a.numel() * w.shape[0] / (data.tokens * _params(target))
                if value < cett:
                    left = mid + 1
                else:
                    right = mid
            thresholds[ffn.layer] = float(grid[left]) / norms.clamp_min(1e-30)
        sparse = sparse_pass(target, data, PerNeuronThreshold(thresholds=thresholds, cett=cett))
        sparse_passes += 1
        if sparse.ppl / dense.ppl > goal:
            hi = cett
        else:
            lo, best = cett, sparse
    return best.activation_ratio, (dense_passes, sparse_passes, searches)


def _params(target) -> int:
    from sparsity_scaling.metrics.measure import matmul_params

    return matmul_params(target)


def _checkpoint(work: Path) -> Path:
    from sparsity_scaling.rundir import RunDir

    out = work / "micro"
    subprocess.run(
        [sys.executable, "-m", "sparsity_scaling.cli", "train", str(REPO / "configs/models/micro.yaml"),
         "--out", str(out)], check=True, cwd=REPO, stdout=subprocess.DEVNULL,
    )
    return RunDir(out).checkpoints()[-1].path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="one of our checkpoints (default: train the micro config)")
    parser.add_argument("--hf-model", help="a local Hugging Face causal LM directory or .gguf file instead")
    parser.add_argument("--tokens", help="validation tokens: .npy int array (sequences, length); needed with --hf-model")
    parser.add_argument("--eval-tokens", type=int, help="validation tokens of the run's split or the text "
                        "(default 16384); a token file is used whole")
    args = parser.parse_args()
    if args.tokens and args.eval_tokens is not None:
        parser.error("--eval-tokens: a token file (--tokens) gives the validation tokens as they are")

    from sparsity_scaling.evaluation.inputs import ModelRef, load_eval_data
    from sparsity_scaling.evaluation.settings import DataSettings
    from sparsity_scaling.metrics.search import Evaluator, ppl_p
    from sparsity_scaling.parallel import init_parallel, shutdown_parallel

    with tempfile.TemporaryDirectory() as work:
        if args.hf_model:
            model = ModelRef(hf_model=args.hf_model)
        else:
            model = ModelRef(checkpoint=str(Path(args.checkpoint) if args.checkpoint else _checkpoint(Path(work))))
        init_parallel(1)
        target = model.load()
        data = load_eval_data(model, DataSettings(tokens=args.tokens, eval_tokens=args.eval_tokens or 16384))

        started = time.time()
        evaluator = Evaluator(target, data)
        ours = ppl_p(evaluator, 1.0)
        ours_seconds = time.time() - started
        ours_split = (1, evaluator.passes - 1, evaluator.cett.flops / evaluator.forward_flops)
        started = time.time()
        released_ratio, released_split = released_ppl_p(target, data)
        released_seconds = time.time() - started
        shutdown_parallel()

    print(f"model {model.name}, {data.tokens:,} validation tokens; forward-pass equivalents split into "
          "dense passes, sparse passes and threshold searches; 'released' is the paper's algorithm as "
          "re-implemented here from its description")
    print(f"{'':10}{'activation ratio':>18}{'forward passes':>16}{'dense':>8}{'sparse':>8}{'thresholds':>12}{'seconds':>10}")
    for name, ratio, split, seconds in (("ours", ours.activation_ratio, ours_split, ours_seconds),
                                        ("released", released_ratio, released_split, released_seconds)):
        print(f"{name:10}{ratio:>18.4f}{sum(split):>16.2f}{split[0]:>8}{split[1]:>8}{split[2]:>12.2f}{seconds:>10.2f}")
    print(f"speed-up {released_seconds / ours_seconds:.1f}x wall time, "
          f"{sum(released_split) / sum(ours_split):.1f}x forward-pass equivalents; "
          f"activation ratios differ by {abs(ours.activation_ratio - released_ratio):.4f}")


if __name__ == "__main__":
    main()
