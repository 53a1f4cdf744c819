"""What a sparsity setting buys: decode latency per token, dense against sparse FFNs.

The model decodes validation text token by token with a KV cache (Hugging Face's decoding;
one of our checkpoints runs as the Llama it exports to, same logits), once with every FFN a
dense `SparseFFN` (no rule: the same plain-PyTorch layout, so the comparison is of the
computation alone) and once under the rule. Per decoded token it times the whole model and
the FFN blocks alone (the FFN inputs of the decode, replayed through the dense and the
sparse FFNs), dense and sparse interleaved over `repeats` rounds, each step's fastest round
kept, so a machine shared with other work slows both alike and as little as it can. The activation ratio is the one the sparse
FFNs counted while decoding, which is the probe's count of the same rule on the same tokens;
the FLOP fraction is the FFN multiply-adds they did against dense ones, whose inverse bounds
the FFN speedup.

The sweep sets thresholds for a list of activation ratios: per layer, CETT-shaped thresholds
eps / ||W_out[:, i]|| with eps the quantile of |a_i| ||W_out[:, i]|| over the validation
text that keeps that share of the activations.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import SettingError
from ..files import write_json_atomic
from ..formatting import table
from ..hf import HFCausalLM, llama_model
from ..metrics.measure import dense_pass
from ..metrics.rules import PerNeuronThreshold, Rule
from ..parallel import init_parallel
from ..rundir import RunDir, read_checkpoint
from ..sparse_ffn import SparseFFN, check_computable, ffn_weights, installed, sparse_modules
from .models import ModelSpec, describe, one_dataset, sparsity_setting
from .output import say, write_results
from .settings import AnalysisSettings

DENSE_PRODUCTS = {"fastest": None, "rows": True, "linear": False}  # -> SparseFFN's by_rows


@dataclass(frozen=True)
class SpeedupSettings:
    """How the decoding is timed."""

    batch: int = 1
    """Sequences decoded together."""
    prompt: int = 16
    """Tokens of each sequence read before decoding starts (not timed)."""
    steps: int = 32
    """Tokens decoded and timed, per sequence."""
    repeats: int = 5
    """Rounds of dense and sparse timings; each step's fastest counts."""
    device: str = "cpu"
    threads: int | None = None
    """CPU threads for dense and sparse alike (default: torch's)."""
    sweep: tuple[float, ...] = ()
    """Activation ratios to set thresholds for and measure, instead of the sparsity setting."""
    dense: str = "fastest"
    """How a decoded token's dense products run, in the baseline and the sparse FFNs' dense
    parts alike: rows (`embedding_bag` over the weight's transpose), linear (`F.linear`), or
    fastest (whichever is faster on this machine, timed once per shape)."""

    def __post_init__(self):
        for name in ("batch", "prompt", "steps", "repeats", "threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise SettingError(name, value, "must be at least 1")
        if self.device not in ("cpu", "cuda"):
            raise SettingError("device", self.device, "expected cpu or cuda")
        if self.dense not in DENSE_PRODUCTS:
            raise SettingError("dense", self.dense, f"expected one of {', '.join(DENSE_PRODUCTS)}")
        if any(not 0 < r <= 1 for r in self.sweep):
            raise SettingError("sweep", ",".join(f"{r:g}" for r in self.sweep), "ratios must be in (0, 1]")

    def check_device(self) -> None:
        if self.device == "cuda" and not torch.cuda.is_available():
            raise SettingError("device", "cuda", "no CUDA GPU on this machine")


# ---------------------------------------------------------------- the model and its rules


def decode_target(spec: ModelSpec, device: str) -> HFCausalLM:
    """The model with Hugging Face's KV-cache decoding: a local HF model, or one of our
    checkpoints as the Llama it exports to."""
    if spec.model.checkpoint:
        target = HFCausalLM(llama_model(spec.model.checkpoint), spec.model.name)
    else:
        target = HFCausalLM.load(spec.model.hf_model)
    target.model.to(device)
    return target


def ratio_rules(target: HFCausalLM, activations: dict[int, torch.Tensor], ratios) -> list[Rule]:
    """For each ratio, CETT-shaped per-neuron thresholds that keep that share of the given
    activations [tokens, neurons] in every layer."""
    rules = []
    for ratio in ratios:
        thresholds = {}
        for ffn in target.ffns:
            norms = ffn.output_weight_norms().cpu()
            contributions = (activations[ffn.layer].float().abs() * norms).flatten()
            dropped = min(int(round((1 - ratio) * contributions.numel())), contributions.numel() - 1)
            eps = float(contributions.kthvalue(dropped + 1).values) if dropped > 0 else 0.0
            eps = max(eps, torch.finfo(torch.float32).tiny)  # |a| = 0 is never active
            thresholds[ffn.layer] = eps / norms.clamp_min(1e-12)
        rules.append(PerNeuronThreshold(thresholds=thresholds))
    return rules


# ---------------------------------------------------------------- timing


def _clock(device: torch.device) -> Callable[[], float]:
    def now():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()
    return now


@torch.no_grad()
def decode(model, tokens: torch.Tensor, prompt: int, after_prompt: Callable[[], None] = lambda: None) -> list[float]:
    """Seconds of each step decoding tokens[:, prompt:], one position at a time, after
    reading the prompt."""
    now = _clock(tokens.device)
    cache = model(input_ids=tokens[:, :prompt], use_cache=True).cache
    after_prompt()
    seconds = []
    for t in range(prompt, tokens.shape[1]):
        start = now()
        cache = model(input_ids=tokens[:, t : t + 1], cache=cache, use_cache=True).cache
        seconds.append(now() - start)
    return seconds


@torch.no_grad()
def _ffn_seconds(modules: list[SparseFFN], inputs: list[list[torch.Tensor]]) -> list[float]:
    """Seconds of each decoding step's FFN blocks: every layer's FFN on that step's input."""
    now = _clock(inputs[0][0].device)
    seconds = []
    for step in range(len(inputs[0])):
        start = now()
        for module, layer_inputs in zip(modules, inputs):
            module(layer_inputs[step])
        seconds.append(now() - start)
    return seconds


def _ms_per_step(rounds: list[list[float]]) -> float:
    """Milliseconds per step: each step's fastest round (other work on the machine only
    ever slows a step down), averaged over the steps."""
    return 1000 * sum(min(step) for step in zip(*rounds)) / len(rounds[0])


def measure(target: HFCausalLM, rule: Rule, tokens: torch.Tensor, settings: SpeedupSettings) -> dict:
    """One point: activation ratio and FLOP fraction while decoding, and per-token latency of
    the FFN blocks and of the whole model, dense and sparse."""
    model, ffns = target.model, target.ffns
    by_rows = DENSE_PRODUCTS[settings.dense]
    dense, sparse = sparse_modules(ffns, None, by_rows), sparse_modules(ffns, rule, by_rows)

    def start_counting():
        for module in sparse:
            module.reset_counts()
            module.recorded = []

    with installed(model, ffns, sparse):
        decode(model, tokens, settings.prompt, start_counting)
    inputs = [module.recorded for module in sparse]
    for module in sparse:
        module.recorded, module.counting = None, False
    kept, scored = sum(m.kept for m in sparse), sum(m.scored for m in sparse)
    flop_fraction = sum(m.macs for m in sparse) / sum(m.dense_macs for m in sparse)

    ffn, whole = {"dense": [], "sparse": []}, {"dense": [], "sparse": []}
    for _ in range(settings.repeats):
        for kind, modules in (("dense", dense), ("sparse", sparse)):
            ffn[kind].append(_ffn_seconds(modules, inputs))
            with installed(model, ffns, modules):
                whole[kind].append(decode(model, tokens, settings.prompt))
    ms = {f"{what}_ms_{kind}": _ms_per_step(rounds[kind])
          for what, rounds in (("ffn", ffn), ("model", whole)) for kind in ("dense", "sparse")}
    return {"activation_ratio": kept / max(scored, 1), "ffn_flop_fraction": flop_fraction,
            "dense_products": "rows" if dense[0].by_rows else "linear",
            "flop_bound": 1 / flop_fraction, **ms,
            "ffn_speedup": ms["ffn_ms_dense"] / ms["ffn_ms_sparse"],
            "model_speedup": ms["model_ms_dense"] / ms["model_ms_sparse"]}


# ---------------------------------------------------------------- the command's job


def _decode_tokens(timing: SpeedupSettings, data) -> torch.Tensor:
    """The first `batch` validation sequences, cut to the prompt and the decoded tokens."""
    length = timing.prompt + timing.steps
    sequences = data.sequences
    if sequences.shape[1] < length:
        raise SettingError("steps", timing.steps, f"the validation sequences hold {sequences.shape[1]} tokens, "
                           f"fewer than --prompt {timing.prompt} + --steps {timing.steps}")
    if sequences.shape[0] < timing.batch:
        raise SettingError("batch", timing.batch, f"only {sequences.shape[0]} validation sequences")
    return sequences[: timing.batch, :length]


def speedup_points(settings: AnalysisSettings, spec: ModelSpec, timing: SpeedupSettings) -> dict:
    """The record `sparsity-scaling speedup` prints and writes: the sparsity setting's point,
    or one point per ratio of the sweep. The setting is found on the model as it decodes
    (for our checkpoints the exported Llama, whose perplexities are ours)."""
    timing.check_device()
    init_parallel(1)
    if timing.threads:
        torch.set_num_threads(timing.threads)
    target = decode_target(spec, timing.device)
    gated = ffn_weights(target.ffns[0]).gated
    if settings.metric is not None:
        check_computable(Rule(site=settings.metric.site), gated)  # before any search
    data = one_dataset(settings, spec)
    tokens = _decode_tokens(timing, data).to(timing.device)
    if timing.sweep:
        say(f"{spec.label}: thresholds for activation ratios {', '.join(f'{r:g}' for r in timing.sweep)}")
        activations = dense_pass(target, data, calibration_tokens=8192).calibration
        labelled = [(f"ratio {r:g}", {"metric": "ratio", "target_ratio": r}, rule)
                    for r, rule in zip(timing.sweep, ratio_rules(target, activations, timing.sweep))]
    else:
        say(f"{spec.label}: setting the sparsity rule")
        rule, record = sparsity_setting(settings, spec, target)
        check_computable(rule, gated)
        labelled = [(describe(record), record, rule)]
    points = []
    for label, record, rule in labelled:
        say(f"{spec.label}: timing {label} ({timing.repeats} rounds of {timing.steps} tokens, dense and sparse)")
        points.append({"label": label, "setting": record, **measure(target, rule, tokens, timing)})
    return {"model": spec.model.name, "device": timing.device, "threads": torch.get_num_threads(),
            "batch": timing.batch, "prompt": timing.prompt, "steps": timing.steps, "repeats": timing.repeats,
            "points": points}


def speedup_table(record: dict) -> str:
    rows = [[p["label"], f"{p['activation_ratio']:.3f}", f"{p['ffn_flop_fraction']:.3f}",
             f"{p['ffn_ms_dense']:.2f}", f"{p['ffn_ms_sparse']:.2f}", f"{p['ffn_speedup']:.2f}x",
             f"{p['flop_bound']:.2f}x", f"{p['model_ms_dense']:.2f}", f"{p['model_ms_sparse']:.2f}",
             f"{p['model_speedup']:.2f}x", p.get("dense_products", "linear")] for p in record["points"]]
    return table(["setting", "activation", "FFN FLOPs", "FFN ms dense", "sparse", "FFN speedup", "bound",
                  "model ms dense", "sparse", "model speedup", "dense by"], rows)


def speedup_figure(record: dict):
    from matplotlib.figure import Figure

    points = sorted(record["points"], key=lambda p: p["activation_ratio"])
    ratios = [p["activation_ratio"] for p in points]
    figure = Figure(figsize=(6, 4.5), layout="constrained")
    ax = figure.subplots()
    ax.plot(ratios, [p["flop_bound"] for p in points], "k--", marker="x", label="FFN bound (1 / FLOP fraction)")
    ax.plot(ratios, [p["ffn_speedup"] for p in points], marker="o", label="FFN blocks, measured")
    ax.plot(ratios, [p["model_speedup"] for p in points], marker="s", label="whole model, measured")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xlabel("activation ratio (observed while decoding)")
    ax.set_ylabel("decode speedup over dense")
    ax.set_title(f"{record['model']}: batch {record['batch']}, {record['device']}, {record['threads']} threads",
                 fontsize=9)
    ax.legend()
    return figure


def report_speedup(settings: AnalysisSettings, spec: ModelSpec, timing: SpeedupSettings,
                    json_out: str | None = None) -> None:
    """`sparsity-scaling speedup`: print the table; a sweep also writes OUT/speedup.json and
    .png; `json_out` gets the record, and so does the run directory of one of our checkpoints."""
    record = speedup_points(settings, spec, timing)
    print(speedup_table(record))
    # sparse FFNs cannot beat the FLOP bound by that much, so other work slowed dense steps;
    # unless the baseline was told to multiply by F.linear, which can be the slower way
    disturbed = [p["label"] for p in record["points"] if p["ffn_speedup"] > 1.2 * p["flop_bound"]]
    if disturbed and timing.dense != "linear":
        say(f"warning: {', '.join(disturbed)}: FFN speedup above its FLOP bound; the machine was busy, "
            f"rerun with more --repeats")
    if timing.sweep:
        write_results(settings, "speedup", record, speedup_figure(record))
    if json_out:
        write_json_atomic(json_out, record)
    if spec.model.checkpoint:
        ck = read_checkpoint(spec.model.checkpoint)
        write_json_atomic(RunDir(ck.run.path).speedup, {"checkpoint": ck.name, "train_tokens": ck.tokens, **record})
