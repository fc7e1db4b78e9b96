"""PolicyGradient's loss is an unbiased estimate of -grad [E r - beta KL(pi || pi_ref)]: in a
closed world (vocabulary = PAD, EOS and 4 content ids, responses of at most 3 tokens, every
one enumerated) the expectation of the loss's gradient over every pair of samples per
prompt, weighted by their probabilities, is the exact gradient, for both KL estimators."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deranj import exact
from deranj.models import base
from deranj.models import build
from deranj.training import losses
from deranj.training import objectives
from deranj.training import policy_gradient
from deranj.training import rollouts

CONTENT = (2, 3, 4, 5)
L = 3
BETA = 0.7
CFG = build.T5Config(vocab_size=6, d_model=16, d_kv=8, d_ff=32, num_heads=2, num_layers=1,
                     dropout_rate=0.0)
TOL = 1e-4  # relative to the norm; float32 sums over ~15k weighted pairs (3e-6 here)


@pytest.fixture(scope="module")
def setup():
  world = exact.make_world(2, CONTENT, L, seed=3, allow_truncated=True)
  model = base.EncoderDecoderModel(build.network(CFG))
  params = model.init_params(jax.random.PRNGKey(0))
  # Sharp, with much mass on PAD (never sampled): the loss must be about the sampler's pi.
  params = jax.tree_util.tree_map(lambda x: 2.0 * x, params)
  ref = jax.tree_util.tree_map(lambda x: 0.5 * x, params)
  rewards = np.random.default_rng(0).standard_normal(
      (len(world.prompts), len(world.responses))).astype(np.float32)
  return world, model, params, ref, rewards


def _table(model, params, world):
  """log pi(y | x) of every (prompt, response), PAD excluded: [P, N], differentiable."""
  p, n = len(world.prompts), len(world.responses)
  enc = jnp.asarray(np.repeat(world.prompts, n, axis=0))
  tgt = jnp.asarray(np.tile(world.responses, (p, 1)))
  return exact._scores(model, params, enc, tgt, True).reshape(p, n)  # pylint: disable=protected-access


def _exact_gradient(setup):
  world, model, params, ref, rewards = setup
  logq = jax.lax.stop_gradient(_table(model, ref, world))

  def objective(params):
    logp = _table(model, params, world)
    probs = jnp.exp(logp)
    return jnp.mean(jnp.sum(probs * (rewards - BETA * (logp - logq)), axis=1))

  return jax.jit(jax.grad(objective))(params)


def _pair_batches(setup):
  """Every ordered pair of responses per prompt as a 2-sample batch, and its probability."""
  world, model, params, ref, rewards = setup
  p, n = len(world.prompts), len(world.responses)
  probs = np.exp(np.asarray(_table(model, params, world), np.float64))
  np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)  # the world is pi's support
  ref_table = np.asarray(_table(model, ref, world))
  i, j = (x.ravel() for x in np.meshgrid(np.arange(n), np.arange(n), indexing="ij"))
  rows = np.stack([i, j], axis=1)  # [n * n, 2]
  batches, weights = [], []
  for q in range(p):
    responses = world.responses[rows]  # [n * n, 2, L]
    batches.append({
        "prompts": np.broadcast_to(world.prompts[q], (n * n, 2, world.prompts.shape[1])),
        "responses": responses,
        "loss_weights": (responses != 0).astype(np.float32),
        "scores": rewards[q][rows],
        "ref_logp": ref_table[q][rows]})
    weights.append(probs[q, i] * probs[q, j] / p)
  batch = {k: jnp.asarray(np.concatenate([b[k] for b in batches])) for k in batches[0]}
  return batch, jnp.asarray(np.concatenate(weights), jnp.float32)


def _expected_loss_gradient(setup, loss_fn):
  _, _, params, _, _ = setup
  batch, weights = _pair_batches(setup)

  expected_loss = lambda p: jnp.sum(weights * jax.vmap(lambda b: loss_fn(p, b))(batch))
  return jax.jit(jax.grad(expected_loss))(params)


def _relative_error(got, want):
  flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(t)])
  got, want = flat(got), flat(want)
  return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def _objective(setup, kl_estimator):
  _, model, _, ref, _ = setup
  pg = policy_gradient.PolicyGradient(model, exact.GoldReward(CONTENT), beta=BETA,
                                      num_samples=2, max_decode_len=L,
                                      kl_estimator=kl_estimator)
  frozen = {"ref": ref, "reward": {}}
  return lambda params, batch: pg.loss(params, frozen, batch, None)[0]


@pytest.mark.parametrize("kl_estimator", policy_gradient.KL_ESTIMATORS)
def test_expected_gradient_is_the_exact_gradient(setup, kl_estimator):
  want = jax.tree_util.tree_map(lambda g: -g, _exact_gradient(setup))
  got = _expected_loss_gradient(setup, _objective(setup, kl_estimator))
  assert _relative_error(got, want) < TOL


def test_the_check_tells_a_biased_kl_gradient(setup):
  """Dropping the KL-to-go term (only the per-token KLs' own gradient, a common shortcut)
  is biased: the same check fails by far more than its tolerance."""
  _, model, _, ref, _ = setup

  def shortcut(params, batch):
    ro = rollouts.Rollout.from_batch(batch, num_samples=2, pad_id=0)
    logp, logits = rollouts.token_logprobs(model, params, ro)
    _, ref_logits = rollouts.token_logprobs(model, ref, ro)
    reward_loss, _ = losses.policy_gradient_loss(logp.sum(-1), batch["scores"], 2)
    return reward_loss + BETA * jnp.mean(jnp.sum(losses.token_kl(logits, ref_logits,
                                                                 ro.mask), -1))

  want = jax.tree_util.tree_map(lambda g: -g, _exact_gradient(setup))
  assert _relative_error(_expected_loss_gradient(setup, shortcut), want) > 30 * TOL


def test_the_check_tells_log_probs_with_pad_in_the_softmax(setup, monkeypatch):
  """The fixture's model puts mass on PAD, so log-probabilities of the model's own softmax
  (PAD included, never sampled) are not the sampled policy's: the check fails."""
  monkeypatch.setattr(rollouts, "token_logprobs", lambda model, params, ro: (
      model.token_logprobs(params, ro.unique_prompts, ro.responses)))
  want = jax.tree_util.tree_map(lambda g: -g, _exact_gradient(setup))
  got = _expected_loss_gradient(setup, _objective(setup, "sampled"))
  assert _relative_error(got, want) > 30 * TOL


def test_kl_penalty_loss_against_hand_values():
  """Two samples of one prompt, two positions: the surrogate and its KL-to-go baseline."""
  logp = jnp.array([[-0.5, -1.0], [-2.0, -0.1]])
  k = jnp.array([[0.3, 0.2], [0.1, 0.4]])
  mask = jnp.array([[1.0, 1.0], [1.0, 0.0]])
  surrogate, kl = losses.kl_penalty_loss(logp, k, mask, num_samples=2)
  # k masked: [[.3, .2], [.1, 0]]; KL to go: [[.2, 0], [0, 0]]; leave-one-out
  # baselines: [[0, 0], [.2, 0]]; advantages [[.2, 0], [-.2, 0]].
  np.testing.assert_allclose(kl, [0.5, 0.1], rtol=1e-6)
  np.testing.assert_allclose(surrogate, [0.5 + (-0.5 * 0.2), 0.1 + (-2.0 * -0.2)], rtol=1e-6)
  g = jax.grad(lambda x: jnp.sum(losses.kl_penalty_loss(x, k, mask, 2)[0]))(logp)
  np.testing.assert_allclose(g, [[0.2, 0.0], [-0.2, 0.0]], rtol=1e-6, atol=1e-7)


def test_token_kl_against_numpy():
  rng = np.random.default_rng(1)
  a, b = rng.standard_normal((2, 3, 2, 7)) * 3
  mask = np.array([[1, 1], [1, 0], [0, 0]], np.float32)
  got = losses.token_kl(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), mask)
  lp = a - np.log(np.exp(a).sum(-1, keepdims=True))
  lq = b - np.log(np.exp(b).sum(-1, keepdims=True))
  want = (np.exp(lp) * (lp - lq)).sum(-1) * mask
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(lp).max())


def test_unknown_kl_estimator_is_refused():
  model = base.EncoderDecoderModel(build.network(CFG))
  with pytest.raises(objectives.ObjectiveError, match="kl_estimator='exact'"):
    policy_gradient.PolicyGradient(model, exact.GoldReward(CONTENT), num_samples=2,
                                   max_decode_len=L, kl_estimator="exact")
