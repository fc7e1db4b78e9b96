"""T5's span corruption in numpy: lengths, reconstruction, determinism."""
import numpy as np
import pytest

from deranj.data import span_corruption as sc

VOCAB = 4096


def _reconstruct(inputs, targets):
  """Puts each sentinel's target span back in place of the sentinel."""
  spans, current = {}, None
  for t in targets[:-1]:
    if t >= VOCAB - 96:
      current = t
      spans[current] = []
    else:
      spans[current].append(t)
  out = []
  for t in inputs[:-1]:
    out.extend(spans[t] if t >= VOCAB - 96 else [t])
  return np.array(out)


def test_helper_matches_t5():
  # T5's span corruption maps 568 raw tokens to 512 inputs and 114 targets.
  assert sc.random_spans_helper(512) == (568, 114)


@pytest.mark.parametrize("inputs_length", [32, 128, 512])
def test_corruption_fills_lengths_and_is_invertible(inputs_length):
  tokens_length, targets_length = sc.random_spans_helper(inputs_length)
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, 3000, tokens_length)
  inputs, targets = sc.span_corruption(tokens, rng, VOCAB)
  assert len(inputs) == inputs_length and len(targets) == targets_length
  assert inputs[-1] == targets[-1] == sc.EOS_ID
  assert inputs[0] != VOCAB - 1 and targets[0] == VOCAB - 1  # first span is kept, as in T5
  np.testing.assert_array_equal(_reconstruct(inputs, targets), tokens)
  noise = sc.random_spans_noise_mask(1000, np.random.default_rng(1))
  assert noise.sum() == 150 and noise[0] == 0
  assert np.sum(noise[1:] & ~noise[:-1]) == 50  # 50 spans of mean length 3


def test_batches_are_a_function_of_seed_and_step():
  tokens_length, targets_length = sc.random_spans_helper(36)
  chunks = np.arange(37 * tokens_length).reshape(37, tokens_length) % 3000 + 3
  make = lambda seed: sc.SpanCorruptionBatches(chunks, 8, 36, targets_length, VOCAB, seed)
  a, b = make(0), make(0)
  later = [b.batch_at(s) for s in (9, 3, 4)]  # any order, fresh object
  for step, batch in zip((9, 3, 4), later):
    for key, value in a.batch_at(step).items():
      np.testing.assert_array_equal(value, batch[key])
  assert not np.array_equal(make(1).batch_at(3)["prompts"], a.batch_at(3)["prompts"])
  batch = a.batch_at(0)
  assert set(batch) == {"prompts", "responses", "loss_weights"}
  np.testing.assert_array_equal(batch["loss_weights"], batch["responses"] > 0)
  # The same chunk is corrupted differently in another epoch.
  assert not np.array_equal(a.example(0, 5)[0], a.example(1, 5)[0])
