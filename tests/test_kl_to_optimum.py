"""losses.kl_to_optimum: by hand, at the optimum, and against the exact KL of an
enumerable world (deranj.exact) within a Monte-Carlo band derived from the world."""
import math

import jax.numpy as jnp
import numpy as np
import pytest

from deranj import exact
from deranj.training import losses


def _estimate(rewards, logp, logp_ref, beta, s):
  return float(losses.kl_to_optimum(jnp.asarray(rewards, jnp.float32),
                                    jnp.asarray(logp, jnp.float32),
                                    jnp.asarray(logp_ref, jnp.float32), beta, s))


def test_by_hand_and_bad_input():
  # One prompt, two samples with R / beta = 0 and log 3: log((1 + 3) / 2) - log(3) / 2.
  beta = 0.5
  got = _estimate([0.0, beta * math.log(3)], [-1.0, -2.0], [-1.0, -2.0], beta, 2)
  assert got == pytest.approx(math.log(2) - 0.5 * math.log(3), rel=1e-6)
  # The log-ratio enters as -beta * (logp - logp_ref): the same R from other numbers.
  got = _estimate([0.0, 0.0], [-1.0, -2.0 - math.log(3)], [-1.0, -2.0], beta, 2)
  assert got == pytest.approx(math.log(2) - 0.5 * math.log(3), rel=1e-6)
  # Two prompts: the mean of their estimates (the second's R is constant: 0).
  got = _estimate([0.0, beta * math.log(3), 5.0, 5.0], [0.0] * 4, [0.0] * 4, beta, 2)
  assert got == pytest.approx(0.5 * (math.log(2) - 0.5 * math.log(3)), rel=1e-6)
  with pytest.raises(ValueError, match="beta must be > 0"):
    _estimate([0.0, 1.0], [0.0, 0.0], [0.0, 0.0], 0.0, 2)
  with pytest.raises(ValueError, match="num_samples = 2"):
    _estimate([0.0, 1.0, 2.0], [0.0] * 3, [0.0] * 3, 1.0, 2)
  with pytest.raises(ValueError, match="num_samples = 1 >= 2"):
    _estimate([0.0, 1.0], [0.0] * 2, [0.0] * 2, 1.0, 1)


WORLD = exact.make_world(num_prompts=4, content_ids=range(3, 6), max_len=4)  # 40 responses
BETA = 0.5


def _draws(logp_pi, logp_ref, r, s, seed):
  """[P * S] rewards, log pi and log pi_ref of S exact draws per prompt from pi."""
  index = exact.sample_responses(logp_pi, s, seed=seed)  # [P, S]
  rows = np.arange(logp_pi.shape[0])[:, None]
  return (np.broadcast_to(r, logp_pi.shape)[rows, index].ravel(),
          logp_pi[rows, index].ravel(), logp_ref[rows, index].ravel())


def test_zero_at_the_optimum_for_any_samples():
  logp_ref = exact.random_policy(WORLD.responses, 4, seed=0)
  r = exact.gold_reward(WORLD.responses, WORLD.content_ids, seed=0)
  optimum = exact.optimal_policy(logp_ref, r, BETA)
  got = _estimate(*_draws(optimum, logp_ref, r, 8, seed=0), BETA, 8)
  # R / beta = log Z for every sample: zero up to float32 rounding of terms ~ 10.
  assert abs(got) < 1e-5, got


@pytest.mark.parametrize("seed,lam", [(1, 0.3), (2, 0.5)])
def test_matches_the_exact_kl_within_its_monte_carlo_band(seed, lam):
  """pi: part-way (lam) from the optimum to a random policy, as a policy in training;
  KL 0.1 to 1.2 nats per prompt and importance weights w / Z below 15."""
  logp_ref = exact.random_policy(WORLD.responses, 4, seed=0)
  r = exact.gold_reward(WORLD.responses, WORLD.content_ids, seed=0)
  optimum = exact.optimal_policy(logp_ref, r, BETA)
  logp_pi = exact.geometric_mixture(
      optimum, exact.random_policy(WORLD.responses, 4, seed=seed), lam)
  truth = exact.kl(logp_pi, optimum).per_prompt
  s = 20_000
  rewards, logp, logp_ref_s = _draws(logp_pi, logp_ref, r, s, seed=10 + seed)
  got = np.array([_estimate(rewards[p * s:(p + 1) * s], logp[p * s:(p + 1) * s],
                            logp_ref_s[p * s:(p + 1) * s], BETA, s) for p in range(4)])
  # The band, exactly from the world. With w = exp(z), z = r / beta - log(pi / pi_ref)
  # and Z = E_pi[w], to first order estimate - KL = (mean w / Z - 1) - (mean z - E z):
  # a mean of S draws of u = w / Z - z, so its sd is sd_pi(u) / sqrt(S); Jensen's bias
  # of log-mean-exp is -Var_pi(w / Z) / (2 S).
  pi = np.exp(logp_pi)
  z = r / BETA - logp_pi + logp_ref
  w = np.exp(z) / np.sum(pi * np.exp(z), axis=1, keepdims=True)
  var = lambda x: np.sum(pi * x**2, 1) - np.sum(pi * x, 1)**2  # noqa: E731
  sd, bias = np.sqrt(var(w - z) / s), -var(w) / (2 * s)
  assert np.all(np.abs(got - truth - bias) < 5 * sd + 1e-5), (got, truth, sd, bias)
  assert np.all(5 * sd < 0.2 * truth), (sd, truth)  # the band is tight enough to matter
  assert losses.kl_to_optimum(jnp.asarray(rewards), jnp.asarray(logp),
                              jnp.asarray(logp_ref_s), BETA, s) == pytest.approx(
                                  got.mean(), rel=1e-5)
