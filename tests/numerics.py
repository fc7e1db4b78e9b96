"""Float tolerances for tests: float32 results against float64 NumPy references.

A float32 computation of `terms` rounded operations whose operands have magnitude
`scale` is off by at most about terms * eps32 * scale, whatever the machine (x86 CPUs
differ in summation order and fused multiply-adds, so a bit-level agreement is not
promised). The tolerance is a small multiple of that; a real bug is off by far more.
"""
import numpy as np

EPS32 = float(np.finfo(np.float32).eps)
SLACK = 4.0  # headroom over the one-rounding-per-term estimate (log, exp round twice)


def f32_tolerance(terms, scale):
  """SLACK * eps32 * terms * scale: the error allowed a float32 result (elementwise)."""
  return SLACK * EPS32 * terms * np.asarray(scale, np.float64)


def assert_close_f32(got, expected, terms, scale=None, err_msg=""):
  """|got - expected| <= SLACK * eps32 * terms * scale elementwise.

  Args:
    got: the float32 result.
    expected: the float64 reference.
    terms: rounded operations behind each element (summands, vocabulary of a softmax,
      ...); the error grows with it.
    scale: magnitude of the operands, elementwise or a scalar; defaults to |expected|,
      which is right when nothing cancels (e.g. a sum of log-probabilities, all <= 0).
      Give it where the result is much smaller than what was summed (a KL near 0, a
      log-probability near 0 from logits of size 30).
  """
  got = np.asarray(got, np.float64)
  expected = np.broadcast_to(np.asarray(expected, np.float64), got.shape)
  if scale is None:
    scale = np.abs(expected)
  tol = np.broadcast_to(f32_tolerance(terms, scale), got.shape)
  assert np.all(np.isfinite(got)), f"not finite: {got} {err_msg}"
  err = np.abs(got - expected)
  bad = ~(err <= tol)
  if np.any(bad):
    i = np.unravel_index(np.argmax(np.where(bad, err / np.maximum(tol, 1e-300), 0)), err.shape)
    raise AssertionError(
        f"{int(bad.sum())} of {err.size} elements off by more than {SLACK:g} * eps32 * "
        f"{terms} * scale; worst at {tuple(int(j) for j in i)}: got {got[i]!r}, expected "
        f"{expected[i]!r}, error {err[i]:.3g} > tolerance {tol[i]:.3g}. {err_msg}")
