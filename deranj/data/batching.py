"""Fixed-shape batches over N rows: every call sees [batch_size, ...], so a jitted
function compiles once however many rows there are.

    logps = map_in_fixed_batches(lambda x, y: score(params, x, y), (prompts, responses), 64)

The last batch is padded by repeating its first row; outputs of the padding are dropped.
Per-row computations (sampling with one key per batch included) give the real rows the
same values whatever the padding holds.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class Chunk:
  """One fixed-size batch: `rows` [batch_size] indices, the first `size` of them real."""
  number: int  # 0, 1, ...: e.g. for jax.random.fold_in
  start: int
  size: int
  rows: np.ndarray


def fixed_size_chunks(num_rows: int, batch_size: int) -> list[Chunk]:
  """Rows 0..num_rows-1 in chunks of `batch_size`, the last padded with its first row."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}.")
  chunks = []
  for number, start in enumerate(range(0, num_rows, batch_size)):
    size = min(batch_size, num_rows - start)
    rows = np.full(batch_size, start)
    rows[:size] = np.arange(start, start + size)
    chunks.append(Chunk(number=number, start=start, size=size, rows=rows))
  return chunks


def map_in_fixed_batches(fn: Callable[..., Any], arrays: Sequence[Any], batch_size: int, *,
                         pass_number: bool = False,
                         on_batch: Optional[Callable[[int], None]] = None) -> Any:
  """fn over [batch_size] slices of `arrays` (each [N, ...]), outputs joined back to [N].

  Args:
    fn: `fn(*batch)` (or `fn(chunk_number, *batch)` with `pass_number`) returning an
      array or a pytree of arrays, each [batch_size, ...].
    arrays: inputs sharing their first dimension N > 0.
    batch_size: rows per call.
    on_batch: called with the number of real rows done after each batch (progress).

  Returns:
    fn's output structure with NumPy leaves [N, ...].
  """
  arrays = [np.asarray(a) for a in arrays]
  n = len(arrays[0]) if arrays else 0
  if n == 0 or any(len(a) != n for a in arrays):
    raise ValueError(f"need arrays with one non-zero first dimension, got "
                     f"{[a.shape for a in arrays]}.")
  outs = []
  for chunk in fixed_size_chunks(n, batch_size):
    batch = [a[chunk.rows] for a in arrays]
    out = fn(chunk.number, *batch) if pass_number else fn(*batch)
    outs.append(jax.tree_util.tree_map(lambda x, k=chunk.size: np.asarray(x)[:k],
                                       jax.device_get(out)))
    if on_batch is not None:
      on_batch(chunk.start + chunk.size)
  return jax.tree_util.tree_map(lambda *xs: np.concatenate(xs), *outs)
