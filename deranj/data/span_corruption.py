"""T5's span-corruption objective in numpy (Raffel et al., 2020, sec. 3.1.4).

A token sequence loses ~15% of its tokens in spans of mean length 3. Each dropped span
becomes one sentinel in the inputs; the targets list each sentinel followed by the
tokens it replaced. Both end in EOS. Sentinel k is `vocab_size - 1 - k`, as in T5.
Ported from `t5.data.preprocessors` (random_spans_helper, random_spans_noise_mask,
noise_span_to_unique_sentinel), without TensorFlow.

`SpanCorruptionBatches` turns token chunks into batches that are a pure function of
(seed, step), like `deranj.data.pipeline`.
"""
from __future__ import annotations

import numpy as np

from deranj.data import shuffle

EOS_ID = 1


def random_spans_helper(inputs_length: int, noise_density: float = 0.15,
                        mean_noise_span_length: float = 3.0) -> tuple[int, int]:
  """(raw tokens per example, targets length) so that corrupted inputs plus EOS fill
  exactly `inputs_length`."""

  def lengths(tokens_length: int) -> tuple[int, int]:
    num_noise = int(round(tokens_length * noise_density))
    num_spans = int(round(num_noise / mean_noise_span_length))
    # Inputs: non-noise tokens, a sentinel per span, EOS. Targets: the same the other way.
    return (tokens_length - num_noise + num_spans + 1, num_noise + num_spans + 1)

  tokens_length = inputs_length - 1
  while lengths(tokens_length + 1)[0] <= inputs_length:
    tokens_length += 1
  return tokens_length, lengths(tokens_length)[1]


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator):
  """Splits `num_items` into `num_segments` non-empty parts uniformly: [num_segments]."""
  first_in_segment = np.zeros(num_items, np.int64)
  boundaries = rng.permutation(num_items - 1)[:num_segments - 1] + 1
  first_in_segment[boundaries] = 1
  segment_id = np.cumsum(first_in_segment)
  return np.bincount(segment_id, minlength=num_segments)


def random_spans_noise_mask(length: int, rng: np.random.Generator, noise_density: float = 0.15,
                            mean_noise_span_length: float = 3.0) -> np.ndarray:
  """Boolean [length]: True for noise. Spans alternate non-noise, noise, ...; the first
  span is non-noise, as in T5."""
  orig_length = length
  length = max(length, 2)
  num_noise = int(round(length * noise_density))
  num_noise = min(max(num_noise, 1), length - 1)
  num_spans = max(int(round(num_noise / mean_noise_span_length)), 1)
  noise_lengths = _random_segmentation(num_noise, num_spans, rng)
  nonnoise_lengths = _random_segmentation(length - num_noise, num_spans, rng)
  interleaved = np.stack([nonnoise_lengths, noise_lengths], axis=1).reshape(-1)
  span_starts = np.cumsum(interleaved)[:-1]
  start_indicator = np.zeros(length, np.int64)
  start_indicator[span_starts] = 1
  return (np.cumsum(start_indicator) % 2 == 1)[:orig_length]


def _to_sentinels(tokens: np.ndarray, keep_mask: np.ndarray, vocab_size: int) -> np.ndarray:
  """Replaces each run of dropped tokens (keep_mask False) by one sentinel."""
  dropped = ~keep_mask
  first_dropped = dropped & ~np.concatenate([[False], dropped[:-1]])
  sentinels = vocab_size - np.cumsum(first_dropped)  # first span -> vocab_size - 1
  out = np.where(first_dropped, sentinels, tokens)
  return out[keep_mask | first_dropped]


def span_corruption(tokens: np.ndarray, rng: np.random.Generator, vocab_size: int,
                    noise_density: float = 0.15,
                    mean_noise_span_length: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
  """[L] token ids -> (inputs, targets), both ending in EOS."""
  noise = random_spans_noise_mask(len(tokens), rng, noise_density, mean_noise_span_length)
  inputs = _to_sentinels(tokens, ~noise, vocab_size)
  targets = _to_sentinels(tokens, noise, vocab_size)
  return np.append(inputs, EOS_ID), np.append(targets, EOS_ID)


def chunk_documents(documents: list[list[int]], tokens_length: int) -> np.ndarray:
  """Concatenates documents (each followed by EOS) and cuts [N, tokens_length] chunks,
  dropping the remainder (T5's reduce_concat_tokens + split_tokens)."""
  stream = np.concatenate([np.append(np.asarray(d, np.int32), EOS_ID) for d in documents])
  n = len(stream) // tokens_length
  if n == 0:
    raise ValueError(f"{len(stream)} tokens make no chunk of {tokens_length}.")
  return stream[:n * tokens_length].reshape(n, tokens_length)


class SpanCorruptionBatches:
  """Batch k of span-corrupted chunks is a pure function of (seed, k).

  Chunks are visited in a fresh permutation each epoch; a chunk's corruption is drawn
  from (seed, epoch, chunk index), so every epoch sees new noise. Batches are model
  batches (deranj.models.base): `prompts` [B, inputs_length] the corrupted inputs,
  `responses` and `loss_weights` [B, targets_length] the dropped spans.
  """

  def __init__(self, chunks: np.ndarray, batch_size: int, inputs_length: int,
               targets_length: int, vocab_size: int, seed: int,
               noise_density: float = 0.15, mean_noise_span_length: float = 3.0):
    if len(chunks) == 0:
      raise ValueError("SpanCorruptionBatches needs at least one chunk.")
    self.chunks = chunks
    self.batch_size = batch_size
    self.inputs_length, self.targets_length = inputs_length, targets_length
    self.vocab_size, self.seed = vocab_size, seed
    self.noise_density, self.mean_noise_span_length = noise_density, mean_noise_span_length

  def _permutation(self, epoch: int) -> np.ndarray:
    return shuffle.epoch_permutation(self.seed, epoch, len(self.chunks))

  def example(self, epoch: int, index: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([self.seed, epoch, index, 1])
    return span_corruption(self.chunks[index], rng, self.vocab_size, self.noise_density,
                           self.mean_noise_span_length)

  def batch_at(self, step: int) -> dict[str, np.ndarray]:
    n = len(self.chunks)
    pairs = []
    for position in range(step * self.batch_size, (step + 1) * self.batch_size):
      epoch, offset = divmod(position, n)
      pairs.append(self.example(epoch, int(self._permutation(epoch)[offset])))
    return to_features(pairs, self.inputs_length, self.targets_length)


def to_features(pairs: list[tuple[np.ndarray, np.ndarray]], inputs_length: int,
                targets_length: int) -> dict[str, np.ndarray]:
  """(inputs, targets) pairs -> a padded model batch (int32)."""
  b = len(pairs)
  enc = np.zeros((b, inputs_length), np.int32)
  dec_target = np.zeros((b, targets_length), np.int32)
  for row, (inputs, targets) in enumerate(pairs):
    if len(inputs) > inputs_length or len(targets) > targets_length:
      raise ValueError(f"example of lengths {len(inputs)}/{len(targets)} exceeds "
                       f"{inputs_length}/{targets_length}.")
    enc[row, :len(inputs)] = inputs
    dec_target[row, :len(targets)] = targets
  return {"prompts": enc, "responses": dec_target,
          "loss_weights": (dec_target > 0).astype(np.int32)}
