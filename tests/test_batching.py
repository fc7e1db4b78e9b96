"""deranj.data.batching: fixed-shape batches, padding dropped, outputs in row order."""
import numpy as np
import pytest

from deranj.data import batching


def test_chunks_pad_the_last_with_its_first_row():
  chunks = batching.fixed_size_chunks(5, 2)
  assert [c.rows.tolist() for c in chunks] == [[0, 1], [2, 3], [4, 4]]
  assert [(c.number, c.start, c.size) for c in chunks] == [(0, 0, 2), (1, 2, 2), (2, 4, 1)]
  assert [c.rows.tolist() for c in batching.fixed_size_chunks(2, 4)] == [[0, 1, 0, 0]]
  assert batching.fixed_size_chunks(0, 3) == []
  with pytest.raises(ValueError, match="batch_size must be positive"):
    batching.fixed_size_chunks(3, 0)


def test_map_keeps_one_shape_and_drops_the_padding():
  x = np.arange(7 * 2).reshape(7, 2)
  y = np.arange(7) * 10
  shapes, numbers = set(), []

  def fn(number, a, b):
    shapes.add((a.shape, b.shape))
    numbers.append(number)
    return {"sum": a.sum(1) + b, "pair": (a[:, 0], -b)}

  out = batching.map_in_fixed_batches(fn, (x, y), 3, pass_number=True)
  assert shapes == {((3, 2), (3,))}
  assert numbers == [0, 1, 2]
  np.testing.assert_array_equal(out["sum"], x.sum(1) + y)
  np.testing.assert_array_equal(out["pair"][0], x[:, 0])
  np.testing.assert_array_equal(out["pair"][1], -y)
  np.testing.assert_array_equal(batching.map_in_fixed_batches(lambda a: a * 2, (y,), 4), 2 * y)


def test_map_refuses_empty_or_ragged_inputs():
  with pytest.raises(ValueError, match="non-zero first dimension"):
    batching.map_in_fixed_batches(lambda a: a, (np.zeros((0, 2)),), 2)
  with pytest.raises(ValueError, match="non-zero first dimension"):
    batching.map_in_fixed_batches(lambda a, b: a, (np.zeros(3), np.zeros(4)), 2)


def test_on_batch_reports_real_rows_done():
  done = []
  batching.map_in_fixed_batches(lambda a: a, (np.arange(7),), 3, on_batch=done.append)
  assert done == [3, 6, 7]  # the padded last batch counts its one real row
