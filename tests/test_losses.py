"""Losses against direct NumPy computations on tiny inputs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deranj.models import base
from deranj.models import losses
from deranj.models import t5


def _np_log_softmax(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def test_cross_entropy_plain():
  logits = np.array([[2.0, 0.5, -1.0], [0.0, 0.0, 3.0]], np.float32)
  targets = np.array([0, 1])
  loss, z = losses.cross_entropy_with_logits(jnp.asarray(logits), jnp.asarray(targets))
  lsm = _np_log_softmax(logits)
  np.testing.assert_allclose(loss, -lsm[[0, 1], targets], rtol=1e-6)
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
  np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(z, z_loss * log_z**2, rtol=1e-5)


def test_smoothed_loss_is_zero_at_the_smoothed_target():
  v, eps = 4, 0.1
  probs = np.full(v, eps / (v - 1))
  probs[2] = 1 - eps
  logits = jnp.log(jnp.asarray(probs, jnp.float32))[None]
  loss, _ = losses.cross_entropy_with_logits(logits, jnp.array([2]), label_smoothing=eps)
  np.testing.assert_allclose(loss, 0.0, atol=1e-6)


def test_model_loss_and_score_mask_padding():
  cfg = t5.T5Config(vocab_size=11, d_model=8, d_kv=4, d_ff=12, num_heads=2, num_layers=1,
                    dropout_rate=0.0)
  model = base.EncoderDecoderModel(t5.Transformer(cfg))
  params = model.init_params(jax.random.PRNGKey(0))
  targets = jnp.array([[3, 4, 1, 0, 0], [5, 6, 7, 8, 1]])
  batch = {"encoder_input_tokens": jnp.array([[2, 3, 1], [4, 1, 0]]),
           "decoder_input_tokens": base.shift_right(targets),
           "decoder_target_tokens": targets}
  logits = np.asarray(model.logits(params, batch), np.float64)
  lsm = _np_log_softmax(logits)
  tok_ll = np.take_along_axis(lsm, np.asarray(targets)[..., None], -1)[..., 0]
  mask = np.asarray(targets) > 0
  loss, metrics = model.loss_fn(params, batch)
  np.testing.assert_allclose(loss, -(tok_ll * mask).sum() / mask.sum(), rtol=1e-5)
  assert float(metrics["num_tokens"]) == 8
  np.testing.assert_allclose(model.score_batch(params, batch), (tok_ll * mask).sum(-1), rtol=1e-5)
  acc = ((logits.argmax(-1) == np.asarray(targets)) * mask).sum() / mask.sum()
  np.testing.assert_allclose(metrics["accuracy"], acc, rtol=1e-6)


def test_shift_right():
  np.testing.assert_array_equal(base.shift_right(jnp.array([[5, 6, 1, 0]])), [[0, 5, 6, 1]])
