"""Any model the evaluator measures, as an lm-evaluation-harness language model.

`ProbedLM` answers lm-eval's three request types (loglikelihood, rolling loglikelihood,
greedy generation) with the `SparsityTarget`'s own forward pass, so the same model runs
dense or with a sparsity rule set on every FFN through the probe. Sequences go through the
model one at a time, never padded: what the probe counts is exactly the task's text, and
the activation ratio it reports is the one achieved on that text.

Tokenization follows lm-eval's own Hugging Face model (`HFLM`) for Hugging Face tokenizers
(special tokens as the tokenizer adds them; BOS, else EOS, before an empty context) and our
training for our checkpoints (no special tokens; end-of-document before an empty context),
so a task scored here dense gives the numbers `lm_eval --model hf` gives.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from ..formatting import duration
from ..metrics.rules import Rule, SparsifyingProbe

DEFAULT_MAX_GEN_TOKENS = 256


@dataclass(frozen=True)
class TextCodec:
    """How a model turns text into token ids and back."""

    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]
    eos: int  # end of text: where generation stops
    prefix: int  # the token an empty context is replaced by
    vocab_size: int  # ids the tokenizer can decode (a model's vocabulary may be padded beyond)


class ProbedLM(TemplateLM):
    """A `SparsityTarget` answering lm-eval requests, dense or with `rule` in every FFN.

    `counts[task]` holds the (token, neuron) entries the rule kept and saw in the forward
    passes of that task's requests (lm-eval names each request's task).
    """

    def __init__(self, target, codec: TextCodec, max_length: int, rule: Rule | None = None,
                 progress: Callable[[str], None] | None = None):
        super().__init__()
        self.target, self.codec, self._max_length, self.rule = target, codec, max_length, rule
        self.progress = progress
        self.counts: dict[str, list[int]] = {}
        self._task = ""  # the task of the request being answered

    def activation_ratio(self, task: str) -> float | None:
        active, total = self.counts.get(task, (0, 0))
        return active / total if total else None

    # ------------------------------------------------------------------ what lm-eval asks of a model

    @property
    def eot_token_id(self) -> int:
        return self.codec.eos

    @property
    def prefix_token_id(self) -> int:
        return self.codec.prefix

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.codec.encode(string)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """One request at a time, so that its forward pass counts toward its own task."""
        out = []
        clock = _Clock(len(requests), "loglikelihood", self.progress)
        for request in requests:
            self._task = request.task_name
            out += super().loglikelihood([request], disable_tqdm=True)
            clock.tick()
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding gives the continuation)."""
        out = []
        for _, context, continuation in requests:
            tokens = (context + continuation)[-(self.max_length + 1):][:-1]
            continuation = continuation[-len(tokens):]  # one longer than the model reads: its end
            logprobs = F.log_softmax(self._logits(tokens)[-len(continuation):], dim=-1)
            wanted = torch.tensor(continuation, device=logprobs.device)
            score = logprobs.gather(1, wanted[:, None]).sum().item()
            greedy = bool((logprobs[:, : self.codec.vocab_size].argmax(-1) == wanted).all())
            out.append((score, greedy))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-document log likelihood, in disjoint windows of the model's length."""
        out = []
        clock = _Clock(len(requests), "loglikelihood_rolling", self.progress)
        for request in requests:
            self._task, (text,) = request.task_name, request.args
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                self.tok_encode(text), self.prefix_token_id, self.max_length, context_len=1)]
            scores = self._loglikelihood_tokens([(None, *w) for w in windows])
            out.append(sum(score for score, _ in scores))
            clock.tick()
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy decoding until a stop string, end of text, or max_gen_toks tokens."""
        out = []
        clock = _Clock(len(requests), "generate", self.progress)
        for request in requests:
            self._task, (context, gen_kwargs) = request.task_name, request.args
            kwargs = dict(gen_kwargs)
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            budget = int(kwargs.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKENS))
            tokens = self.tok_encode(context)[-max(1, self.max_length - budget):]
            new: list[int] = []
            text = ""
            while len(new) < budget:
                next_id = int(self._logits(tokens + new)[-1, : self.codec.vocab_size].argmax())
                if next_id == self.codec.eos:
                    break
                new.append(next_id)
                text = self.codec.decode(new)
                if any(stop in text for stop in until):
                    break
            for stop in until:
                text = text.split(stop)[0]
            out.append(text)
            clock.tick()
        return out

    # ------------------------------------------------------------------ one forward pass

    @torch.no_grad()
    def _logits(self, tokens: list[int]) -> torch.Tensor:
        """[len(tokens), vocab] logits of one unpadded sequence, the rule applied if set."""
        batch = torch.tensor([tokens], dtype=torch.long, device=next(self.target.parameters()).device)
        if self.rule is None:
            return self.target.logits(batch)[0]
        probe = SparsifyingProbe(self.rule)
        with self.target.probing(probe):
            logits = self.target.logits(batch)[0]
        count = self.counts.setdefault(self._task, [0, 0])
        count[0] += sum(probe.active.values())
        count[1] += sum(probe.total.values())
        return logits


class _Clock:
    """A progress line every 10 seconds: requests done, requests per second, ETA."""

    def __init__(self, total: int, what: str, say: Callable[[str], None] | None, every: float = 10.0):
        self.total, self.what, self.say, self.every = total, what, say, every
        self.done, self.started = 0, time.monotonic()
        self.last = self.started

    def tick(self) -> None:
        self.done += 1
        now = time.monotonic()
        if self.say is None or (now - self.last < self.every and self.done < self.total):
            return
        self.last = now
        rate = self.done / max(now - self.started, 1e-9)
        eta = (self.total - self.done) / rate if rate else 0.0
        self.say(f"  {self.what}: {self.done}/{self.total} requests, {rate:.1f}/s, ETA {duration(eta)}")
