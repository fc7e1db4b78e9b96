"""PAD is never sampled, and the sampler's statistics are those of the PAD-free rule."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deranj import decoding

V, B, T = 7, 64, 6
PAD, EOS = 0, 1


def _markov_logits(num_models: int, seed: int = 0) -> np.ndarray:
  """[M, V, V] next-token logits given the last token, with most mass on PAD."""
  logits = np.random.default_rng(seed).normal(size=(num_models, V, V)).astype(np.float32)
  logits[:, :, PAD] = 8.0  # PAD would take ~99% of every step
  return logits


def _tokens_to_logits(table: np.ndarray):
  table = jnp.asarray(table)

  def fn(tokens, caches):
    return table[:, tokens], caches  # [M, B, V]

  return fn


def _run(table, weights, temperature=1.0, pad_id=0, seed=0):
  config = decoding.SamplingConfig(T, EOS, temperature, pad_id=pad_id)
  return decoding.mixture_sample(_tokens_to_logits(table), jnp.zeros(()),
                                 jnp.asarray(weights, jnp.float32),
                                 jax.random.PRNGKey(seed), config)


def _log_softmax(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _replay(table, weights, tokens):
  """float64 per-sequence (log q, log Z, sum_t sum_m w_m log p_m) along the sampled
  tokens, every distribution over the ids other than PAD."""
  table = np.array(table, np.float64)
  table[:, :, PAD] = -np.inf
  model_logp = _log_softmax(table)  # [M, V, V], each model as it samples alone
  logq, log_z, mix = np.zeros(len(tokens)), np.zeros(len(tokens)), np.zeros(len(tokens))
  for b, row in enumerate(np.asarray(tokens)):
    last = 0
    for tok in row:
      w = np.asarray(weights[b], np.float64)
      mixed = np.einsum("m,mv->v", w, np.where(np.isinf(table[:, last]), 0, table[:, last]))
      mixed[PAD] = -np.inf
      logq[b] += _log_softmax(mixed)[tok]
      mixed_logp = np.einsum("m,mv->v", w, np.where(np.isinf(model_logp[:, last]), 0,
                                                     model_logp[:, last]))
      mixed_logp[PAD] = -np.inf
      log_z[b] += np.log(np.exp(mixed_logp).sum())
      mix[b] += mixed_logp[tok]
      if tok == EOS:
        break
      last = tok
  return logq, log_z, mix


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_pad_is_never_sampled(temperature):
  table = _markov_logits(2)
  out = _run(table, np.tile([0.3, 0.7], (B, 1)), temperature)
  tokens = np.asarray(out.tokens)
  lengths = np.asarray(out.lengths)
  for row, n in zip(tokens, lengths):
    assert np.all(row[:n] != PAD), row  # PAD only after EOS
    assert np.all(row[n:] == PAD)
    assert n == T or row[n - 1] == EOS
  # Without the mask the same logits emit PAD mid-response almost surely.
  unmasked = np.asarray(_run(table, np.tile([0.3, 0.7], (B, 1)), temperature, pad_id=-1).tokens)
  assert np.mean(unmasked[:, 0] == PAD) > 0.9


def test_statistics_are_over_the_pad_free_support():
  table = _markov_logits(2, seed=1)
  weights = np.tile([[-0.5, 1.5]], (B, 1))  # lam = 1.5: extrapolation
  out = _run(table, weights)
  logq, log_z, mix = _replay(table, weights, out.tokens)
  np.testing.assert_allclose(out.logq, logq, rtol=1e-5 * T, atol=1e-5)
  np.testing.assert_allclose(out.log_weight, log_z, rtol=1e-5 * T, atol=1e-5)
  # SIR's identity: q(y) * prod_t Z_t = prod_m p_m(y)^w_m, the unnormalised mixture.
  np.testing.assert_allclose(np.asarray(out.logq) + np.asarray(out.log_weight), mix,
                             rtol=1e-5 * T, atol=1e-5)


def test_single_model_weights_are_bit_exact():
  """lam = 0 / 1 through the mixture equals sampling the one model alone."""
  table = _markov_logits(2, seed=2)
  for m in (0, 1):
    weights = np.zeros((B, 2), np.float32)
    weights[:, m] = 1.0
    mixed = _run(table, weights, seed=5)
    alone = _run(table[m:m + 1], np.ones((B, 1)), seed=5)
    np.testing.assert_array_equal(mixed.tokens, alone.tokens)
    np.testing.assert_array_equal(mixed.logq, alone.logq)
    np.testing.assert_array_equal(mixed.log_weight, alone.log_weight)
    # Alone, a model's log q is its own log-probability, and its KL to itself 0.
    np.testing.assert_allclose(alone.logq, alone.logp[:, 0], rtol=1e-6 * T)
    np.testing.assert_array_equal(mixed.kl_ref if m == 0 else 0.0, 0.0)
