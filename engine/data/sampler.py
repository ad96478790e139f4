"""The one sampler: which rows (text windows or packed SFT rows) a micro-batch takes, and the eval order.

Sample g of a run (a global counter over steps, micro-batches and ranks) is row perm(seed, g // n)[g % n] of
n rows: a fresh permutation per epoch, drawn from (seed, epoch) alone. Nothing else is stored, so a batch is a
pure function of (seed, step, micro, rank) and a resumed run replays exactly.
"""
from __future__ import annotations

import numpy as np

IGNORE_INDEX = -100  # the target id that carries no loss (prompt tokens, padding); the loop imports it from here


def _check(n: int, step: int, micro: int, batch_size: int, accum: int, rank: int, world_size: int) -> None:
    if not (0 <= micro < accum and 0 <= rank < world_size and batch_size > 0 and step >= 0 and n > 0):
        raise ValueError(f"batch: need step >= 0, 0 <= micro < accum, 0 <= rank < world_size, batch_size > 0 and "
                         f"rows > 0; got step={step}, micro={micro}, accum={accum}, rank={rank}, "
                         f"world_size={world_size}, batch_size={batch_size}, rows={n}")


class EpochPermutations:
    """perm(seed, epoch) of range(n), cached for the last two epochs (a batch spans at most two)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self._cache = n, seed, {}

    def __call__(self, epoch: int) -> np.ndarray:
        if epoch not in self._cache:
            if len(self._cache) >= 2:
                self._cache.pop(next(iter(self._cache)))
            self._cache[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._cache[epoch]


def sample_indices(perms: EpochPermutations, step: int, micro: int = 0, *, batch_size: int, accum: int = 1,
                   rank: int = 0, world_size: int = 1) -> list[int]:
    """Row indices (batch_size of them) of micro-batch `micro` of `step` on `rank`.

    A step consumes batch_size * accum * world_size samples; each (micro, rank) takes its own slice of them.
    """
    _check(perms.n, step, micro, batch_size, accum, rank, world_size)
    start = (step * accum * world_size + micro * world_size + rank) * batch_size
    epochs, pos = np.divmod(np.arange(start, start + batch_size), perms.n)
    return [int(perms(int(e))[p]) for e, p in zip(epochs, pos)]


def eval_ranges(n: int, batch_size: int, max_batches: int | None = None, rank: int = 0, world_size: int = 1):
    """range()s of row indices over all n rows in order, batch_size at a time (the last possibly short);
    `rank` takes every world_size-th batch of the first max_batches."""
    for i, start in enumerate(range(0, n, batch_size)[:max_batches]):
        if i % world_size == rank:
            yield range(start, min(start + batch_size, n))


class Sampled:
    """Mixin for a set of rows: `batch` and `eval_batches` from `_gather(row indices)`, `__len__` and `seed`."""

    seed: int

    def _gather(self, rows):
        raise NotImplementedError

    def _permutations(self) -> EpochPermutations:
        # Built once per object (the permutations are derived data, never state): a resumed run rebuilds the same.
        perms = self.__dict__.get("_epoch_perms")
        if perms is None or perms.n != len(self) or perms.seed != self.seed:
            perms = self.__dict__["_epoch_perms"] = EpochPermutations(len(self), self.seed)
        return perms

    def batch(self, step: int, micro: int = 0, *, batch_size: int, accum: int = 1, rank: int = 0,
              world_size: int = 1):
        """The gathered rows of micro-batch `micro` of `step` on `rank` (see sample_indices)."""
        return self._gather(sample_indices(self._permutations(), step, micro, batch_size=batch_size, accum=accum,
                                           rank=rank, world_size=world_size))

    def epoch_at(self, step: int, batch_size: int, accum: int = 1, world_size: int = 1) -> float:
        """Epochs completed (fractional) before `step`."""
        return step * batch_size * accum * world_size / len(self)

    def eval_batches(self, batch_size: int, max_batches: int | None = None, rank: int = 0, world_size: int = 1):
        """Yield the gathered rows in order, batch_size at a time (the last batch possibly short); rank takes every
        world_size-th batch."""
        for rows in eval_ranges(len(self), batch_size, max_batches, rank, world_size):
            yield self._gather(rows)
