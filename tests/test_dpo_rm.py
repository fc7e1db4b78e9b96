"""DPO and reward-model objectives: losses against NumPy, precomputed references, short
smoke-preset runs through gin (DPO margins grow, the reward model beats chance on held-out
pairs), NaN reward stops, reward-model export and bit-identical DPO resumes."""
import functools
import json
import os
import re

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gin_runs
import numerics

from deranj.data import corpora
from deranj.data import files
from deranj.data import pipeline
from deranj.data import preferences
from deranj.data import tasks
from deranj.data import tokenizer
from deranj.models import loading
from deranj.training import checkpoints
from deranj.training import dpo
from deranj.training import losses
from deranj.training import objectives
from deranj.training import reward_model

DPO_FILES = ["configs/runs/dpo.gin", "configs/presets/smoke.gin"]
RM_FILES = ["configs/runs/reward_model.gin", "configs/presets/smoke.gin"]
# Short prompts and no evaluation: the DPO runs check training, not held-out metrics.
DPO_RUN = ["INPUTS_LENGTH = 32", "LOG_EVERY = 4", "CHECKPOINT_EVERY = 100",
           "train.eval_split = None"]
DPO_STEPS = 24
LENGTHS = {"inputs": 32, "targets": 16}


gin_train = gin_runs.gin_train


def logged(text, key):
  """The values of `key` on the [train] progress lines, in order."""
  return [float(m) for m in re.findall(rf"^\[train\].*?  {re.escape(key)} (\S+)", text, re.M)]


@pytest.fixture(scope="module")
def tiny():
  return loading.load_model("tiny")


def _perturbed(params, scale, seed):
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree_util.tree_unflatten(tree, [
      x + scale * jnp.std(x) * jax.random.normal(k, x.shape, x.dtype)
      for x, k in zip(leaves, keys)])


def _hand_made_batch():
  """Three pairs, ragged prompts and responses (tokens, EOS = 1, then PAD = 0)."""
  prompts = np.array([[12, 40, 7, 99, 1, 0], [5, 6, 1, 0, 0, 0], [300, 301, 302, 303, 304, 1]])
  chosen = np.array([[20, 21, 22, 1, 0], [30, 1, 0, 0, 0], [8, 9, 10, 11, 1]])
  rejected = np.array([[22, 21, 1, 0, 0], [31, 32, 33, 34, 1], [11, 1, 0, 0, 0]])
  batch = {"prompts": prompts}
  for side, targets in (("chosen", chosen), ("rejected", rejected)):
    batch[f"{side}_responses"] = targets
    batch[f"{side}_loss_weights"] = (targets > 0).astype(np.int32)
  return {k: jnp.asarray(v, jnp.int32) for k, v in batch.items()}


@functools.lru_cache(maxsize=None)
def _jitted_logits(model):
  return jax.jit(model.logits)


def _numpy_logps(model, params, batch, side):
  """score_batch's sum of target log-probs, in float64 NumPy from the logits: [B]."""
  half = dict(zip(pipeline.RESPONSE_FEATURES,
                  (batch[f"{side}_{k}"] for k in pipeline.RESPONSE_FEATURES)))
  half["prompts"] = batch["prompts"]
  logits = np.asarray(_jitted_logits(model)(params, half), np.float64)
  log_probs = logits - logits.max(-1, keepdims=True)
  log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
  targets = np.asarray(half["responses"])
  token_ll = np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
  weights = targets > 0
  return (token_ll * weights).sum(-1), weights.sum(-1)


# ----------------------------------------------------------------------------- scoring


def test_sequence_logprobs_is_the_one_scorer(tiny):
  """model.sequence_logprobs (prompts, responses) against float64 NumPy; score_batch,
  DPO's sequence_logps and token_logprobs are the same numbers bit for bit."""
  model, params = tiny
  batch = _hand_made_batch()
  prompts, chosen = batch["prompts"], batch["chosen_responses"]
  expected, lengths = _numpy_logps(model, params, batch, "chosen")
  got = np.asarray(jax.jit(model.sequence_logprobs)(params, prompts, chosen))
  # float32 sums of <= 5 terms of magnitude ~10: relative error a few float32 ulps.
  np.testing.assert_allclose(got, expected, rtol=5e-6)
  token_logp, logits = jax.jit(model.token_logprobs)(params, prompts, chosen)
  assert logits.shape == chosen.shape + (model.config.vocab_size,)
  token_logp = np.asarray(token_logp)
  assert np.all(token_logp[np.asarray(chosen) == 0] == 0.0)
  assert np.all(token_logp[np.asarray(chosen) > 0] < 0.0)
  np.testing.assert_array_equal(token_logp.sum(-1), got)
  half = pipeline.preference_halves(batch)[0]
  np.testing.assert_array_equal(np.asarray(jax.jit(model.score_batch)(params, half)), got)
  c, _, c_len, _ = jax.jit(functools.partial(dpo.sequence_logps, model))(params, batch)
  np.testing.assert_array_equal(np.asarray(c_len), lengths)
  np.testing.assert_allclose(np.asarray(c), got, rtol=1e-6)  # one [2B] batch vs [B]


# ----------------------------------------------------------------------------- data


def test_embedded_news_preferences_are_the_news_pairs_corrupted():
  for split in corpora.SPLITS:
    news = corpora.news_pairs(split)
    pairs = corpora.news_preference_pairs(split)
    assert [(p.prompt, p.chosen) for p in pairs] == [(n.document, n.summary) for n in news]
    for p in pairs:
      assert p.rejected != p.chosen and p.rejected == corpora.reverse_letters(p.chosen)
      assert corpora.reverse_letters(p.rejected) == p.chosen
  assert corpora.reverse_letters("Argentina's crisis, in 2001.") == "anitnegrA's sisirc, ni 1002."
  shuffled = corpora.news_preference_pairs("validation", "shuffle_words", seed=0)
  assert shuffled == corpora.news_preference_pairs("validation", "shuffle_words", seed=0)
  assert shuffled != corpora.news_preference_pairs("validation", "shuffle_words", seed=1)
  for p in shuffled:
    assert p.rejected != p.chosen and sorted(p.rejected.split()) == sorted(p.chosen.split())
  with pytest.raises(ValueError, match="corruption='typos'"):
    corpora.news_preference_pairs("train", "typos")


def test_sampled_pair_ids_come_back_unchanged_through_the_task(tmp_path):
  """Pairs keep the ids they were sampled as: ids that decoding and tokenising again
  would merge, and a response cut at the maximum length (no EOS) that re-tokenising
  would cut shorter and end with EOS."""
  sp = tokenizer.processor()
  split_the = [sp.piece_to_id(p) for p in ("\u2581t", "h", "e")]
  assert tokenizer.encode(tokenizer.decode(split_the)) != split_the  # the premise
  width = LENGTHS["targets"]
  chosen_row = split_the + [1] + [0] * (width - 4)  # a sampler's row: tokens, EOS, PAD
  cut_row = (tokenizer.encode("a long sentence about the weather") * width)[:width]
  prompt_row = tokenizer.encode("summarize: one document") + [1, 0, 0]
  pair = preferences.PreferencePair(
      "one document", tokenizer.decode(chosen_row), tokenizer.decode(cut_row),
      preferences.sampled_ids(prompt_row), preferences.sampled_ids(chosen_row),
      preferences.sampled_ids(cut_row))
  assert pair.chosen_ids == tuple(split_the) + (1,) and pair.rejected_ids == tuple(cut_row)
  features = {}
  text_pair = preferences.PreferencePair(pair.prompt, pair.chosen, pair.rejected)
  for name, pairs in (("with_ids", [pair, pair]), ("text_only", [text_pair, text_pair])):
    directory = tmp_path / name
    preferences.write_pairs(str(directory / "train.jsonl"), pairs)
    assert preferences.read_pairs(str(directory / "train.jsonl")) == pairs
    tasks.register_preference_pairs(f"pairs_{name}", str(directory))
    split = pipeline.load(f"pairs_{name}", "train", LENGTHS)
    assert split.texts["chosen"][0] == "the"  # the text stays, for humans
    features[name] = {k: v[0] for k, v in split.features.items()}
  got = features["with_ids"]
  pad = lambda ids, n: np.pad(ids, (0, n - len(ids)))  # noqa: E731
  np.testing.assert_array_equal(got["prompts"],
                                pad(prompt_row[:-2], LENGTHS["inputs"]))
  np.testing.assert_array_equal(got["chosen_responses"], chosen_row)
  np.testing.assert_array_equal(got["rejected_responses"], cut_row)
  assert got["rejected_loss_weights"].sum() == width  # no EOS added, none cut
  # Through the text the same pair would train on other ids.
  text = features["text_only"]
  assert not np.array_equal(text["chosen_responses"], chosen_row)
  assert text["rejected_responses"][width - 1] == 1  # cut, then EOS


def test_pair_ids_errors_name_file_and_line(tmp_path):
  path = tmp_path / "train.jsonl"
  with_ids = {"prompt": "p", "chosen": "c", "rejected": "r", "prompt_ids": [5, 1],
              "chosen_ids": [7, 1], "rejected_ids": [8, 9]}
  path.write_text(json.dumps(with_ids) + "\n" + json.dumps(
      {"prompt": "p", "chosen": "c", "rejected": "r"}) + "\n")
  with pytest.raises(files.DataError, match=re.escape(f"{path}:2: token ids on some records")):
    preferences.read_pairs(str(path))
  path.write_text(json.dumps({**with_ids, "chosen_ids": [7, 0, 1]}) + "\n")
  with pytest.raises(files.DataError, match=re.escape(f"{path}:1: field 'chosen_ids' should")):
    preferences.read_pairs(str(path))
  path.write_text(json.dumps({**with_ids, "prompt_ids": None}) + "\n")
  with pytest.raises(files.DataError, match=re.escape(f"{path}:1: field 'prompt_ids' should "
                                                      "be a list")):
    preferences.read_pairs(str(path))
  with pytest.raises(ValueError, match="give all of"):
    preferences.write_pairs(str(path), [preferences.PreferencePair("p", "c", "r", None, (7,))])


def test_embedded_news_preferences_task_reads_its_gin_setting():
  load = lambda: pipeline.load("embedded_news_preferences", "test", LENGTHS,  # noqa: E731
                               max_examples=4)
  reversed_split = load()
  assert reversed_split.texts["rejected"][0] == corpora.reverse_letters(
      reversed_split.texts["chosen"][0])
  try:
    with gin.unlock_config():
      gin.bind_parameter("embedded_news_preferences_settings.corruption", "shuffle_words")
    shuffled_split = load()
  finally:
    gin.clear_config()
  assert shuffled_split.texts["chosen"] == reversed_split.texts["chosen"]
  assert sorted(shuffled_split.texts["rejected"][0].split()) == sorted(
      shuffled_split.texts["chosen"][0].split())
  np.testing.assert_array_equal(shuffled_split.features["prompts"],
                                reversed_split.features["prompts"])


# ----------------------------------------------------------------------------- DPO


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_loss_matches_numpy(tiny, loss_type):
  model, params = tiny
  policy = _perturbed(params, 0.05, 0)  # policy != reference, so the loss is not log 2
  batch = _hand_made_batch()
  beta = 0.3
  objective = dpo.DPO(model, beta=beta, loss_type=loss_type)
  loss_fn = jax.jit(objective.loss)
  loss, metrics = loss_fn(policy, params, batch, None)

  pc, nc = _numpy_logps(model, policy, batch, "chosen")
  pr, nr = _numpy_logps(model, policy, batch, "rejected")
  rc, _ = _numpy_logps(model, params, batch, "chosen")
  rr, _ = _numpy_logps(model, params, batch, "rejected")
  chosen_half = pipeline.preference_halves(batch)[0]
  np.testing.assert_allclose(pc, jax.jit(model.score_batch)(policy, chosen_half), rtol=1e-5)
  if loss_type == "ipo":  # per-token means, as TRL feeds IPO
    pc, rc, pr, rr = pc / nc, rc / nc, pr / nr, rr / nr
  h = (pc - pr) - (rc - rr)
  if loss_type == "sigmoid":
    expected = np.mean(np.log1p(np.exp(-beta * h)))
  else:
    expected = np.mean((h - 1 / (2 * beta)) ** 2)
  chosen_rewards, rejected_rewards = beta * (pc - rc), beta * (pr - rr)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  # Implicit rewards are beta x differences of float32 sums over the target length:
  # rounded at the scale of the sums, not of their difference.
  terms = LENGTHS["targets"]
  numerics.assert_close_f32(metrics["rewards/chosen"], chosen_rewards.mean(), terms,
                            beta * np.mean(np.abs(pc) + np.abs(rc)))
  numerics.assert_close_f32(metrics["rewards/rejected"], rejected_rewards.mean(), terms,
                            beta * np.mean(np.abs(pr) + np.abs(rr)))
  numerics.assert_close_f32(metrics["rewards/margins"],
                            (chosen_rewards - rejected_rewards).mean(), terms,
                            beta * np.mean(np.abs(pc) + np.abs(rc) + np.abs(pr) + np.abs(rr)))
  np.testing.assert_allclose(metrics["rewards/accuracies"],
                             np.mean(chosen_rewards > rejected_rewards), rtol=1e-6)
  np.testing.assert_allclose(metrics["logps/chosen"], pc.mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["logps/rejected"], pr.mean(), rtol=1e-5)
  # At the reference itself every implicit reward is 0 and the DPO loss is log 2.
  if loss_type == "sigmoid":
    at_ref, metrics = loss_fn(params, params, batch, None)
    np.testing.assert_allclose(at_ref, np.log(2.0), rtol=1e-6)
    assert float(metrics["rewards/margins"]) == 0.0


def test_precomputed_reference_gives_the_same_loss(tiny):
  model, params = tiny
  policy = _perturbed(params, 0.05, 1)
  features = pipeline.load("embedded_news_preferences", "validation", LENGTHS,
                           max_examples=10, keep_texts=False).features
  per_batch = dpo.DPO(model)
  precomputed = dpo.DPO(model, precompute_reference=True)
  assert per_batch.prepare_features(features, params, 4) is features
  # 10 pairs in batches of 4: the last batch is padded, its padding dropped.
  extended = precomputed.prepare_features(features, params, 4)
  assert set(extended) == set(features) | set(dpo.REFERENCE_COLUMNS)
  assert all(extended[c].shape == (10,) and extended[c].dtype == np.float32
             for c in dpo.REFERENCE_COLUMNS)
  score = jax.jit(model.score_batch)
  for side, half in zip(pipeline.PREFERENCE_SIDES, pipeline.preference_halves(features)):
    np.testing.assert_allclose(extended[f"reference_{side}_logps"], score(params, half),
                               rtol=1e-5)

  # The loss reads the columns whenever a batch has them (the flag only adds them).
  rows = np.array([7, 2, 9, 0])
  loss_fn = jax.jit(precomputed.loss)
  loss_a, metrics_a = loss_fn(policy, params, {k: v[rows] for k, v in features.items()}, None)
  loss_b, metrics_b = loss_fn(policy, params, {k: v[rows] for k, v in extended.items()}, None)
  assert float(loss_a) != np.log(2.0)
  # The reference's float32 sums come from other batches: rewards, margins and the loss
  # (slope <= beta in h) round at beta x the summed log-probabilities' scale, which the
  # reference shares with the policy (a 5% perturbation of it).
  logps = abs(float(metrics_a["logps/chosen"])) + abs(float(metrics_a["logps/rejected"]))
  scale = {k: abs(float(metrics_a[k])) if k.startswith("logps/") else
           2 * precomputed.beta * logps for k in metrics_a}
  terms = LENGTHS["targets"]
  numerics.assert_close_f32(loss_b, loss_a, terms, 2 * precomputed.beta * logps)
  for key in metrics_a:
    numerics.assert_close_f32(metrics_b[key], metrics_a[key], terms, scale[key], key)


def test_bad_dpo_settings_name_the_binding(tiny):
  with pytest.raises(objectives.ObjectiveError, match="DPO.loss_type='hinge'"):
    dpo.DPO(tiny[0], loss_type="hinge")
  with pytest.raises(objectives.ObjectiveError, match="DPO.beta"):
    dpo.DPO(tiny[0], beta=0.0)


def test_dpo_refuses_a_summarization_task(tiny):
  with pytest.raises(objectives.ObjectiveError, match="chosen_responses"):
    dpo.DPO(tiny[0]).check_features({"prompts": 0, "responses": 0},
                                    "task 'embedded_news'")


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory):
  """DPO on the smoke preset, DPO_STEPS steps from the tiny T5 (standing in for SFT)."""
  model_dir = str(tmp_path_factory.mktemp("dpo"))
  result, text = gin_train(DPO_FILES, model_dir, [*DPO_RUN, f"DPO_STEPS = {DPO_STEPS}"])
  return model_dir, result, text


def test_dpo_raises_the_margins(dpo_run, tiny):
  model_dir, result, text = dpo_run
  margins = logged(text, "rewards/margins")
  assert len(margins) == DPO_STEPS // 2  # LOG_EVERY = 4, but at least every 10% of the run
  assert margins[-1] > margins[0] + 0.4 and margins[-1] > 0.5, margins
  assert set(result["train"]) >= {"loss", "rewards/chosen", "rewards/rejected",
                                  "rewards/margins", "rewards/accuracies", "logps/chosen",
                                  "logps/rejected"}
  assert result["train"]["rewards/accuracies"] >= 0.75
  # The exported model is the trained policy, a deranj model directory.
  _, exported = loading.load_model(os.path.join(model_dir, checkpoints.MODEL_EXPORT_DIR))
  jax.tree_util.tree_map(np.testing.assert_array_equal, exported,
                         jax.device_get(result["state"].params))


@pytest.mark.slow
def test_dpo_resume_is_bit_identical(dpo_run, tmp_path):
  """Half the steps, then all of them in the same MODEL_DIR == all at once."""
  model_dir = str(tmp_path / "resumed")
  gin_train(DPO_FILES, model_dir, [*DPO_RUN, f"DPO_STEPS = {DPO_STEPS // 2}"])
  result, text = gin_train(DPO_FILES, model_dir, [*DPO_RUN, f"DPO_STEPS = {DPO_STEPS}"])
  assert f"resumed from {model_dir}/checkpoints/{DPO_STEPS // 2}" in text
  jax.tree_util.tree_map(np.testing.assert_array_equal,
                         jax.device_get(result["state"].params),
                         jax.device_get(dpo_run[1]["state"].params))


def test_ipo_with_precomputed_reference_trains_and_evaluates(tmp_path):
  result, text = gin_train(DPO_FILES, str(tmp_path), [
      "INPUTS_LENGTH = 32", "DPO_STEPS = 4", "LOG_EVERY = 2", "CHECKPOINT_EVERY = 4",
      "EVAL_EXAMPLES = 8", "DPO.loss_type = 'ipo'", "DPO.precompute_reference = True"])
  assert all(np.isfinite(logged(text, "loss")))
  assert set(result["eval"]) >= {"loss", "rewards/margins", "rewards/accuracies",
                                 "logps/chosen", "logps/rejected"}
  # IPO's log-probs are per-token means: a few nats, not a sequence's sum.
  assert -15 < result["eval"]["logps/chosen"] < 0


# ----------------------------------------------------------------------------- reward model


@pytest.fixture(scope="module")
def rm_run(tmp_path_factory):
  """The reward model on the smoke preset: 60 steps, evaluated on all 42 held-out pairs."""
  model_dir = str(tmp_path_factory.mktemp("rm"))
  result, text = gin_train(RM_FILES, model_dir, [
      "INPUTS_LENGTH = 32", "RM_STEPS = 60", "LOG_EVERY = 20", "CHECKPOINT_EVERY = 60",
      "EVAL_EXAMPLES = 42"])
  return model_dir, result, text


def test_reward_model_beats_chance_on_held_out_pairs(rm_run):
  _, result, text = rm_run
  assert len(corpora.news_preference_pairs("validation")) == 42
  assert result["eval"]["accuracy"] >= 0.75, result["eval"]
  assert result["eval"]["loss"] < 0.5 * np.log(2.0), result["eval"]
  assert logged(text, "loss")[-1] < logged(text, "loss")[0]


def test_exported_reward_model_gives_the_same_rewards(rm_run):
  model_dir, result, _ = rm_run
  model, params = reward_model.load_reward_model(model_dir)  # the run dir finds model/
  rewards = jax.jit(model.rewards)  # one program for every call below
  trained = jax.device_get(result["state"].params)
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(params), trained)
  features = pipeline.load("embedded_news_preferences", "test", LENGTHS, max_examples=6,
                           keep_texts=False).features
  prompt = features["prompts"]
  for side in pipeline.PREFERENCE_SIDES:
    response = features[f"{side}_responses"]
    loaded = rewards(params, prompt, response)
    np.testing.assert_array_equal(loaded, rewards(trained, prompt, response))
  # The exported model ranks the held-out pairs as the run's evaluation did (one pair may
  # flip on float noise: the eval batches them differently).
  held_out = pipeline.load("embedded_news_preferences", "validation",
                           {"inputs": 32, "targets": 24}, keep_texts=False).features
  chosen, rejected = (np.asarray(rewards(
      params, held_out["prompts"], held_out[f"{side}_responses"]))
      for side in ("chosen", "rejected"))
  accuracy = float(losses.bradley_terry_loss(chosen, rejected)[1])
  assert len(chosen) == 42
  assert abs(accuracy - result["eval"]["accuracy"]) <= 1 / 42 + 1e-6, (accuracy, result["eval"])


def test_policy_directory_is_not_a_reward_model(dpo_run):
  with pytest.raises(loading.ModelLoadError, match="policy model, not a reward model"):
    reward_model.load_reward_model(dpo_run[0])


def test_nan_rewards_stop_evaluation_with_a_clear_message(tiny):
  model, params = tiny
  objective = reward_model.RewardModelObjective(model)
  rm_params = objective.init_params(jax.random.PRNGKey(0), params)
  rm_params["head"]["kernel"] = rm_params["head"]["kernel"].at[3, 0].set(jnp.nan)
  split = pipeline.load("embedded_news_preferences", "validation", LENGTHS, max_examples=4,
                        keep_texts=False)
  data = objectives.EvalData(split.features, {}, str)
  with pytest.raises(losses.NonFiniteError,
                     match=r"reward model scores of 4 held-out pairs.*\['chosen'\]: 4 NaN"):
    objective.evaluate(rm_params, {}, data, jax.random.PRNGKey(0), 2)
