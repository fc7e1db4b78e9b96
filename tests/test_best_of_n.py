"""Best-of-N: N candidates per prompt in one call, the best kept by a scorer."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deranj import dera
from deranj.models import base
from deranj.models import build
import tiny_models

CFG = build.T5Config(vocab_size=23, d_model=8, d_kv=4, d_ff=16, num_heads=2, num_layers=1,
                  dropout_rate=0.0)
PROMPTS = jnp.array([[5, 6, 7, 8, 1], [9, 10, 1, 0, 0], [11, 1, 0, 0, 0]])
N = 4


@pytest.fixture(scope="module")
def realigner():
  model = base.EncoderDecoderModel(build.network(CFG))
  sharpen = lambda p: jax.tree_util.tree_map(lambda x: jnp.asarray(x * 2.0), p)
  return dera.Realigner(model, sharpen(tiny_models.random_params(model, 0)), model,
                        sharpen(tiny_models.random_params(model, 1)), max_decode_len=6)


def _check_best(best, candidates, scores):
  """`best` keeps, per prompt, the first candidate with the highest of `scores` [B*N]."""
  scores = np.asarray(scores).reshape(-1, N)
  np.testing.assert_array_equal(best.scores, scores)
  np.testing.assert_array_equal(best.index, scores.argmax(-1))
  rows = np.arange(len(scores)) * N + scores.argmax(-1)
  for field in ("tokens", "lengths", "logq", "logp_ref", "logp_aligned", "kl_ref"):
    np.testing.assert_array_equal(getattr(best.samples, field),
                                  np.asarray(getattr(candidates, field))[rows], err_msg=field)


def test_best_of_n_keeps_the_highest_score(realigner):
  lam = np.array([0.5, 1.0, 2.0], np.float32)  # per prompt
  key = jax.random.PRNGKey(3)
  candidates = realigner.sample(PROMPTS, lam, key, num_decodes=N)  # what best_of_n draws
  seen = []

  def shortest(prompts, samples):
    seen.append(np.asarray(prompts))
    return -samples.lengths.astype(jnp.float32)

  implicit = np.float32(0.5) * (np.asarray(candidates.logp_aligned)
                                - np.asarray(candidates.logp_ref))
  for scorer, expected in [(dera.implicit_reward_scorer(beta=0.5), implicit),
                           (dera.mixture_weight_scorer(), candidates.log_weight),
                           (shortest, -np.asarray(candidates.lengths, np.float32))]:
    best = realigner.best_of_n(PROMPTS, N, scorer, key, lam=lam)
    _check_best(best, candidates, expected)
  np.testing.assert_array_equal(seen[0], np.repeat(PROMPTS, N, axis=0))
  # The choice is not trivially the first candidate, and beta does not change it.
  by_implicit = realigner.best_of_n(PROMPTS, N, dera.implicit_reward_scorer(beta=3.0), key,
                                    lam=lam)
  np.testing.assert_array_equal(by_implicit.index, implicit.reshape(-1, N).argmax(-1))
  assert np.any(np.asarray(by_implicit.index) != 0)
  # Tied scores keep the first candidate.
  tied = realigner.best_of_n(PROMPTS, N, lambda p, s: jnp.zeros(len(s.tokens)), key, lam=lam)
  np.testing.assert_array_equal(tied.index, 0)


def test_best_of_n_with_aad_candidates(realigner):
  key = jax.random.PRNGKey(4)
  candidates = realigner.sample(PROMPTS, rng=key, rule="aad", alpha=0.2, temperature=0.7,
                                num_decodes=N)
  best = realigner.best_of_n(PROMPTS, N, dera.implicit_reward_scorer(), key, rule="aad",
                             alpha=0.2, temperature=0.7)
  _check_best(best, candidates,
              np.asarray(candidates.logp_aligned) - np.asarray(candidates.logp_ref))
  assert best.samples.log_weight is None
  with pytest.raises(ValueError, match="mixture-weight scorer needs rule='dera'"):
    dera.mixture_weight_scorer()(PROMPTS, candidates)


def test_best_of_n_errors(realigner):
  key = jax.random.PRNGKey(0)
  scorer = dera.implicit_reward_scorer()
  for n in (0, -2, 2.5, True):
    with pytest.raises(ValueError, match=r"^best-of-N needs n >= 1 candidates per prompt"):
      realigner.best_of_n(PROMPTS, n, scorer, key, lam=1.0)
  with pytest.raises(ValueError, match=r"scorer returned shape \(3,\); expected \(12,\)"):
    realigner.best_of_n(PROMPTS, N, lambda p, s: jnp.zeros(3), key, lam=1.0)
  nan_at_one = lambda p, s: jnp.zeros(len(s.tokens)).at[1].set(jnp.nan)
  with pytest.raises(ValueError, match="scorer returned NaN for 1 of 12 candidates"):
    realigner.best_of_n(PROMPTS, N, nan_at_one, key, lam=1.0)
  with pytest.raises(ValueError, match="beta must be > 0"):
    dera.implicit_reward_scorer(beta=0.0)
  candidates = realigner.sample(PROMPTS, 1.0, key, num_decodes=N)
  with pytest.raises(ValueError, match="implicit-reward scorer needs one aligned model"):
    scorer(PROMPTS, candidates.replace(logp_aligned=None))
