"""Reward-weighted maximum likelihood: the pool's weights, the resampling, the loss, the
pool file, and a run through the trainer."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gin_runs
import numerics
import tiny_models
from deranj.models import base
from deranj.models import build
from deranj.training import objectives
from deranj.training import reward_weighted
from deranj.training import rollouts

RW = reward_weighted


@pytest.fixture(scope="module")
def tiny():
  model = base.EncoderDecoderModel(build.network(build.T5Config(
      vocab_size=32, d_model=16, d_kv=4, d_ff=32, num_heads=2, num_layers=2)))
  return model, tiny_models.random_params(model, 0)


def make(model, **kw):
  kw = {"beta": 0.5, "num_candidates": 4, "max_decode_len": 6, **kw}
  return RW.RewardWeightedLikelihood(model, rollouts.LengthReward(2, 3), **kw)


PROMPTS = np.array([[5, 6, 7, 1], [8, 9, 1, 0], [10, 1, 0, 0]], np.int32)


def test_pool_weights_match_the_hand_computed_softmax():
  scores = np.array([[0.0, -1.0, -1.0, -1.0], [-1.0, -1.0, -1.0, -1.0]])
  log_w, ess = RW.pool_weights(scores, beta=0.5)
  w0 = 1.0 / (1.0 + 3.0 * np.exp(-2.0))  # exp(0 / 0.5) against three exp(-1 / 0.5)
  w = np.exp(log_w)
  np.testing.assert_allclose(w[0], [w0] + [(1 - w0) / 3] * 3, rtol=1e-12)
  np.testing.assert_allclose(w[1], [0.25] * 4, rtol=1e-12)
  np.testing.assert_allclose(ess, [1.0 / (w0 ** 2 + 3 * ((1 - w0) / 3) ** 2), 4.0], rtol=1e-12)
  # Large scores over a small beta do not overflow.
  log_w, ess = RW.pool_weights(np.array([[1000.0, 0.0]]), beta=1e-3)
  assert np.isfinite(log_w[0, 0]) and ess[0] == pytest.approx(1.0)


def test_resampling_draws_candidates_by_their_weights(tiny):
  model, _ = tiny
  k = 4000
  objective = make(model, num_resampled=k, estimator="resampled")
  candidates = np.arange(1, 1 + 2 * 4 * 6).reshape(2, 4, 6).astype(np.int32)
  weights = np.array([[0.75, 0.25, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
  with np.errstate(divide="ignore"):
    batch = {"prompts": jnp.asarray(PROMPTS[:2]), RW.CANDIDATES: jnp.asarray(candidates),
             RW.LOG_WEIGHTS: jnp.asarray(np.log(weights), jnp.float32)}
  rollout = objective.resample(batch, jax.random.PRNGKey(0))
  responses = np.asarray(rollout.responses).reshape(2, k, 6)
  assert rollout.num_samples == k and rollout.prompts.shape == (2 * k, 4)
  np.testing.assert_array_equal(np.asarray(rollout.unique_prompts), PROMPTS[:2])
  picked = (responses[:, :, None, :] == candidates[:, None, :, :]).all(-1)  # [2, k, 4]
  assert (picked.sum(-1) == 1).all()  # every row is one of its own prompt's candidates
  share = picked.mean(1)
  assert share[0, 2] == share[0, 3] == 0 and share[1, 3] == 1
  sd = np.sqrt(0.75 * 0.25 / k)
  assert abs(share[0, 0] - 0.75) < 5 * sd, share


def _loss_batch():
  rng = np.random.default_rng(1)
  candidates = rng.integers(2, 32, (3, 4, 6)).astype(np.int32)
  candidates[:, :, 4] = 1  # EOS, then PAD
  candidates[:, :, 5] = 0
  log_w = np.log(rng.dirichlet(np.ones(4), 3)).astype(np.float32)
  return {"prompts": jnp.asarray(PROMPTS), RW.CANDIDATES: jnp.asarray(candidates),
          RW.LOG_WEIGHTS: jnp.asarray(log_w), RW.TARGET_ESS: jnp.ones(3, jnp.float32)}


def test_resampled_loss_is_the_negative_mean_log_likelihood_of_the_drawn_responses(tiny):
  model, params = tiny
  objective = make(model, num_resampled=3, estimator="resampled")
  batch, key = _loss_batch(), jax.random.PRNGKey(3)
  loss, metrics = jax.jit(objective.loss)(params, {}, batch, key)
  drawn = objective.resample(batch, key)
  # Each drawn response scored alone, its prompt encoded per row.
  logp, _ = rollouts.token_logprobs(model, params, drawn.replace(num_samples=1))
  expected = -np.mean(np.asarray(logp, np.float64).sum(-1))
  numerics.assert_close_f32(loss, expected, terms=9 * 5)
  assert float(metrics["response/length"]) == pytest.approx(4.0)


def test_control_variate_loss_matches_its_formula_on_the_subsampled_candidates(tiny):
  """-sum_k (M w_k - 1) / K log pi(y_k) + 1/K sum_k sum_t KL(pi_ref || pi), per prompt, from
  float64 NumPy on the same candidates; distinct candidates, their own weights."""
  model, params = tiny
  ref = tiny_models.random_params(model, 1)
  objective = make(model, num_resampled=2)
  batch, key = _loss_batch(), jax.random.PRNGKey(4)
  loss, metrics = jax.jit(objective.loss)(params, {"ref": ref}, batch, key)
  drawn, w = objective.subsample(batch, key)
  responses = np.asarray(drawn.responses).reshape(3, 2, 6)
  cands, log_w = np.asarray(batch[RW.CANDIDATES]), np.asarray(batch[RW.LOG_WEIGHTS])
  for i in range(3):
    idx = [int(np.flatnonzero((cands[i] == r).all(-1))[0]) for r in responses[i]]
    assert len(set(idx)) == 2  # without replacement
    np.testing.assert_allclose(np.asarray(w[i]), np.exp(log_w[i, idx]), rtol=1e-6)
  one = drawn.replace(num_samples=1)
  logp, logits = rollouts.token_logprobs(model, params, one)
  _, ref_logits = rollouts.token_logprobs(model, ref, one)
  lp = np.asarray(logits, np.float64)
  lp = lp - np.log(np.exp(lp - lp.max(-1, keepdims=True)).sum(-1, keepdims=True)) - lp.max(
      -1, keepdims=True)
  lq = np.asarray(ref_logits, np.float64)
  lq = lq - np.log(np.exp(lq - lq.max(-1, keepdims=True)).sum(-1, keepdims=True)) - lq.max(
      -1, keepdims=True)
  kl = (np.exp(lq) * (lq - lp)).sum(-1) * np.asarray(drawn.mask)  # [6, T]
  seq = np.asarray(logp, np.float64).sum(-1)
  coef = (4 * np.asarray(w, np.float64).reshape(6) - 1) / 2
  expected = np.sum(-coef * seq + kl.sum(-1) / 2) / 3
  numerics.assert_close_f32(loss, expected, terms=6 * 5 * 32,
                            scale=np.abs(coef * seq).sum() + kl.sum())
  numerics.assert_close_f32(metrics["objective/kl_ref_to_policy"], kl.sum(-1).mean(),
                            terms=5 * 32)
  # At the reference itself the KL term is 0 and flat weights give a zero loss.
  flat = {**batch, RW.LOG_WEIGHTS: jnp.full((3, 4), -np.log(4.0), jnp.float32)}
  zero, m = jax.jit(objective.loss)(ref, {"ref": ref}, flat, key)
  assert abs(float(zero)) < 1e-4 and abs(float(m["objective/kl_ref_to_policy"])) < 1e-5


def test_pool_file_is_written_once_reused_and_refused_when_it_does_not_match(tiny, tmp_path,
                                                                             monkeypatch):
  model, params = tiny
  path = str(tmp_path / "pool.npz")
  objective = make(model, candidates_file=path)
  frozen = objective.frozen_params(params)
  features = {"prompts": PROMPTS}
  first = objective.prepare_features(features, frozen, batch_size=2)
  assert os.path.exists(path)
  n, m, t = first[RW.CANDIDATES].shape
  assert (n, m, t) == (3, 4, 6)
  np.testing.assert_allclose(np.exp(first[RW.LOG_WEIGHTS]).sum(1), 1.0, rtol=1e-6)
  assert (first[RW.TARGET_ESS] >= 1 - 1e-6).all() and (first[RW.TARGET_ESS] <= 4 + 1e-5).all()
  lengths = (first[RW.CANDIDATES] != 0).sum(-1) - 1  # EOS excluded
  scores = np.where((lengths >= 2) & (lengths <= 3), 0.0, -1.0)
  np.testing.assert_allclose(first[RW.LOG_WEIGHTS], RW.pool_weights(scores, 0.5)[0], rtol=1e-6)

  def no_sampling(*args):
    raise AssertionError("sampled again instead of reading the pool file")
  monkeypatch.setattr(RW.RewardWeightedLikelihood, "_sample_pool", no_sampling)
  again = make(model, candidates_file=path, beta=0.1).prepare_features(features, frozen, 2)
  np.testing.assert_array_equal(again[RW.CANDIDATES], first[RW.CANDIDATES])
  for kw, what in [({"candidates_seed": 1}, "seed"), ({"max_decode_len": 5}, "max_decode_len"),
                   ({"num_candidates": 3}, "num_candidates")]:
    with pytest.raises(objectives.ObjectiveError, match=f"written for other {what}"):
      make(model, candidates_file=path, **kw).prepare_features(features, frozen, 2)
  with pytest.raises(objectives.ObjectiveError, match="written for other prompts"):
    objective.prepare_features({"prompts": PROMPTS[:2]}, frozen, 2)
  other = jax.tree_util.tree_map(lambda x: x * 1.01, frozen)
  with pytest.raises(objectives.ObjectiveError, match="written for other reference model"):
    objective.prepare_features(features, other, 2)
  np.savez(tmp_path / "other.npz", x=np.zeros(2))
  with pytest.raises(objectives.ObjectiveError, match="not a pool file"):
    make(model, candidates_file=str(tmp_path / "other.npz")).prepare_features(features,
                                                                              frozen, 2)


def test_bad_settings_are_refused_naming_the_binding(tiny):
  model, _ = tiny
  with pytest.raises(objectives.ObjectiveError, match="num_candidates=1"):
    make(model, num_candidates=1)
  with pytest.raises(objectives.ObjectiveError, match="num_resampled=0"):
    make(model, num_resampled=0)
  with pytest.raises(objectives.ObjectiveError, match="num_resampled=5"):
    make(model, num_resampled=5)  # 4 candidates to draw from without replacement
  make(model, num_resampled=5, estimator="resampled")  # with replacement: any number
  with pytest.raises(objectives.ObjectiveError, match="estimator='sir'"):
    make(model, estimator="sir")
  with pytest.raises(objectives.ObjectiveError, match="beta=0"):
    make(model, beta=0)


def test_run_through_the_trainer_shares_one_pool_and_evaluates_like_policy_gradient(tmp_path):
  """rwl_length.gin on the smoke preset from the shipped tiny T5: two runs at two betas,
  the second reading the first's pool file."""
  pool = tmp_path / "pool.npz"
  outs = []
  for beta in (1.0, 0.1):
    result, text = gin_runs.gin_train(
        ["configs/runs/rwl_length.gin", "configs/presets/smoke.gin"], tmp_path / f"b{beta}",
        ["INIT_CHECKPOINT = 'tiny'", f"BETA = {beta}", "RWL_LENGTH_STEPS = 2",
         "LOG_EVERY = 1", "CHECKPOINT_EVERY = 2", f"RWL_CANDIDATES_FILE = '{pool}'",
         "train.max_train_examples = 8", "train.eval_examples = 4"])
    outs.append(result)
    assert np.isfinite(result["train"]["loss"])  # a surrogate: either sign
    # Two small steps from the reference: a KL of 0 up to float32 rounding.
    assert result["train"]["objective/kl_ref_to_policy"] > -1e-5
    for key in ("objective/scores", "objective/kl", "objective/kl_to_optimum"):
      assert np.isfinite(result["eval"][key]), key
    assert os.path.exists(tmp_path / f"b{beta}" / "model")
  assert pool.exists()
  # Same pool, weights sharper at the smaller beta.
  assert outs[1]["train"]["objective/target_ess"] <= outs[0]["train"]["objective/target_ess"]
