"""Token-level losses for sequence models (T5X conventions)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def cross_entropy_with_logits(logits: Array, targets: Array, *, z_loss: float = 0.0,
                              label_smoothing: float = 0.0) -> tuple[Array, Array]:
  """Per-token cross-entropy and z-loss.

  Args:
    logits: [..., V] unnormalised scores.
    targets: [...] integer ids.
    z_loss: coefficient of log(Z)^2, which keeps the softmax normaliser near 1.
    label_smoothing: mass spread uniformly over the V-1 wrong classes. The constant
      entropy of the smoothed target is subtracted, so a perfect model scores 0.

  Returns:
    (loss, z_loss_term), each [...]; `loss` already includes `z_loss_term`.
  """
  vocab = logits.shape[-1]
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  log_probs = logits - log_z[..., None]
  if label_smoothing > 0.0:
    on = 1.0 - label_smoothing
    off = label_smoothing / (vocab - 1)
    soft = jax.nn.one_hot(targets, vocab) * (on - off) + off
    loss = -jnp.sum(soft * log_probs, axis=-1)
    # Entropy of the smoothed target: the minimum of `loss`.
    loss = loss + (on * np.log(on) + (vocab - 1) * off * np.log(off + 1e-20))
  else:
    loss = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  z_term = z_loss * jnp.square(log_z)
  return loss + z_term, z_term


def token_log_likelihood(logits: Array, targets: Array) -> Array:
  """log softmax(logits)[target] per position: [B, T, V], [B, T] -> [B, T] float32."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
