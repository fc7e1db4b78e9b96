"""Decoder-only models through the trainer from gin (configs/models/llama_tiny.gin on the
smoke preset): SFT from random weights, then a reward model, PPO, policy gradient and DPO
started from it; each run's export reloads as the model it trained."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gin_runs
from deranj import decoding
from deranj.models import base
from deranj.models import decoder
from deranj.models import loading
from deranj.training import checkpoints
from deranj.training import reward_model

LLAMA = "configs/models/llama_tiny.gin"
PRESET = "configs/presets/smoke.gin"
SFT_EXAMPLES = 4  # = SFT_BATCH_SIZE of the smoke preset: every step sees the same batch


def files(run):
  return [f"configs/runs/{run}.gin", PRESET, LLAMA]


def exported(model_dir):
  return loading.load_model(os.path.join(model_dir, checkpoints.MODEL_EXPORT_DIR))


def assert_same_tree(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
  """SFT of the random-init tiny Llama on one repeated batch: (MODEL_DIR, result, log)."""
  model_dir = str(tmp_path_factory.mktemp("llama_sft"))
  result, text = gin_runs.gin_train(files("sft"), model_dir, [
      f"train.max_train_examples = {SFT_EXAMPLES}", "LOG_EVERY = 1", "EVAL_EXAMPLES = 4"])
  return model_dir, result, text


def test_sft_lowers_the_loss_of_a_repeated_batch_and_exports(sft_run):
  model_dir, result, text = sft_run
  assert "[setup] initialised from" not in text  # random init: INIT_CHECKPOINT = None
  losses = gin_runs.logged(text, "loss")
  assert len(losses) == 8 and np.all(np.isfinite(losses))
  assert abs(losses[0] - np.log(4096)) < 1.0, losses  # a random model: near uniform
  assert losses[-1] < losses[0] - 1.0, losses
  assert np.isfinite(gin_runs.logged(text, "rouge1", kind="[eval]")[-1])  # greedy decodes

  model, params = exported(model_dir)
  assert isinstance(model, base.DecoderOnlyModel) and model.pad_id == 0
  assert model.config == decoder.DecoderConfig(
      vocab_size=4096, hidden_size=64, intermediate_size=192, num_layers=2, num_heads=4,
      num_kv_heads=2, head_dim=16, tie_word_embeddings=True, max_position_embeddings=512)
  assert_same_tree(params, jax.device_get(result["state"].params))
  # The reloaded model samples; PAD (0) only after EOS.
  prompts = jnp.array([[5, 6, 7, 1, 0, 0], [9, 1, 0, 0, 0, 0]], jnp.int32)  # right-padded
  out = decoding.sample(model, params, prompts, jax.random.PRNGKey(0), max_decode_len=6)
  for row, n in zip(np.asarray(out.tokens), np.asarray(out.lengths)):
    assert np.all(row[:n] != 0) and np.all(row[n:] == 0)


def test_save_model_needs_the_wrapper_of_a_decoder_config(tmp_path, sft_run):
  model, params = exported(sft_run[0])
  with pytest.raises(TypeError, match="as its DecoderOnlyModel"):
    loading.save_model(str(tmp_path / "bare"), model.config, params)
  again = base.DecoderOnlyModel(model.module, pad_id=base.NO_PAD)
  loading.save_model(str(tmp_path / "no_pad"), again, params, note="x")
  reloaded, reloaded_params = loading.load_model(str(tmp_path / "no_pad"))
  assert reloaded.pad_id == base.NO_PAD and reloaded.config == model.config
  assert loading.read_metadata(str(tmp_path / "no_pad")) == {"note": "x"}
  assert_same_tree(reloaded_params, params)


@pytest.fixture(scope="module")
def rm_run(tmp_path_factory, sft_run):
  model_dir = str(tmp_path_factory.mktemp("llama_rm"))
  result, text = gin_runs.gin_train(files("reward_model"), model_dir,
                                    [f"INIT_CHECKPOINT = '{sft_run[0]}'"])
  return model_dir, result, text


def test_reward_model_trains_from_the_sft_run_and_reloads(rm_run, sft_run):
  model_dir, result, text = rm_run
  assert f"[setup] initialised from {sft_run[0]}" in text
  assert np.isfinite(result["train"]["loss"]) and np.isfinite(result["eval"]["loss"])
  rm, params = reward_model.load_reward_model(model_dir)
  assert isinstance(rm.backbone, base.DecoderOnlyModel) and rm.backbone.pooling == "last"
  assert_same_tree(params, jax.device_get(result["state"].params))
  # Its network is the SFT model's, trained: same tree, other values.
  _, sft_params = exported(sft_run[0])
  assert set(params) == set(sft_params) | {"head"}
  assert not np.array_equal(params["layers_0"]["mlp"]["up"]["kernel"],
                            sft_params["layers_0"]["mlp"]["up"]["kernel"])
  # The reward of a sequence is read at its last token: what follows it does not count,
  # what precedes it does.
  prompts = jnp.array([[5, 6, 7, 1], [5, 6, 7, 1]], jnp.int32)
  responses = jnp.array([[8, 9, 1, 0, 0], [8, 9, 1, 0, 0]], jnp.int32)
  rewards = jax.jit(rm.rewards)
  base_reward = rewards(params, prompts, responses)
  np.testing.assert_array_equal(base_reward[0], base_reward[1])
  after_eos = rewards(params, prompts, responses.at[1, 3:].set(jnp.array([11, 12])))
  np.testing.assert_array_equal(after_eos, base_reward)
  changed = rewards(params, prompts, responses.at[1, 0].set(10))
  assert changed[0] == base_reward[0] and changed[1] != base_reward[1]


def test_ppo_trains_a_value_head_on_the_decoder_hidden_states(tmp_path, sft_run):
  result, text = gin_runs.gin_train(files("ppo_length"), str(tmp_path), [
      f"INIT_CHECKPOINT = '{sft_run[0]}'", "PPO_STEPS = 4", "LOG_EVERY = 1"])
  for key in ("loss/policy", "loss/value", "objective/kl", "objective/entropy"):
    assert np.isfinite(result["train"][key]), key
  assert np.isfinite(result["eval"]["objective/kl_to_optimum"])
  params = jax.device_get(result["state"].params)
  assert np.any(params["value"]["head"]["kernel"] != 0)  # starts at zero
  model, exported_params = exported(str(tmp_path))
  assert isinstance(model, base.DecoderOnlyModel)
  assert_same_tree(exported_params, params["policy"])


def test_policy_gradient_with_the_decoder_only_reward_model(tmp_path, sft_run, rm_run):
  result, _ = gin_runs.gin_train(files("pg_reward"), str(tmp_path), [
      f"INIT_CHECKPOINT = '{sft_run[0]}'", f"REWARD_MODEL = '{rm_run[0]}'", "PG_STEPS = 4"])
  assert np.isfinite(result["train"]["loss"])
  assert np.isfinite(result["eval"]["objective/scores"])
  model, params = exported(str(tmp_path))
  assert isinstance(model, base.DecoderOnlyModel)
  assert_same_tree(params, jax.device_get(result["state"].params))


def test_dpo_from_the_sft_run(tmp_path, sft_run):
  result, text = gin_runs.gin_train(files("dpo"), str(tmp_path), [
      f"INIT_CHECKPOINT = '{sft_run[0]}'", "DPO_STEPS = 4", "LOG_EVERY = 1"])
  # Step 1's policy is the reference: implicit rewards 0, loss log 2 (printed to 4
  # decimals).
  assert abs(gin_runs.logged(text, "loss")[0] - np.log(2)) <= 5e-5
  assert gin_runs.logged(text, "rewards/margins")[0] == 0
  assert np.isfinite(result["eval"]["rewards/margins"])
  model, params = exported(str(tmp_path))
  assert isinstance(model, base.DecoderOnlyModel) and model.pad_id == 0
  assert_same_tree(params, jax.device_get(result["state"].params))


@pytest.mark.slow
def test_figure7_smoke_run_with_the_decoder_only_model(tmp_path, capsys):
  """experiments/fig7_dpo.py end to end on the smoke preset with --model_gin: every run
  (SFT, gold reward model, DPO at β and β/λ) trains the tiny Llama, and the figure's
  checks hold as for T5."""
  import test_experiments  # pylint: disable=g-import-not-at-top
  from experiments import fig7_dpo  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path)
  result = fig7_dpo.main(["--preset", "smoke", "--workdir", workdir, "--model_gin", LLAMA])
  test_experiments._check(result, workdir, "7", [0.5, 1.0, 2.0], capsys.readouterr().out)
  for run in ("sft", "dpo_beta0.1", "dpo_beta0.05", "dpo_beta0.2"):
    assert isinstance(exported(os.path.join(workdir, run))[0], base.DecoderOnlyModel), run
  gold, _ = reward_model.load_reward_model(os.path.join(workdir, "gold_rm"))
  assert isinstance(gold.backbone, base.DecoderOnlyModel)
