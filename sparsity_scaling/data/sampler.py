"""Deterministic batches: the batch at a consumed-sample count is a pure function of it.

Samples are non-overlapping windows of seq_len + 1 tokens of the token stream (inputs and
shifted targets). Each epoch visits every window once in an order drawn from (seed, epoch),
so a resumed run, or a run with another data-parallel size, sees exactly the same samples.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import UserError


def consecutive_windows(stream: np.ndarray, length: int, max_tokens: int, what: str = "validation data") -> torch.Tensor:
    """The stream's first non-overlapping windows of `length` tokens, about `max_tokens` of them
    (at least one): the sequences a measurement runs on."""
    count = min(len(stream) // length, max(1, max_tokens // (length - 1)))
    if count < 1:
        raise UserError(f"{what}: {len(stream)} tokens, fewer than one sequence of {length}")
    return torch.from_numpy(np.asarray(stream[: count * length], dtype=np.int64).reshape(count, length))


class WindowSampler:
    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int, shuffle: bool = True):
        self.tokens = tokens
        self.seq_len = seq_len
        self.seed = seed
        self.shuffle = shuffle
        self.num_windows = (len(tokens) - 1) // seq_len
        if self.num_windows < 1:
            raise UserError(
                f"data: only {len(tokens)} tokens, fewer than one sequence of {seq_len + 1}"
            )
        self._epoch, self._order = -1, None

    def _window(self, sample: int) -> int:
        epoch, offset = divmod(sample, self.num_windows)
        if not self.shuffle:
            return offset
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._epoch, self._order = epoch, rng.permutation(self.num_windows)
        return int(self._order[offset])

    def samples(self, first: int, count: int) -> torch.Tensor:
        """Samples first .. first+count-1 as a (count, seq_len + 1) int64 tensor."""
        rows = []
        for sample in range(first, first + count):
            start = self._window(sample) * self.seq_len
            rows.append(np.asarray(self.tokens[start : start + self.seq_len + 1], dtype=np.int64))
        return torch.from_numpy(np.stack(rows))


class BlendedSampler:
    """Samples of several corpora mixed by weight, with megatron-core's blended-dataset
    semantics: sample i comes from the corpus furthest below its share so far
    (`helpers.build_blending_indices`), and is that corpus' next sample of its own sampler.

    The mix is fixed for `size` samples (a run's whole budget), so the batch at a consumed
    count is still a pure function of it, and resuming sees the same samples."""

    def __init__(self, samplers: list[WindowSampler], weights: list[float], size: int):
        from megatron.core.datasets import helpers

        self.samplers = samplers
        total = float(sum(weights))
        self.corpus = np.zeros(size, dtype=np.int16)
        self.index = np.zeros(size, dtype=np.int64)
        helpers.build_blending_indices(self.corpus, self.index, np.array([w / total for w in weights], dtype=np.float64),
                                       len(samplers), size, False)

    @property
    def num_windows(self) -> int:
        return len(self.corpus)

    def samples(self, first: int, count: int) -> torch.Tensor:
        if first + count > len(self.corpus):
            raise IndexError(f"samples {first}..{first + count - 1} beyond the blend's {len(self.corpus)}")
        return torch.cat([self.samplers[self.corpus[i]].samples(int(self.index[i]), 1)
                          for i in range(first, first + count)])
