"""PPO and policy gradient through the trainer on the smoke preset."""
import os
import shutil

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gin_runs
from deranj.models import loading
from deranj.training import objectives
from deranj.training import policy_gradient
from deranj.training import ppo
from deranj.training import rollouts
from deranj.training import trainer

PRESET = "configs/presets/smoke.gin"
PPO = ["configs/runs/ppo_length.gin", PRESET]
PG = ["configs/runs/pg_reward.gin", PRESET]
QUIET = ["train.eval_split = None"]
# Policy gradient on the length reward (pg_reward.gin optimises a reward model).
PG_LENGTH_REWARD = ["PolicyGradient.reward = @LengthReward()", "LengthReward.l_min = %L_MIN",
                    "LengthReward.l_max = %L_MAX"]


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
  """A short SFT run: enough for the policy to end responses with EOS at varied lengths."""
  model_dir = str(tmp_path_factory.mktemp("sft"))
  gin_runs.gin_train(["configs/runs/sft.gin", PRESET], model_dir,
                     ["SFT_STEPS = 150", "SFT_BATCH_SIZE = 8", "LOG_EVERY = 50",
                      "CHECKPOINT_EVERY = 150", *QUIET])
  return model_dir


@pytest.mark.slow
def test_ppo_raises_the_length_reward(sft_dir, tmp_path):
  _, text = gin_runs.gin_train(PPO, tmp_path, [
      f"INIT_CHECKPOINT = '{sft_dir}'", "PPO_STEPS = 50", "LOG_EVERY = 10",
      "CHECKPOINT_EVERY = 50", *QUIET])
  scores = gin_runs.logged(text, "objective/scores")
  assert len(scores) == 10  # every 5 steps: the trainer logs at least every 10% of a run
  # Rewards are 0 or -1: the mean over 80 responses rises by > 0.1 from the first ten
  # steps to the last ten.
  assert np.mean(scores[-2:]) > np.mean(scores[:2]) + 0.1, scores


@pytest.mark.slow
def test_ppo_resume_is_bit_identical(tmp_path):
  """The default run's PPO smoke: resumes bit-identically, logs TRL's metric names."""
  straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
  bindings = ["LOG_EVERY = 1", "CHECKPOINT_EVERY = 2", *QUIET]
  result, _ = gin_runs.gin_train(PPO, straight, ["PPO_STEPS = 4", *bindings])
  for key in ("objective/kl", "objective/entropy", "objective/scores",
              "objective/rlhf_reward", "policy/clipfrac", "policy/approxkl", "loss/policy",
              "loss/value"):
    assert np.isfinite(result["train"][key]), key
  gin_runs.gin_train(PPO, split, ["PPO_STEPS = 2", *bindings])
  shutil.rmtree(os.path.join(split, "model"))  # as if stopped after step 2
  _, text = gin_runs.gin_train(PPO, split, ["PPO_STEPS = 4", *bindings])
  assert "resumed from" in text
  a, b = gin_runs.exported_params(straight), gin_runs.exported_params(split)
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


class NanAfterReward(rollouts.LengthReward):
  """A length reward that returns NaN for every response of 5+ tokens."""

  def __call__(self, params, prompts, responses):
    scores = super().__call__(params, prompts, responses)
    return jnp.where((responses > 0).sum(-1) >= 5, jnp.nan, scores)


def test_nan_reward_stops_the_run_naming_step_and_source(tmp_path):
  gin.clear_config()
  model, _ = loading.load_model("tiny", dropout_rate=0.0)
  objective = ppo.PPO(model, NanAfterReward(8, 14), max_decode_len=8, num_epochs=1)
  with pytest.raises(trainer.TrainingDivergedError,
                     match=r"step 1: \d+ non-finite values in the reward"):
    trainer.train(model_dir=str(tmp_path), objective=objective, task="embedded_news",
                  num_steps=4, batch_size=4, inputs_length=32, targets_length=8,
                  init_checkpoint="tiny", log_every=2, eval_split=None)


@pytest.mark.slow
def test_policy_gradient_raises_the_length_reward(sft_dir, tmp_path):
  _, text = gin_runs.gin_train(PG, tmp_path, [
      f"INIT_CHECKPOINT = '{sft_dir}'", *PG_LENGTH_REWARD, "PG_STEPS = 40", "LOG_EVERY = 1",
      "CHECKPOINT_EVERY = 40", *QUIET])
  # One step's 16 samples read the reward to about +-0.1; means over 10 steps to +-0.03.
  scores = np.asarray(gin_runs.logged(text, "objective/scores"))
  assert len(scores) == 40, scores
  assert scores[-10:].mean() > scores[:10].mean() + 0.08, scores


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["ppo", "pg"])
def test_smaller_beta_ends_further_from_the_reference_with_more_reward(sft_dir, tmp_path,
                                                                       objective):
  """The property the paper rests on, at three KL strengths."""
  files = PPO if objective == "ppo" else PG
  steps = "PPO_STEPS" if objective == "ppo" else "PG_STEPS"
  extra = [] if objective == "ppo" else PG_LENGTH_REWARD
  final = {}
  for beta in (0.01, 0.1, 1.0):
    _, text = gin_runs.gin_train(files, tmp_path / f"beta{beta}", [
        f"INIT_CHECKPOINT = '{sft_dir}'", f"BETA = {beta}", f"{steps} = 60",
        "LOG_EVERY = 20", "CHECKPOINT_EVERY = 60", *extra, *QUIET,
        "train.derive_seed = False"])  # common random numbers: only beta differs
    # Means over the second half of the run (logged every 6 steps: 10% of 60).
    final[beta] = {k: np.mean(gin_runs.logged(text, k)[-5:])
                   for k in ("objective/kl", "objective/scores")}
  print({b: (m["objective/kl"], m["objective/scores"]) for b, m in final.items()})
  assert final[0.01]["objective/kl"] > final[0.1]["objective/kl"] > final[1.0]["objective/kl"]
  assert final[0.01]["objective/scores"] > final[1.0]["objective/scores"]


def test_unreachable_length_reward_is_refused_with_its_numbers(tmp_path):
  with pytest.raises(ValueError, match=r"LengthReward wants 40\.\.50 tokens .* "
                                       r"max_decode_len=24"):
    gin_runs.gin_train(PG, tmp_path, ["PolicyGradient.reward = @LengthReward()", *QUIET])
  model, _ = loading.load_model("tiny", dropout_rate=0.0)
  ppo.PPO(model, rollouts.LengthReward(24, 30), max_decode_len=24)  # reachable: accepted


@pytest.mark.parametrize("files,owner", [(PPO, "PPO"), (PG, "PolicyGradient")])
def test_temperature_other_than_one_is_refused_naming_the_binding(tmp_path, files, owner):
  """Rollouts at T != 1 would be scored as if drawn from pi_theta: refused, not ignored."""
  extra = [] if owner == "PPO" else PG_LENGTH_REWARD
  with pytest.raises(objectives.ObjectiveError,
                     match=rf"{owner}\.temperature=0\.7: .* remove the binding "
                           rf"{owner}\.temperature\."):
    gin_runs.gin_train(files, tmp_path, [f"{owner}.temperature = 0.7", *extra, *QUIET])
  model, _ = loading.load_model("tiny", dropout_rate=0.0)
  ppo.PPO(model, rollouts.LengthReward(8, 14), max_decode_len=24, temperature=1.0)  # accepted


@pytest.mark.parametrize("owner", ["PPO", "PolicyGradient"])
def test_evaluation_logs_the_kl_to_the_optimum(owner):
  """With a constant reward pi*(beta) = pi_ref: the estimate is 0 for the reference and
  positive for any other policy; S samples per prompt, at least 2."""
  model, base = loading.load_model("tiny", dropout_rate=0.0)
  cls = ppo.PPO if owner == "PPO" else policy_gradient.PolicyGradient
  constant = rollouts.LengthReward(0, 8)  # every response of <= 8 tokens scores 0
  objective = cls(model, constant, max_decode_len=8, eval_num_samples=4)
  with pytest.raises(objectives.ObjectiveError, match=rf"{owner}\.eval_num_samples=1: "):
    cls(model, constant, max_decode_len=8, eval_num_samples=1)
  frozen = objective.frozen_params(base)
  prompts = {"prompts": jnp.asarray([[5, 6, 7, 1], [8, 9, 1, 0], [10, 1, 0, 0]], jnp.int32)}
  leaves, tree = jax.tree_util.tree_flatten(base)
  keys = jax.random.split(jax.random.PRNGKey(0), len(leaves))
  moved = jax.tree_util.tree_unflatten(tree, [
      x + 0.5 * jnp.std(x) * jax.random.normal(k, x.shape, x.dtype)
      for x, k in zip(leaves, keys)])
  step = jax.jit(objective.eval_step)
  got = {}
  for name, policy in (("reference", base), ("moved", moved)):
    params = objective.init_params(jax.random.PRNGKey(1), policy)
    got[name] = step(params, frozen, prompts, jax.random.PRNGKey(2))
  assert abs(float(got["reference"]["objective/kl_to_optimum"])) < 1e-6
  assert float(got["moved"]["objective/kl_to_optimum"]) > 1e-3
  assert float(got["moved"]["objective/kl"]) > 1e-3


def test_samples_share_their_prompts_encoding_with_the_same_log_probs():
  """A rollout's N samples per prompt are scored with one encoding per prompt: the same
  log-probabilities and gradients as encoding each repeated prompt."""
  from deranj.models import base
  from deranj.models import build
  import numerics
  import tiny_models
  model = base.EncoderDecoderModel(build.network(build.T5Config(
      vocab_size=32, d_model=16, d_kv=4, d_ff=32, num_heads=2, num_layers=2)))
  params = tiny_models.random_params(model, 0)
  rng = np.random.default_rng(0)
  prompts = jnp.asarray(rng.integers(2, 32, (3, 7)), jnp.int32).at[1, 5:].set(0)
  responses = jnp.asarray(rng.integers(1, 32, (6, 5)), jnp.int32).at[2, 3:].set(0)
  rollout = rollouts.Rollout(prompts=jnp.repeat(prompts, 2, axis=0), responses=responses,
                             mask=(responses > 0).astype(jnp.float32), num_samples=2)
  np.testing.assert_array_equal(rollout.unique_prompts, prompts)

  def total(p, shared):
    ro = rollout if shared else rollout.replace(num_samples=1)
    return rollouts.token_logprobs(model, p, ro)[0].sum()
  # Compiled: run op by op, the model's hundreds of small ops each compile on their own.
  value_and_grad = jax.jit(jax.value_and_grad(total), static_argnums=1)
  shared, g_shared = value_and_grad(params, True)
  repeated, g_repeated = value_and_grad(params, False)
  numerics.assert_close_f32(shared, repeated, terms=6 * 5 * 32)
  for a, b in zip(jax.tree_util.tree_leaves(g_shared), jax.tree_util.tree_leaves(g_repeated)):
    numerics.assert_close_f32(a, b, terms=6 * 5 * 32, scale=np.abs(b).max() + 1e-3)
  with pytest.raises(ValueError, match="do not split evenly"):
    model.token_logprobs(params, prompts[:2], responses[:5])
