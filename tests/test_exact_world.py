"""The exact world's pieces: its vocabulary and tasks, the gold reward object, the closed
world (the sampler's whole support), the trainer's eval hook; and the driver on smoke."""
import io
import json
import os

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deranj import decoding
from deranj import exact
from deranj.data import exact_world
from deranj.data import pipeline
from deranj.models import base
from deranj.models import build
from deranj.training import objectives
from deranj.training import trainer

CONTENT = (2, 3, 4, 5, 6, 7)
L = 4
CFG = build.T5Config(vocab_size=8, d_model=16, d_kv=8, d_ff=32, num_heads=2, num_layers=1,
                  dropout_rate=0.0)


@pytest.fixture(scope="module")
def world():
  return exact.make_world(3, CONTENT, L, seed=1, allow_truncated=True)


@pytest.fixture(scope="module")
def model():
  m = base.EncoderDecoderModel(build.network(CFG))
  params = m.init_params(jax.random.PRNGKey(0))
  # Sharper than at init, and much mass on PAD: the closed world must not depend on it.
  params = jax.tree_util.tree_map(lambda x: 2.0 * x, params)
  return m, params


@pytest.fixture
def data_dir(tmp_path, world):
  """SFT rows: every prompt with responses of each length (a cut one included), and pairs."""
  picks = np.array([0, 1, 8, 50, len(world.responses) - 1])  # lengths 0, 1, 2, 3, 4 (cut)
  prompts = np.repeat(world.prompts, len(picks), axis=0)
  targets = world.responses[np.tile(picks, len(world.prompts))]
  for split in ("train", "validation"):
    exact_world.write_examples(str(tmp_path), split, prompts, targets)
    exact_world.write_pairs(str(tmp_path), split, prompts, targets, targets[::-1])
  gin.clear_config()
  gin.bind_parameter("exact_world_dir.path", str(tmp_path))
  yield str(tmp_path), prompts, targets
  gin.clear_config()


def test_vocabulary_round_trip():
  vocab = exact_world.WorldVocabulary(8)
  for ids in ([5, 2, 1], [2, 3, 4, 7], [1], []):
    text = " ".join(map(str, ids))
    assert list(vocab.encode(text)) == ids
    assert list(vocab.encode_tf(text).numpy()) == ids
    assert vocab.decode(ids + [0, 0]) == text
  assert vocab.decode_tf(np.array([[5, 2, 1, 0], [2, 3, 4, 7]], np.int32)).numpy().tolist() == [
      b"5 2 1", b"2 3 4 7"]
  assert exact_world.ids_text([5, 1, 0, 0]) == "5 1"
  with pytest.raises(ValueError, match="outside 1..7"):
    vocab.encode("3 9")


def test_tasks_keep_the_world_ids(data_dir):
  """Features are the written ids: EOS where a response has one, none added to cut ones."""
  _, prompts, targets = data_dir
  split = pipeline.load(exact_world.TASK, "train", {"inputs": 5, "targets": L})
  np.testing.assert_array_equal(split.features["prompts"], prompts)
  np.testing.assert_array_equal(split.features["responses"], targets)
  np.testing.assert_array_equal(split.features["loss_weights"], targets != 0)
  pairs = pipeline.load(exact_world.PREFERENCE_TASK, "validation", {"inputs": 5, "targets": L})
  np.testing.assert_array_equal(pairs.features["chosen_responses"], targets)
  np.testing.assert_array_equal(pairs.features["rejected_responses"], targets[::-1])


def test_missing_data_dir_is_one_line():
  gin.clear_config()
  with pytest.raises(Exception, match="exact_world_dir.path"):
    pipeline.load(exact_world.TASK, "train", {"inputs": 5, "targets": L})


def test_gold_reward_object_matches_the_table(world):
  reward = exact.GoldReward(CONTENT, seed=3, scale=2.0)
  got = np.asarray(reward({}, jnp.asarray(world.prompts[:1]).repeat(len(world.responses), 0),
                          jnp.asarray(world.responses)))
  want = exact.gold_reward(world.responses, CONTENT, seed=3, scale=2.0)
  assert np.std(want) > 1.0  # not a constant
  np.testing.assert_allclose(got, want, rtol=1e-6 * L, atol=1e-6 * L * np.abs(want).max())
  table = exact.reward_table(reward, world.prompts, world.responses, batch_size=1000)
  assert table.shape == (len(world.prompts), len(world.responses))
  np.testing.assert_allclose(table, np.broadcast_to(want, table.shape), rtol=1e-6 * L,
                             atol=1e-6 * L * np.abs(want).max())
  with pytest.raises(ValueError, match="content_ids"):
    exact.GoldReward((1, 2))


def test_closed_world_is_the_samplers_support(world, model):
  """With PAD excluded, the tables of a vocab-8 model sum to one over the world."""
  m, params = model
  sampled = exact.sequence_logprobs(m, params, world.prompts, world.responses,
                                    exclude_pad=True)
  _, missing = exact.renormalize(sampled)
  np.testing.assert_allclose(missing, 0.0, atol=1e-5)
  _, missing_softmax = exact.renormalize(exact.sequence_logprobs(
      m, params, world.prompts, world.responses))
  assert np.all(missing_softmax > 0.05)  # the model's own softmax puts mass on PAD
  # Draws of the sampler are world responses, scored as the table says.
  out = decoding.sample(m, params, jnp.asarray(world.prompts), jax.random.PRNGKey(0),
                        max_decode_len=L, num_decodes=64)
  rows = {tuple(r): n for n, r in enumerate(world.responses.tolist())}
  index = np.array([rows[tuple(r)] for r in np.asarray(out.tokens).tolist()])
  expected = sampled[np.repeat(np.arange(len(world.prompts)), 64), index]
  np.testing.assert_allclose(out.logq, expected, rtol=1e-5, atol=1e-5 * L)


def test_kl_hook_is_the_exact_kl(tmp_path, world, model):
  m, params = model
  ref, _ = exact.renormalize(exact.sequence_logprobs(
      m, jax.tree_util.tree_map(lambda x: 0.5 * x, params), world.prompts, world.responses,
      exclude_pad=True))
  gold = exact.gold_reward(world.responses, CONTENT)
  path = str(tmp_path / "tables.npz")
  exact.save_tables(path, world, ref, {"gold": gold})
  log_file = str(tmp_path / "kl.jsonl")
  hook = exact.KLToOptimum(m, path, "gold", 0.5, log_file=log_file)
  got = hook(params, 7)
  table, _ = exact.renormalize(exact.sequence_logprobs(m, params, world.prompts,
                                                       world.responses, exclude_pad=True))
  want = exact.kl(table, exact.optimal_policy(ref, gold, 0.5)).mean
  assert want > 0.01
  np.testing.assert_allclose(got["exact/kl_to_optimum"], want, rtol=1e-9)
  np.testing.assert_allclose(got["exact/reward"], exact.expected(table, gold).mean, rtol=1e-9)
  with open(log_file) as f:
    assert json.loads(f.readline())["step"] == 7
  with pytest.raises(ValueError, match="'length' is not in"):
    exact.KLToOptimum(m, path, "length", 0.5)


def test_trainer_calls_the_eval_hook(tmp_path, data_dir):
  """At step 0 and every eval (eval_split None included), with the policy's params,
  its metrics written with the eval metrics."""
  m = base.EncoderDecoderModel(build.network(CFG))
  calls = []

  def hook(params, step):
    assert jax.tree_util.tree_map(jnp.shape, params) == m.param_shapes()
    calls.append(step)
    return {"hook/step_twice": 2.0 * step}

  out = io.StringIO()
  trainer.train(model_dir=str(tmp_path / "run"), objective=objectives.SFT(m, max_decode_len=L),
                task=exact_world.TASK, num_steps=6, batch_size=5, inputs_length=5,
                targets_length=L, log_every=2, checkpoint_every=6, eval_every=2,
                eval_split=None, eval_hook=hook, stream=out)
  assert calls == [0, 2, 4, 6]
  evals = [line for line in out.getvalue().splitlines() if line.startswith("[eval]")]
  assert len(evals) == 4 and "hook/step_twice 12.0" in evals[-1]


@pytest.mark.slow
def test_exact_world_smoke(tmp_path):
  """The driver end to end on the smoke preset: the JSON's structure and what must hold."""
  from experiments import exact_world as driver  # pylint: disable=g-import-not-at-top
  result = driver.main(["--preset", "smoke", "--workdir", str(tmp_path)])
  with open(tmp_path / "exact_world.json") as f:
    saved = json.load(f)
  assert os.path.getsize(tmp_path / "exact_world.png") > 10_000
  assert set(saved) >= {"world", "reference", "runs", "objectives", "lams", "seconds"}
  assert saved["reference"]["missing_mass_max"] < 1e-5  # a closed world
  assert set(saved["objectives"]) == {"ppo", "pg", "dpo"}
  for kind, obj in saved["objectives"].items():
    by_lam = {row["lam"]: row for row in obj["per_lam"]}
    assert sorted(by_lam) == sorted(saved["lams"])
    # DeRa on the exact optimum's conditionals is the optimum itself at lam = 1 ...
    assert abs(by_lam[1.0]["kl_exact_dera"]) < 1e-10
    # ... and only approximately elsewhere; its reward is the optimum's at lam = 1.
    assert max(row["kl_exact_dera"] for row in obj["per_lam"]) > 1e-4
    np.testing.assert_allclose(by_lam[1.0]["reward_exact_dera"], by_lam[1.0]["reward_optimum"],
                               rtol=1e-9, atol=1e-12)
    # The aligned model is its own retrained model at lam = 1.
    assert by_lam[1.0]["kl_retrained"] == pytest.approx(by_lam[1.0]["kl_trained_dera"],
                                                         rel=1e-9)
    # The optimum's reward rises with lam (a smaller KL strength).
    rewards = [row["reward_optimum"] for row in obj["per_lam"]]
    assert all(b >= a - 1e-12 for a, b in zip(rewards, rewards[1:])) and rewards[-1] > rewards[0]
  for run in saved["runs"].values():
    assert run["curve"][0][0] == 0 and run["curve"][-1][1] == pytest.approx(run["final_kl"],
                                                                             rel=1e-4)
  # Some trainer moves towards its optimum within the smoke's few steps.
  assert any(run["curve"][-1][1] < run["curve"][0][1] for run in saved["runs"].values())
  assert result["runs"].keys() == saved["runs"].keys()
