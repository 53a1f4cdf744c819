"""`sparsity-scaling evaluate` and `evaluate-run`: sparsity metrics of checkpoints and
Hugging Face models, on one process or across tensor-parallel ranks."""

from __future__ import annotations

import json
import time
from argparse import Namespace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .config import load_config
from .errors import UserError
from .metrics.measure import EvalData
from .files import write_json_atomic
from .metrics.result import thresholds_artifact
from .metrics.rules import FixedThreshold, MaxP, ReluZero, TopK, TopP
from .metrics.search import Evaluator, check_p, critical, ppl_p, stabilised_cett
from .parallel import init_parallel
from .train.checkpoint import list_checkpoints, read_checkpoint

METRICS = ("ppl-p", "cett", "topk", "fat", "relu", "top-p", "max-p", "critical")


# ---------------------------------------------------------------- validation data


def _windows(stream: np.ndarray, length: int, max_tokens: int) -> torch.Tensor:
    count = min(len(stream) // length, max(1, max_tokens // (length - 1)))
    if count < 1:
        raise UserError(f"validation data: {len(stream)} tokens, fewer than one sequence of {length}")
    return torch.from_numpy(np.asarray(stream[: count * length], dtype=np.int64).reshape(count, length))


def tokenize_documents(docs, tokenizer_of, seq_len: int, max_tokens: int, what: str) -> torch.Tensor:
    """Documents joined by end-of-document tokens, cut into sequences of seq_len + 1."""
    encode, eos = tokenizer_of()
    ids: list[int] = []
    for doc in docs:
        ids.extend(encode(doc.text))
        ids.append(eos)
        if len(ids) > max_tokens + seq_len + 1:
            break
    if not ids:
        raise UserError(f"{what}: no text")
    return _windows(np.asarray(ids), seq_len + 1, max_tokens)


def _tokenize_file(path: str, tokenizer_of, seq_len: int, max_tokens: int) -> torch.Tensor:
    from .data.corpus import file_documents

    return tokenize_documents(file_documents(path), tokenizer_of, seq_len, max_tokens, f"--data {path}")


def run_tokenizer(checkpoint: Path):
    """The sentencepiece tokenizer of a checkpoint's run."""
    from .data.tokenizer import Tokenizer

    path = checkpoint.parent.parent / "tokenizer.model"
    if not path.is_file():
        raise UserError(f"{checkpoint}: no tokenizer.model in its run directory; use --tokens")
    return Tokenizer(path)


def run_encoder(checkpoint: Path):
    """(encode text -> ids, end-of-document id) of a checkpoint's run tokenizer."""
    tok = run_tokenizer(checkpoint)
    return (lambda text: tok.encode([text])[0]), tok.eos_id


def hf_tokenizer(model_dir: str):
    """A local Hugging Face model's tokenizer (never downloaded)."""
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as error:
        raise UserError(f"--hf-model {model_dir}: no usable tokenizer ({str(error).splitlines()[0]}); use --tokens") from None


def hf_encoder(model_dir: str):
    """(encode text -> ids, end-of-document id) of a Hugging Face model's tokenizer."""
    tok = hf_tokenizer(model_dir)
    eos = tok.eos_token_id if tok.eos_token_id is not None else 0
    return (lambda text: tok(text, add_special_tokens=False)["input_ids"]), eos


def load_eval_data(args: Namespace) -> EvalData:
    """--tokens FILE.npy, --data FILE, or (checkpoints) the run's own validation split."""
    if args.tokens:
        try:
            array = np.load(args.tokens)
        except (OSError, ValueError) as error:
            raise UserError(f"--tokens {args.tokens}: cannot read ({error})") from None
        if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
            raise UserError(f"--tokens {args.tokens}: expected an int array (sequences, length), got {array.dtype} {array.shape}")
        return EvalData(torch.from_numpy(array.astype(np.int64)), args.batch_size)
    if args.checkpoint:
        config = load_config(Path(args.checkpoint) / "config.yaml")
        seq_len = args.seq_len or config.data.seq_len
        if args.data:
            seqs = _tokenize_file(args.data, lambda: run_encoder(Path(args.checkpoint)), seq_len, args.eval_tokens)
        else:
            from .data import prepare_data
            from .data.indexed import open_token_stream

            valid = open_token_stream(prepare_data(config.data).valid_prefix)
            seqs = _windows(valid, seq_len + 1, args.eval_tokens)
        return EvalData(seqs, args.batch_size)
    if not args.data:
        raise UserError("--hf-model needs validation text (--data FILE) or tokens (--tokens FILE.npy)")
    seqs = _tokenize_file(args.data, lambda: hf_encoder(args.hf_model), args.seq_len or 512, args.eval_tokens)
    return EvalData(seqs, args.batch_size)


# ---------------------------------------------------------------- one measurement


def activation_of(args, target) -> str | None:
    if args.checkpoint:
        return load_config(Path(args.checkpoint) / "config.yaml").model.activation
    config = getattr(getattr(target, "model", None), "config", None)
    return getattr(config, "hidden_act", None) or getattr(config, "activation_function", None)


def need_value(args) -> float:
    if args.value is None:
        raise UserError(f"--metric {args.metric} needs --value")
    return args.value


def measure(args: Namespace, evaluator: Evaluator, activation: str | None):
    """The SparsityResult of the requested metric, plus its per-neuron thresholds if any."""
    metric = args.metric
    if metric == "ppl-p":
        result = ppl_p(evaluator, args.p)
        return result, evaluator.cett_rule(result.cett).thresholds
    if metric == "cett":
        rule = evaluator.cett_rule(need_value(args))
        return evaluator.result(metric, rule, evaluator.measure(rule)), rule.thresholds
    rule = fixed_rule(args, activation)
    if rule is None:
        return _critical(args, evaluator), None
    return evaluator.result(metric, rule, evaluator.measure(rule)), None


def fixed_rule(args: Namespace, activation: str | None):
    """The rule of a metric that needs no search (relu, topk, fat, top-p, max-p), else None."""
    metric, site = args.metric, args.site
    if metric == "relu":
        if activation != "relu":
            raise UserError(f"--metric relu: the model's activation is {activation}, not relu")
        return ReluZero()
    if metric == "topk":
        return TopK(site=site, k=int(need_value(args)))
    if metric == "fat":
        return FixedThreshold(site=site, eps=need_value(args))
    if metric == "top-p":
        return TopP(site=site, p=need_value(args), power=args.power)
    if metric == "max-p":
        return MaxP(site=site, p=need_value(args))
    return None


def _critical(args, evaluator: Evaluator):
    width = max(f.local_neurons for f in evaluator.target.ffns)
    site, tol = args.site, args.tolerance / 100
    if args.rule == "top-p":
        return critical(evaluator, lambda x: TopP(site=site, p=x, power=args.power), 0.0, 1.0, False, tol)
    if args.rule == "max-p":
        return critical(evaluator, lambda x: MaxP(site=site, p=x), 0.0, 1.0, True, tol)
    if args.rule == "topk":
        return critical(evaluator, lambda x: TopK(site=site, k=int(x)), 0, width, False, tol, integer=True)
    if args.rule == "cett":
        return critical(evaluator, evaluator.cett_rule, 0.0, 1.0, True, tol)
    peak = max(float(a.abs().max()) for a in evaluator.dense.calibration.values())
    return critical(evaluator, lambda x: FixedThreshold(site=site, eps=x), 0.0, peak, True, tol)


def load_evaluator(args: Namespace) -> Evaluator:
    """The model of --checkpoint / --hf-model on its validation data, dense pass done
    (call init_parallel(args.tp) first)."""
    from .hf import load_target

    target = load_target(checkpoint=args.checkpoint, hf_model=args.hf_model, tp=args.tp)
    return Evaluator(target, load_eval_data(args), args.calibration_tokens)


def _evaluate_on_rank(args: Namespace) -> None:
    init_parallel(args.tp)
    evaluator = load_evaluator(args)
    target, data = evaluator.target, evaluator.data
    result, thresholds = measure(args, evaluator, activation_of(args, target))
    record = {
        "model": str(args.checkpoint or args.hf_model),
        "data_hash": data.digest(),
        **result.to_dict(),
    }
    artifact = None
    if thresholds is not None:
        key = {"model": record["model"], "data_hash": record["data_hash"], "metric": args.metric,
               "p": args.p if args.metric == "ppl-p" else None, "cett": result.cett}
        artifact = thresholds_artifact(thresholds, key)  # collective under TP
    if dist.get_rank() != 0:
        return
    if args.json:
        write_json_atomic(args.json, record)
        if artifact is not None:
            write_json_atomic(thresholds_path(args), artifact)
    print(json.dumps(record, indent=2))


def thresholds_path(args: Namespace) -> Path:
    """Where the reusable per-neuron thresholds go: beside the JSON result."""
    if args.thresholds:
        return Path(args.thresholds)
    json_path = Path(args.json)
    return json_path.with_name(json_path.stem + ".thresholds.json")


def evaluate_command(args: Namespace) -> None:
    from .launch import on_ranks

    if (args.checkpoint is None) == (args.hf_model is None):
        raise UserError("give exactly one of --checkpoint DIR and --hf-model DIR")
    if args.metric == "ppl-p":
        check_p(args.p)
    if args.tokens and args.data:
        raise UserError("give at most one of --data and --tokens")
    if args.checkpoint:
        read_checkpoint(args.checkpoint)  # a clear error before any rank starts
    on_ranks(args.tp, _evaluate_on_rank, args)


# ---------------------------------------------------------------- a whole run


def _evaluate_run_on_rank(args: Namespace) -> None:
    from .hf import load_target

    init_parallel(args.tp)
    checkpoints = list_checkpoints(args.run_dir)
    started = time.time()
    last = [
        Evaluator(load_target(checkpoint=c.path, tp=args.tp), run_data(args, c.path), args.calibration_tokens)
        for c in checkpoints[-args.last:]
    ]
    cett = stabilised_cett(last, args.p)
    points = []
    for index, ck in enumerate(checkpoints):
        reuse = index - (len(checkpoints) - len(last))
        evaluator = last[reuse] if reuse >= 0 else Evaluator(
            load_target(checkpoint=ck.path, tp=args.tp), run_data(args, ck.path), args.calibration_tokens
        )
        rule = evaluator.cett_rule(cett)
        result = evaluator.result("ppl-p-stabilised", rule, evaluator.measure(rule))
        record = result.to_dict()
        record["eval_tokens"] = record.pop("tokens")  # "tokens" is the training-token count here
        points.append({"checkpoint": ck.path.name, "tokens": ck.tokens, "step": ck.step, **record})
        if dist.get_rank() == 0:
            print(f"{ck.path.name}: activation ratio {result.activation_ratio:.4f}, "
                  f"PPL ratio {result.ppl_ratio:.4f}", flush=True)
    if dist.get_rank() == 0:
        out = Path(args.json) if args.json else Path(args.run_dir) / "sparsity.json"
        write_json_atomic(out, {
            "metric": "ppl-p-stabilised", "p": args.p, "cett": cett, "last": len(last),
            "seconds": round(time.time() - started, 3), "checkpoints": points,
        })
        print(f"stabilised CETT {cett:.5f} over the last {len(last)} checkpoints -> {out}")


def run_data(args: Namespace, checkpoint: Path) -> EvalData:
    return load_eval_data(Namespace(**{**vars(args), "checkpoint": str(checkpoint), "hf_model": None}))


def settings(p: float = 1.0, eval_tokens: int = 65536, calibration_tokens: int = 8192, last: int = 5,
             **_scheduling) -> Namespace:
    """The arguments of evaluate / evaluate-run for programmatic use (the launcher's jobs)."""
    return Namespace(p=p, eval_tokens=eval_tokens, calibration_tokens=calibration_tokens, last=last, tp=1,
                     json=None, seq_len=None, batch_size=8, data=None, tokens=None, hf_model=None,
                     checkpoint=None, metric="ppl-p")


def evaluate_checkpoint(checkpoint: str | Path, args: Namespace) -> dict:
    """PPL-p% of one of our checkpoints on its run's validation split (this process, TP 1)."""
    from .hf import load_target

    init_parallel(1)
    ck = read_checkpoint(checkpoint)
    target = load_target(checkpoint=ck.path)
    result = ppl_p(Evaluator(target, run_data(args, ck.path), args.calibration_tokens), args.p)
    record = result.to_dict()
    record["eval_tokens"] = record.pop("tokens")
    return {"checkpoint": ck.path.name, "train_tokens": ck.tokens, "step": ck.step, **record}


def evaluate_run(run_dir: str | Path, args: Namespace) -> None:
    """The stabilising strategy over a run's checkpoints, in this process (TP 1)."""
    _evaluate_run_on_rank(Namespace(**{**vars(args), "run_dir": str(run_dir)}))


def evaluate_run_command(args: Namespace) -> None:
    from .launch import on_ranks

    check_p(args.p)
    if not list_checkpoints(args.run_dir):
        raise UserError(f"{args.run_dir}: no complete checkpoints")
    if args.last < 1:
        raise UserError("--last must be at least 1")
    on_ranks(args.tp, _evaluate_run_on_rank, args)


def add_arguments(commands) -> None:
    """The `evaluate` and `evaluate-run` subcommands."""
    ev = commands.add_parser("evaluate", help="measure activation sparsity of one model")
    ev.add_argument("--checkpoint", help="a checkpoint directory of ours")
    ev.add_argument("--hf-model", help="a local Hugging Face causal LM directory")
    ev.add_argument("--metric", choices=METRICS, default="ppl-p")
    ev.add_argument("--p", type=float, default=1.0, help="PPL-p%%: allowed perplexity increase, percent")
    ev.add_argument("--value", type=float, help="the rule's parameter: CETT, k, eps or p")
    ev.add_argument("--site", choices=("intermediate", "gate", "up", "input"), default="intermediate")
    ev.add_argument("--power", type=float, default=1.0, help="top-p: sum |a|**power")
    ev.add_argument("--rule", choices=("top-p", "max-p", "topk", "fat", "cett"), default="top-p",
                    help="critical: the rule whose critical sparsity is searched")
    ev.add_argument("--tolerance", type=float, default=1.0, help="critical: PPL increase allowed, percent")
    ev.add_argument("--thresholds", help="where to write per-neuron thresholds (default: beside --json)")
    _common(ev)
    ev.add_argument("--data", help="validation text: .txt or .jsonl (text field)")
    ev.add_argument("--tokens", help="validation tokens: .npy int array (sequences, length)")
    ev.set_defaults(run=evaluate_command)

    run = commands.add_parser("evaluate-run", help="stabilised PPL-p%% over all checkpoints of a run")
    run.add_argument("run_dir")
    run.add_argument("--p", type=float, default=1.0)
    run.add_argument("--last", type=int, default=5, help="checkpoints whose mean PPL ratio sets the CETT")
    _common(run)
    run.set_defaults(run=evaluate_run_command, data=None, tokens=None)


def _common(parser) -> None:
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks to start")
    parser.add_argument("--json", help="write the result here (atomically)")
    parser.add_argument("--eval-tokens", type=int, default=65536, help="validation tokens to use")
    parser.add_argument("--seq-len", type=int, help="validation sequence length (default: the run's)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--calibration-tokens", type=int, default=8192,
                        help="dense activations kept per rank for threshold calibration")
