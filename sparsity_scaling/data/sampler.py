"""Deterministic batches: the batch at a consumed-sample count is a pure function of it.

Samples are non-overlapping windows of seq_len + 1 tokens of the token stream (inputs and
shifted targets). Each epoch visits every window once in an order drawn from (seed, epoch),
so a resumed run, or a run with another data-parallel size, sees exactly the same samples.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import UserError


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
