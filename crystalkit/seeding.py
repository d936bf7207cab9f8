"""Data order as a pure function of (seed, step).

Every step's samples follow from the seed and the step number alone, so resuming from a checkpoint
needs no sampler state and replays exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import torch


def derived_seed(seed: int, index: int) -> int:
    """The seed of one step (epoch, batch, ...) of a run seeded with ``seed``: distinct per index
    and per run seed. Training uses indices >= 0; evaluation negative ones, so they never meet."""
    return seed * 1_000_003 + index


class StepSampler:
    """Epoch-wise random permutations of ``range(size)``, cut into consecutive batches."""

    def __init__(self, size: int, batch_size: int, seed: int):
        if size < 1:
            raise ValueError("cannot sample batches from an empty dataset")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self._cache: dict[int, torch.Tensor] = {}

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._cache:
            generator = torch.Generator().manual_seed(derived_seed(self.seed, epoch))
            self._cache = {epoch: torch.randperm(self.size, generator=generator)}
        return self._cache[epoch]

    def indices(self, step: int) -> list[int]:
        """Dataset indices of the batch for ``step`` (0-based)."""
        out: list[int] = []
        position = step * self.batch_size
        while len(out) < self.batch_size:
            epoch, offset = divmod(position, self.size)
            take = min(self.batch_size - len(out), self.size - offset)
            out.extend(self._permutation(epoch)[offset : offset + take].tolist())
            position += take
        return out
