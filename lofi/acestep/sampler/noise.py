"""Noise sources for the sampler: our own seeded N(0,1) stream, or injected arrays for parity.

The reference's torch/CUDA stream cannot be reproduced (spec trap 13), so a seed here names a
song of *this* program: the same seed gives bit-identical noise with the same numpy.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Sequence
from typing import Protocol

import numpy as np


class NoiseSource(Protocol):
    def randn(self, shape: Sequence[int]) -> np.ndarray:
        """float32 samples of N(0, 1) with the given shape."""


def random_seed() -> int:
    """A fresh seed in [0, 2**32)."""
    return secrets.randbits(32)


class SeededNoise:
    """One numpy Philox generator per seed.

    With one seed every draw comes from it. With several seeds a draw whose leading axis equals
    their number takes row i from generator i, so batch item i of a run seeded [.., s, ..] starts
    from the same noise as a batch-1 run seeded s.
    """

    def __init__(self, seeds: int | Sequence[int]):
        seeds = [seeds] if isinstance(seeds, (int, np.integer)) else list(seeds)
        if not seeds:
            raise ValueError("SeededNoise needs at least one seed")
        for s in seeds:
            if not isinstance(s, (int, np.integer)) or not 0 <= int(s) < 2**64:
                raise ValueError(f"seed must be an integer in [0, 2**64), got {s!r}")
        self.seeds = [int(s) for s in seeds]
        self._gens = [np.random.Generator(np.random.Philox(s)) for s in self.seeds]

    def randn(self, shape: Sequence[int]) -> np.ndarray:
        shape = tuple(int(d) for d in shape)
        if len(self._gens) == 1:
            return self._gens[0].standard_normal(shape, dtype=np.float32)
        if not shape or shape[0] != len(self._gens):
            raise ValueError(f"{len(self._gens)} seeds cannot fill a draw of shape {shape}")
        return np.stack([g.standard_normal(shape[1:], dtype=np.float32) for g in self._gens])


class InjectedNoise:
    """Returns the given arrays in order (parity tests feed the reference's recorded noise)."""

    def __init__(self, arrays: Iterable[np.ndarray]):
        self._arrays = [np.asarray(a, dtype=np.float32) for a in arrays]
        self.drawn = 0

    @property
    def remaining(self) -> int:
        return len(self._arrays) - self.drawn

    def randn(self, shape: Sequence[int]) -> np.ndarray:
        if self.drawn >= len(self._arrays):
            raise RuntimeError(f"injected noise exhausted after {self.drawn} draws")
        a = self._arrays[self.drawn]
        if a.shape != tuple(shape):
            raise ValueError(f"injected noise #{self.drawn} has shape {a.shape}, "
                             f"the sampler asked for {tuple(shape)}")
        self.drawn += 1
        return a
