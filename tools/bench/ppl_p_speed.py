"""Benchmark: PPL-1% with our evaluator against the paper's released algorithm, step for step.

The released algorithm (thunlp/SparsingLaw, `src/calc_activation.py` and `src/model_utils.py`,
followed here step for step, not copied) bisects the CETT value on [0, 1] to 1e-6 (20 steps)
and then measures once more at the bisection's midpoint. Every step runs the dense model
over all tokens and keeps every layer's FFN activations, then finds each layer's threshold
by binary search over 65,536 candidates spaced linearly between the smallest neuron-output
norm and the 99th percentile of a strided sample of them (taking the candidate before the
search's end), each candidate one masked product over all tokens, then runs the sparse
model. Ours runs the dense pass once and searches with secants (see `metrics.search`).

The benchmark prints, for both, wall time, forward-pass equivalents split into dense
passes, sparse passes and threshold searches, activation ratio, CETT and PPL ratio, and the
ratios; then the released thresholds at our CETT (its candidate grid's share of the
difference). `--reference` adds our search with its tolerances tightened.

    python tools/bench/ppl_p_speed.py [--checkpoint DIR | --hf-model DIR_OR_GGUF --tokens FILE.npy] [--eval-tokens N] [--reference]

Without --checkpoint it trains the micro config into a temporary directory first.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Side:
    """One algorithm's answer and cost."""

    activation_ratio: float
    cett: float
    ppl_ratio: float
    dense: float  # forward-pass equivalents in dense passes
    sparse: float  # ... in sparse passes
    thresholds: float  # ... in the threshold searches' products
    seconds: float


def released_thresholds(dense, target, cett: float, candidates: int = 65536) -> dict[int, float]:
    """Each layer's eps as the released code finds it: binary search over a capped linear grid."""
    eps = {}
    for ffn in target.ffns:
        a = dense.calibration[ffn.layer]  # every token's activations
        w = ffn.output_weight()
        norms = a.abs() * w.norm(dim=0)
        flat = norms.flatten()
        top = flat[:: max(flat.numel() // candidates, 1)].quantile(0.99)
        grid = torch.linspace(float(flat.min()), float(top), candidates, device=a.device)
        full = (a @ w.t()).norm(dim=-1)
        left, right = 0, candidates - 1
        while left < right:
            mid = (left + right) // 2
            residual = (a * (norms <= grid[mid])) @ w.t()
            if float((residual.norm(dim=-1) / full).mean()) > cett:
                right = mid
            else:
                left = mid + 1
        eps[ffn.layer] = float(grid[left - 1])
    return eps


def released_ppl_p(target, data, p: float = 1.0, tolerance: float = 1e-6) -> Side:
    """The released PPL-p% search: nested bisections, the dense pass repeated at every step."""
    from sparsity_scaling.metrics.measure import dense_pass, matmul_params, sparse_pass

    started = time.time()
    forward = matmul_params(target) * data.tokens
    goal = 1 + p / 100
    lo, hi, counts = 0.0, 1.0, [0, 0, 0.0]

    def inspect(cett: float):
        dense = dense_pass(target, data, calibration_tokens=10**12, calibration_bytes=1 << 62)
        eps = released_thresholds(dense, target, cett)
        sparse = sparse_pass(target, data, _rule(target, eps, cett))
        counts[0] += 1
        counts[1] += 1
        steps = math.ceil(math.log2(65536))  # the binary search's masked products, plus the dense one
        counts[2] += sum((steps + 1) * a.numel() * target.ffns[0].output_weight().shape[0]
                         for a in dense.calibration.values()) / forward
        return math.exp(sparse.loss - dense.loss), sparse

    while hi - lo > tolerance:
        cett = (lo + hi) / 2
        ratio, _ = inspect(cett)
        if ratio < goal:
            lo = cett
        else:
            hi = cett
    cett = (lo + hi) / 2
    ratio, sparse = inspect(cett)
    return Side(sparse.activation_ratio, cett, ratio, counts[0], counts[1], counts[2], time.time() - started)


def _rule(target, eps: dict[int, float], cett: float):
    from sparsity_scaling.metrics.rules import PerNeuronThreshold

    return PerNeuronThreshold(
        thresholds={f.layer: eps[f.layer] / f.output_weight().norm(dim=0).clamp_min(1e-30) for f in target.ffns},
        cett=cett,
    )


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


def ours(target, data, tight: bool = False) -> Side:
    """Our PPL-1% search from a fresh evaluator (its dense pass included); `tight`: every
    tolerance tightened (the reference an answer is judged against)."""
    from sparsity_scaling.metrics.search import Evaluator, Point, ppl_p, solve_ppl_ratio

    started = time.time()
    evaluator = Evaluator(target, data)
    if tight:
        search = evaluator.cett
        search.eps_for = lambda layer, goal, _eps_for=search.eps_for: _eps_for(layer, goal, tol=1e-6, max_steps=80)

        def measure(c):
            sparse = evaluator.measure(evaluator.cett_rule(c))
            return Point(c, evaluator.ppl_ratio(sparse), sparse.activation_ratio)

        point = solve_ppl_ratio(measure, 1.01, act_tol=1e-4, ratio_tol=1e-7, max_steps=40).point
        ratio, cett, activation = point.ratio, point.x, point.activation
    else:
        result = ppl_p(evaluator, 1.0)
        ratio, cett, activation = result.ppl_ratio, result.cett, result.activation_ratio
    return Side(activation, cett, ratio, 1, evaluator.passes - 1, evaluator.cett.flops / evaluator.forward_flops,
                time.time() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="one of our checkpoints (default: train the micro config)")
    parser.add_argument("--hf-model", help="a local Hugging Face causal LM directory or .gguf file instead")
    parser.add_argument("--tokens", help="validation tokens: .npy int array (sequences, length); needed with --hf-model")
    parser.add_argument("--eval-tokens", type=int, help="validation tokens of the run's split or the text "
                        "(default 16384); a token file is used whole")
    parser.add_argument("--reference", action="store_true", help="also our search with tightened tolerances")
    args = parser.parse_args()
    if args.tokens and args.eval_tokens is not None:
        parser.error("--eval-tokens: a token file (--tokens) gives the validation tokens as they are")

    from sparsity_scaling.evaluation.inputs import ModelRef, load_eval_data
    from sparsity_scaling.evaluation.settings import DataSettings
    from sparsity_scaling.metrics.measure import dense_pass, sparse_pass
    from sparsity_scaling.parallel import init_parallel, shutdown_parallel

    with tempfile.TemporaryDirectory() as work:
        if args.hf_model:
            model = ModelRef(hf_model=args.hf_model)
        else:
            model = ModelRef(checkpoint=str(Path(args.checkpoint) if args.checkpoint else _checkpoint(Path(work))))
        init_parallel(1)
        target = model.load()
        data = load_eval_data(model, DataSettings(tokens=args.tokens, eval_tokens=args.eval_tokens or 16384))
        print(f"model {model.name}, {data.tokens:,} validation tokens, {torch.get_num_threads()} threads", flush=True)
        sides = {"ours": ours(target, data)}
        print(f"ours: {sides['ours'].seconds:.1f} s; now the released algorithm (about 20 steps)", flush=True)
        sides["released"] = released_ppl_p(target, data)
        if args.reference:
            sides["reference"] = ours(target, data, tight=True)
        dense = dense_pass(target, data, calibration_tokens=10**12, calibration_bytes=1 << 62)
        at_ours = sparse_pass(target, data, _rule(target, released_thresholds(dense, target, sides["ours"].cett),
                                                  sides["ours"].cett))
        shutdown_parallel()

    print("forward-pass equivalents split into dense passes, sparse passes and threshold searches "
          "(their matrix products); 'released' follows thunlp/SparsingLaw's code step for step")
    print(f"{'':11}{'activation':>11}{'CETT':>10}{'PPL ratio':>11}{'passes':>9}{'dense':>8}{'sparse':>8}"
          f"{'thresholds':>12}{'seconds':>10}")
    for name, side in sides.items():
        total = side.dense + side.sparse + side.thresholds
        print(f"{name:11}{side.activation_ratio:>11.5f}{side.cett:>10.5f}{side.ppl_ratio:>11.5f}{total:>9.2f}"
              f"{side.dense:>8.2f}{side.sparse:>8.2f}{side.thresholds:>12.2f}{side.seconds:>10.1f}")
    mine, theirs = sides["ours"], sides["released"]
    passes = (theirs.dense + theirs.sparse + theirs.thresholds) / (mine.dense + mine.sparse + mine.thresholds)
    print(f"speed-up {theirs.seconds / mine.seconds:.1f}x wall time, {passes:.1f}x forward-pass equivalents; "
          f"activation ratios differ by {abs(mine.activation_ratio - theirs.activation_ratio):.5f}")
    print(f"the released thresholds at our CETT {mine.cett:.5f}: activation ratio {at_ours.activation_ratio:.5f} "
          f"(ours {mine.activation_ratio:.5f}: the candidate grid's share of the difference)")
    if "reference" in sides:
        reference = sides["reference"]
        print(f"ours against the tight reference: activation ratios "
              f"{abs(mine.activation_ratio - reference.activation_ratio):.5f} apart, "
              f"PPL ratios {abs(mine.ppl_ratio - reference.ppl_ratio):.5f}")


if __name__ == "__main__":
    main()
