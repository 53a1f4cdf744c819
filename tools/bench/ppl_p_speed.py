"""Benchmark: PPL-1% with our evaluator against the paper's released algorithm.

The released algorithm (re-implemented here from its description) bisects the CETT value
about 20 times to a tolerance of 1e-6; every step re-runs the dense pass, searches each
layer's threshold with 16 bisection steps over 65,536 candidates on all tokens, and runs a
sparse pass. Ours runs the dense pass once, calibrates thresholds on a subsample and
interpolates the CETT value. The benchmark prints both costs and their ratio.

    python tools/bench/ppl_p_speed.py [--checkpoint DIR] [--eval-tokens N]

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
    """The released algorithm: nested bisections, the dense pass repeated at every step."""
    from sparsity_scaling.metrics.measure import dense_pass, sparse_pass
    from sparsity_scaling.metrics.rules import PerNeuronThreshold

    goal = 1 + p / 100
    lo, hi, passes, best = 0.0, 1.0, 0, None
    while hi - lo > tolerance:
        cett = (lo + hi) / 2
        dense = dense_pass(target, data, calibration_tokens=10**12)  # every token, every step
        passes += 1
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
                passes += a.numel() * w.shape[0] / (data.tokens * _params(target))
                if value < cett:
                    left = mid + 1
                else:
                    right = mid
            thresholds[ffn.layer] = float(grid[left]) / norms.clamp_min(1e-30)
        sparse = sparse_pass(target, data, PerNeuronThreshold(thresholds=thresholds, cett=cett))
        passes += 1
        if sparse.ppl / dense.ppl > goal:
            hi = cett
        else:
            lo, best = cett, sparse
    return best.activation_ratio, passes


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
    parser.add_argument("--checkpoint")
    parser.add_argument("--eval-tokens", type=int, default=16384)
    args = parser.parse_args()

    from sparsity_scaling.evaluation.inputs import ModelRef, load_eval_data
    from sparsity_scaling.evaluation.settings import DataSettings
    from sparsity_scaling.metrics.search import Evaluator, ppl_p
    from sparsity_scaling.parallel import init_parallel, shutdown_parallel

    with tempfile.TemporaryDirectory() as work:
        checkpoint = Path(args.checkpoint) if args.checkpoint else _checkpoint(Path(work))
        init_parallel(1)
        model = ModelRef(checkpoint=str(checkpoint))
        target = model.load()
        data = load_eval_data(model, DataSettings(eval_tokens=args.eval_tokens))

        started = time.time()
        ours = ppl_p(Evaluator(target, data), 1.0)
        ours_seconds = time.time() - started
        started = time.time()
        released_ratio, released_passes = released_ppl_p(target, data)
        released_seconds = time.time() - started
        shutdown_parallel()

    print(f"model {checkpoint}, {data.tokens:,} validation tokens")
    print(f"{'':12}{'activation ratio':>18}{'forward passes':>16}{'seconds':>10}")
    print(f"{'ours':12}{ours.activation_ratio:>18.4f}{ours.forward_passes:>16.2f}{ours_seconds:>10.2f}")
    print(f"{'released':12}{released_ratio:>18.4f}{released_passes:>16.2f}{released_seconds:>10.2f}")
    print(f"speed-up {released_seconds / ours_seconds:.1f}x wall time, "
          f"{released_passes / ours.forward_passes:.1f}x forward-pass equivalents; "
          f"activation ratios differ by {abs(ours.activation_ratio - released_ratio):.4f}")


if __name__ == "__main__":
    main()
