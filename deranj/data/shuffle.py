"""Epoch order for deterministic input streams: a function of (seed, epoch) alone."""
from __future__ import annotations

import functools

import numpy as np


@functools.lru_cache(maxsize=8)
def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  """The example order of one epoch, from numpy's PCG64 seeded by [seed, epoch]."""
  order = np.random.default_rng([seed, epoch]).permutation(num_examples)
  order.flags.writeable = False  # shared through the cache
  return order
