"""Deterministic input pipeline: a task split, materialised once, then batch k = f(seed, k).

The trainer's interface:

  split = pipeline.load("embedded_news", "train", {"inputs": 512, "targets": 64})
  stream = pipeline.BatchStream(split.features, batch_size=32, seed=0)
  batch = stream.batch_at(step)            # dict of int32 [B, L] arrays
  for batch in stream.iterate(start_step): # batch_at(start_step), batch_at(start_step + 1), ...

  for batch in pipeline.eval_batches(split.features, 64):  # each example once, in order
  split.texts["targets"]                   # untruncated reference strings, for ROUGE
  pipeline.load(..., keep_texts=False)     # large training splits: features only

`load` runs the seqio task (shuffle off), seqio's EncDecFeatureConverter (no packing)
and stacks the result into numpy under the model wrappers' names (deranj.models.base):
`prompts` [N, S], `responses` [N, T] (ids, EOS, then PAD) and `loss_weights` [N, T]
(1 on response tokens). Preference tasks give `prompts` plus the response features
prefixed `chosen_` and `rejected_`; `preference_halves(batch)` splits them into two
ordinary batches. The converter's decoder inputs are dropped: unpacked, they are the
responses shifted right, which the model computes itself.

`BatchStream` reads the examples as an endless stream, epoch after epoch, each epoch in
the order of a permutation seeded by (seed, epoch). Batch k holds stream positions
[kB, (k+1)B), so it depends on (seed, k) alone: a run resumed at step k sees the same
batches as one that never stopped. Permutations come from numpy's PCG64 via
`np.random.default_rng([seed, epoch])`.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator, Mapping, Optional

import numpy as np
import seqio
import tensorflow as tf

from deranj.data import shuffle
from deranj.data import tasks  # noqa: F401  (registers the tasks)

RESPONSE_FEATURES = ("responses", "loss_weights")
# seqio's EncDecFeatureConverter output -> deranj's names (its decoder_input_tokens are
# not kept; see the module docstring).
_CONVERTED_NAMES = {"encoder_input_tokens": "prompts", "decoder_target_tokens": "responses",
                    "decoder_loss_weights": "loss_weights"}
PREFERENCE_SIDES = ("chosen", "rejected")

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Split:
  """A materialised task split: `features` int32 [N, L] each, `texts` N strings each
  (the pretokenized `inputs`, `targets` or `chosen`/`rejected`)."""
  features: Mapping[str, np.ndarray]
  texts: Mapping[str, list[str]]

  def __len__(self) -> int:
    return len(next(iter(self.features.values())))


def _is_preference(task: seqio.Task) -> bool:
  return "chosen" in task.output_features


def _to_numpy(ds: tf.data.Dataset) -> dict[str, np.ndarray]:
  """The converter's features, stacked, under deranj's names."""
  chunks: dict[str, list[np.ndarray]] = {}
  for batch in ds.batch(1024).as_numpy_iterator():
    for key, value in batch.items():
      if key in _CONVERTED_NAMES:
        chunks.setdefault(_CONVERTED_NAMES[key], []).append(value)
  return {k: np.concatenate(v).astype(np.int32) for k, v in chunks.items()}


def load(task_name: str, split: str, lengths: Mapping[str, int], *,
         max_examples: Optional[int] = None, keep_texts: bool = True) -> Split:
  """Tokenized, truncated, EOS-terminated, feature-converted examples of a task split.

  `lengths` = {"inputs": S, "targets": T}; for preference tasks T applies to both
  `chosen` and `rejected`. `max_examples` keeps the first that many, in file order.
  `keep_texts=False` skips the strings (and the in-memory cache that collecting them
  needs): use it for large training splits such as XSum's.
  """
  task = seqio.get_mixture_or_task(task_name)
  preference = _is_preference(task)
  target_features = PREFERENCE_SIDES if preference else ("targets",)
  sequence_length = {"inputs": lengths["inputs"],
                     **{f: lengths["targets"] for f in target_features}}
  ds = task.get_dataset(sequence_length, split=split, shuffle=False, num_epochs=1,
                        use_cached=False)
  if max_examples is not None:
    ds = ds.take(max_examples)
  texts: dict[str, list[str]] = {}
  if keep_texts:
    ds = ds.cache()  # read twice: once for texts, once for features
    texts = {f: [] for f in ("inputs", *target_features)}
    for example in ds.as_numpy_iterator():
      for f in texts:
        texts[f].append(example[f + "_pretokenized"].decode("utf-8"))

  converter = seqio.EncDecFeatureConverter(pack=False)
  lengths_in = {"inputs": lengths["inputs"], "targets": lengths["targets"]}
  if not preference:
    features = _to_numpy(converter(ds, lengths_in))
  else:
    features = {}
    for side in PREFERENCE_SIDES:
      one_side = ds.map(lambda ex, side=side: {"inputs": ex["inputs"], "targets": ex[side]})
      converted = _to_numpy(converter(one_side, lengths_in))
      features["prompts"] = converted["prompts"]
      features.update({f"{side}_{k}": converted[k] for k in RESPONSE_FEATURES})
  if not features:
    raise ValueError(f"task {task_name!r} split {split!r} has no examples.")
  return Split(features=features, texts=texts)


def preference_halves(batch: Mapping[str, np.ndarray]) -> tuple[Batch, Batch]:
  """A preference batch -> (chosen batch, rejected batch), ordinary model batches."""
  halves = []
  for side in PREFERENCE_SIDES:
    half = {"prompts": batch["prompts"]}
    half.update({k: batch[f"{side}_{k}"] for k in RESPONSE_FEATURES})
    halves.append(half)
  return halves[0], halves[1]


class BatchStream:
  """Batches of `features` (each [N, ...]); batch k is a pure function of (seed, k)."""

  def __init__(self, features: Mapping[str, np.ndarray], batch_size: int, seed: int):
    sizes = {k: len(v) for k, v in features.items()}
    if not sizes or len(set(sizes.values())) != 1 or 0 in sizes.values():
      raise ValueError(f"features need the same, non-zero number of rows; got {sizes}.")
    if batch_size <= 0:
      raise ValueError(f"batch_size={batch_size} must be positive.")
    self.features = dict(features)
    self.batch_size = batch_size
    self.seed = seed
    self.num_examples = next(iter(sizes.values()))

  def _permutation(self, epoch: int) -> np.ndarray:
    return shuffle.epoch_permutation(self.seed, epoch, self.num_examples)

  def indices_at(self, step: int) -> np.ndarray:
    """Row indices of batch `step` [B]."""
    if step < 0:
      raise ValueError(f"step={step} must be >= 0.")
    positions = np.arange(step * self.batch_size, (step + 1) * self.batch_size)
    epochs, offsets = np.divmod(positions, self.num_examples)
    return np.array([self._permutation(int(e))[o] for e, o in zip(epochs, offsets)])

  def batch_at(self, step: int) -> Batch:
    rows = self.indices_at(step)
    return {k: v[rows] for k, v in self.features.items()}

  def iterate(self, start_step: int = 0) -> Iterator[Batch]:
    step = start_step
    while True:
      yield self.batch_at(step)
      step += 1


def eval_batches(features: Mapping[str, np.ndarray], batch_size: int) -> Iterator[Batch]:
  """Every example once, in order; the last batch may be smaller."""
  n = len(next(iter(features.values())))
  for start in range(0, n, batch_size):
    yield {k: v[start:start + batch_size] for k, v in features.items()}

