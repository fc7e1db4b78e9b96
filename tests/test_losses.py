"""Losses against direct NumPy computations on tiny inputs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deranj.models import base
from deranj.models import build
from deranj.models import losses
from numerics import assert_close_f32
import tiny_models


def _np_log_softmax(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def test_cross_entropy_plain():
  logits = np.array([[2.0, 0.5, -1.0], [0.0, 0.0, 3.0]], np.float32)
  targets = np.array([0, 1])
  loss, z = losses.cross_entropy_with_logits(jnp.asarray(logits), jnp.asarray(targets))
  lsm = _np_log_softmax(logits)
  # x_target - log Z cancels: rounding is relative to the logits, not the loss.
  scale = np.abs(logits).max(-1) + np.abs(lsm).max(-1)
  assert_close_f32(loss, -lsm[[0, 1], targets], logits.shape[-1], scale)
  np.testing.assert_array_equal(z, 0.0)


@pytest.mark.parametrize("z_loss,smoothing", [(1e-2, 0.0), (0.0, 0.1), (1e-3, 0.2)])
def test_cross_entropy_z_loss_and_smoothing(z_loss, smoothing):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(4, 5)).astype(np.float32) * 3
  targets = rng.integers(0, 5, size=4)
  loss, z = losses.cross_entropy_with_logits(
      jnp.asarray(logits), jnp.asarray(targets), z_loss=z_loss, label_smoothing=smoothing)
  v = logits.shape[-1]
  lsm = _np_log_softmax(logits)
  soft = np.full((4, v), smoothing / (v - 1))
  soft[np.arange(4), targets] = 1 - smoothing
  entropy = -(soft * np.log(soft + (soft == 0))).sum(-1)  # min of the smoothed CE
  log_z = np.log(np.exp(np.asarray(logits, np.float64)).sum(-1))
  expected = -(soft * lsm).sum(-1) - entropy + z_loss * log_z**2
  # The smoothed loss subtracts its minimum: scale by what was summed.
  scale = np.abs(logits).max(-1) + np.abs(lsm).max(-1) + entropy + z_loss * log_z**2
  assert_close_f32(loss, expected, v, scale)
  assert_close_f32(z, z_loss * log_z**2, v, z_loss * log_z**2)


def test_smoothed_loss_is_zero_at_the_smoothed_target():
  v, eps = 4, 0.1
  probs = np.full(v, eps / (v - 1))
  probs[2] = 1 - eps
  logits = jnp.log(jnp.asarray(probs, jnp.float32))[None]
  loss, _ = losses.cross_entropy_with_logits(logits, jnp.array([2]), label_smoothing=eps)
  assert_close_f32(loss, np.zeros(1), v, -np.log(probs).max())  # a difference of two ~0.4s


def test_model_loss_and_score_mask_padding():
  cfg = build.T5Config(vocab_size=11, d_model=8, d_kv=4, d_ff=12, num_heads=2, num_layers=1,
                    dropout_rate=0.0)
  model = base.EncoderDecoderModel(build.network(cfg))
  params = tiny_models.random_params(model, 0)
  targets = jnp.array([[3, 4, 1, 0, 0], [5, 6, 7, 8, 1]])
  batch = {"prompts": jnp.array([[2, 3, 1], [4, 1, 0]]),
           "responses": targets}
  logits = np.asarray(jax.jit(model.logits)(params, batch), np.float64)
  lsm = _np_log_softmax(logits)
  tok_ll = np.take_along_axis(lsm, np.asarray(targets)[..., None], -1)[..., 0]
  mask = np.asarray(targets) > 0
  loss, metrics = jax.jit(model.loss_fn)(params, batch)
  # Per token: log Z of V terms; then sums over the 8 tokens. Scale: the logits' size.
  scale = (np.abs(logits).max(-1) * mask).sum(-1)
  assert_close_f32(loss, -(tok_ll * mask).sum() / mask.sum(), cfg.vocab_size,
                   scale.sum() / mask.sum())
  assert float(metrics["num_tokens"]) == 8
  assert_close_f32(jax.jit(model.score_batch)(params, batch), (tok_ll * mask).sum(-1),
                   cfg.vocab_size, scale)
  acc = ((logits.argmax(-1) == np.asarray(targets)) * mask).sum() / mask.sum()
  assert_close_f32(metrics["accuracy"], acc, mask.sum(), acc)


def test_shift_right():
  np.testing.assert_array_equal(base.shift_right(jnp.array([[5, 6, 1, 0]])), [[0, 5, 6, 1]])
