"""Benchmark: decode speedup of sparse FFNs against dense ones, per activation ratio.

A model of a config's shape (default the 0.1B scale: d_h 768, d_f 1920, 16 layers, ReLU),
random weights, run as a Llama with Hugging Face's KV-cache decoding at batch 1. For each
ratio, per-layer thresholds that keep that share on random tokens, at the intermediate site
(PPL-p%'s, the sweep of `sparsity-scaling speedup`: gate dense, up for positive gates, down
for kept neurons), the gate site (CATS': up and down for kept neurons) or the input site
(TEAL's: gate and up over the kept input features, down dense). Each point prints the
FFN-block and whole-model speedups measured in the same process, dense and sparse timed in
alternation with the same thread count, beside the FLOP-ratio bound (1 / the FFN
multiply-adds done as a share of dense), how one token's dense products ran (`--dense`:
by rows, by F.linear, or the faster here) and the FFN blocks' share of a dense step.

    python tools/bench/sparse_ffn_speedup.py [--config configs/models/0.1b.yaml] [--threads 1]
        [--ratios 0.5,0.3,0.2,0.1,0.05] [--sites intermediate,gate,input] [--steps 32] [--repeats 5]
        [--dense fastest|rows|linear]
    python tools/bench/sparse_ffn_speedup.py --checkpoint RUN_OR_CHECKPOINT   # a trained model: its own
        PPL-1% thresholds, then the sweep (thresholds cannot keep more than the non-zero activations)
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def random_model(config_path: str, seed: int = 0):
    """A Llama of the config's shape with random weights (the config's init std)."""
    from transformers import LlamaForCausalLM

    from sparsity_scaling.config import load_config
    from sparsity_scaling.hf import HFCausalLM
    from sparsity_scaling.hf.export import llama_config

    config = load_config(config_path)
    torch.manual_seed(seed)
    hf_config = llama_config(config, config.data.vocab_size)
    hf_config.initializer_range = config.model.init_std / (config.model.d_model / config.model.dim_model_base) ** 0.5
    return HFCausalLM(LlamaForCausalLM(hf_config).eval(), Path(config_path).stem), config.data.vocab_size


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "models" / "0.1b.yaml"))
    parser.add_argument("--checkpoint", help="a trained run or checkpoint: its PPL-1%% point and a sweep")
    parser.add_argument("--ratios", default="0.5,0.3,0.2,0.1,0.05")
    parser.add_argument("--sites", default="intermediate,gate")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dense", default="fastest", choices=("fastest", "rows", "linear"),
                        help="how one token's dense products run (baseline and sparse alike)")
    args = parser.parse_args(argv)

    from sparsity_scaling.analysis.models import parse_model
    from sparsity_scaling.analysis.settings import AnalysisSettings
    from sparsity_scaling.analysis.speedup import SpeedupSettings, measure, ratio_rules, speedup_points, speedup_table
    from sparsity_scaling.evaluation.settings import MetricSettings
    from sparsity_scaling.metrics.measure import EvalData, dense_pass
    from sparsity_scaling.metrics.rules import PerNeuronThreshold
    from sparsity_scaling.parallel import init_parallel

    torch.set_num_threads(args.threads)
    ratios = tuple(float(r) for r in args.ratios.split(","))
    timing = SpeedupSettings(steps=args.steps, repeats=args.repeats, threads=args.threads, dense=args.dense)
    if args.checkpoint:
        spec = parse_model(args.checkpoint)
        settings = AnalysisSettings(out="analysis", metric=MetricSettings())  # nothing is written
        for sweep in ((), ratios):
            record = speedup_points(settings, spec, replace(timing, sweep=sweep))
            print(speedup_table(record), flush=True)
        return 0

    init_parallel(1)
    target, vocab = random_model(args.config)
    tokens = torch.randint(0, vocab, (8, timing.prompt + timing.steps), generator=torch.Generator().manual_seed(1))
    dense = dense_pass(target, EvalData(tokens, 8), calibration_tokens=8192)
    print(f"{args.config}: {len(target.ffns)} layers, d_h {target.model.config.hidden_size}, "
          f"d_f {target.model.config.intermediate_size}, batch 1, {torch.get_num_threads()} threads, "
          f"{args.steps} tokens x {args.repeats} rounds per point", flush=True)
    for site in args.sites.split(","):
        if site == "intermediate":
            rules = ratio_rules(target, dense.calibration, ratios)
        else:  # per-layer thresholds on |act(W_gate x)| or on |x| at the same quantiles
            scores = {}
            with torch.no_grad(), target.probing(_ScoreRecorder(site, scores)):
                target.model(input_ids=tokens[:2])
            rules = [PerNeuronThreshold(site=site, thresholds={
                layer: s.quantile(1 - ratio).clamp_min(1e-30) for layer, s in scores.items()}) for ratio in ratios]
        record = {"model": args.config, "device": "cpu", "threads": torch.get_num_threads(), "batch": 1,
                  "points": [{"label": f"{site} {ratio:g}", **measure(target, rule, tokens[:1], timing)}
                             for ratio, rule in zip(ratios, rules)]}
        print(speedup_table(record), flush=True)
        share = sum(p["ffn_ms_dense"] for p in record["points"]) / sum(p["model_ms_dense"] for p in record["points"])
        print(f"FFN blocks: {share:.0%} of a dense decoding step", flush=True)
    return 0


class _ScoreRecorder:
    """What a rule at the gate site (|act(W_gate x)|) or the input site (|x|) scores in each
    layer, in the last forward pass."""

    def __init__(self, site: str, into: dict):
        self.site, self.into = site, into

    def on_input(self, ffn, x):
        if self.site == "input":
            self.into[ffn.layer] = x.abs().flatten().float()
        return None

    def on_activation(self, ffn, trace):
        if self.site == "gate":
            self.into[trace.layer] = trace.gate.abs().flatten().float()
        return None


if __name__ == "__main__":
    sys.exit(main())
