"""Length reward, prompt/response joining and the T5 reward model."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numerics
import tiny_models

from deranj import rewards
from deranj.models import base
from deranj.models import build
from deranj.training import losses

EOS, PAD = 1, 0


def _np_length(row):
  n = 0
  for tok in row:
    if tok == EOS:
      break
    n += tok != PAD
  return n


def test_response_lengths_with_and_without_eos():
  tokens = np.array([
      [5, 6, 7, 1, 0, 0],   # EOS after 3 tokens
      [1, 0, 0, 0, 0, 0],   # empty response
      [5, 6, 7, 8, 9, 10],  # truncated: no EOS
      [5, 6, 0, 0, 0, 0],   # no EOS, padded
      [5, 1, 7, 1, 0, 0],   # only the first EOS counts
  ], np.int32)
  got = rewards.response_lengths(jnp.asarray(tokens))
  assert got.dtype == jnp.int32 and got.shape == (5,)
  np.testing.assert_array_equal(got, [3, 0, 6, 2, 1])
  np.testing.assert_array_equal(got, [_np_length(r) for r in tokens])
  # Another EOS id.
  np.testing.assert_array_equal(rewards.response_lengths(jnp.asarray(tokens), eos_id=7),
                                [2, 1, 2, 2, 2])


def test_length_reward_boundaries_inclusive():
  lengths = jnp.array([38, 39, 40, 41, 49, 50, 51, 0])
  got = rewards.length_reward(lengths, 40, 50)
  assert got.dtype == jnp.float32
  np.testing.assert_array_equal(got, [-1, -1, 0, 0, 0, 0, -1, -1])
  np.testing.assert_array_equal(rewards.length_reward(jnp.array([4, 5, 6]), 5, 5), [-1, 0, -1])


def _np_join(prompt, response):
  out = np.zeros((prompt.shape[0], prompt.shape[1] + response.shape[1]), prompt.dtype)
  for i in range(prompt.shape[0]):
    row = [t for t in prompt[i] if t != PAD]
    for t in response[i]:
      if t != PAD:
        row.append(t)
      if t == EOS:
        break
    out[i, :len(row)] = row
  return out


PROMPT = np.array([[11, 12, 13, 1], [14, 1, 0, 0], [15, 16, 1, 0]], np.int32)
RESPONSE = np.array([[21, 22, 1, 0, 0], [23, 24, 25, 26, 27], [1, 0, 0, 0, 0]], np.int32)


def test_join_prompt_response_ragged_rows():
  got = jax.jit(rewards.join_prompt_response)(jnp.asarray(PROMPT), jnp.asarray(RESPONSE))
  expected = np.array([
      [11, 12, 13, 1, 21, 22, 1, 0, 0],
      [14, 1, 23, 24, 25, 26, 27, 0, 0],  # truncated response: no EOS added
      [15, 16, 1, 1, 0, 0, 0, 0, 0],      # empty response: its EOS only
  ])
  np.testing.assert_array_equal(got, expected)
  np.testing.assert_array_equal(got, _np_join(PROMPT, RESPONSE))
  # Tokens after the first EOS are dropped even if not PAD.
  noisy = np.array([[21, 1, 9, 9, 0]], np.int32)
  np.testing.assert_array_equal(
      rewards.join_prompt_response(jnp.asarray(PROMPT[:1]), jnp.asarray(noisy)),
      [[11, 12, 13, 1, 21, 1, 0, 0, 0]])


CFG = build.T5Config(vocab_size=31, d_model=16, d_kv=8, d_ff=32, num_heads=2, num_layers=1,
                  dropout_rate=0.0, feed_forward_proj="gated-gelu", tie_word_embeddings=False)


_random_params = tiny_models.random_params


@pytest.fixture(scope="module")
def sft():
  model = base.EncoderDecoderModel(build.network(CFG))
  return model, _random_params(model, 0)


@pytest.fixture(scope="module")
def reward_model(sft):
  model, sft_params = sft
  rm = rewards.RewardModel(model)
  params = rm.init_params(jax.random.PRNGKey(1), from_params=sft_params)
  return rm, params, jax.jit(rm.rewards)


def test_reward_model_params_from_sft(sft, reward_model):
  model, sft_params = sft
  rm, params, _ = reward_model
  assert set(params) == {"token_embedder", "encoder", "head"}
  for key in ("token_embedder", "encoder"):
    jax.tree_util.tree_map(np.testing.assert_array_equal, params[key], sft_params[key])
  assert params["head"]["kernel"].shape == (CFG.d_model, 1)
  assert params["head"]["bias"].shape == (1,)
  assert np.any(np.asarray(params["head"]["kernel"]) != 0)
  assert jax.tree_util.tree_map(np.shape, params) == rm.param_shapes()
  # Logical axes: same tree; the encoder's are the seq2seq model's.
  axes = rm.logical_axes()
  is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
  assert (jax.tree_util.tree_structure(axes, is_leaf=is_spec)
          == jax.tree_util.tree_structure(params))
  assert axes["head"]["kernel"] == jax.sharding.PartitionSpec("embed", None)
  assert axes["encoder"] == model.logical_axes()["encoder"]
  # Fresh params have the same tree; a mismatched config is refused.
  fresh = jax.eval_shape(rm.init_params, jax.random.PRNGKey(2))
  assert jax.tree_util.tree_map(lambda x: x.shape, fresh) == rm.param_shapes()
  other = base.EncoderDecoderModel(build.network(build.T5Config(
      vocab_size=31, d_model=8, d_kv=4, d_ff=16, num_heads=2, num_layers=1)))
  with pytest.raises(ValueError, match="do not match"):
    rm.init_params(jax.random.PRNGKey(1), _random_params(other, 1))
  with pytest.raises(ValueError, match="lacks"):
    rm.init_params(jax.random.PRNGKey(1), {"decoder": {}})


def _np_reward(rm, params, prompt, response):
  """Mean-pool the encoder output over non-PAD positions in float64, then the head; with
  each reward's float32 rounding scale, sum |pooled| * |kernel| + |bias|."""
  joined = _np_join(prompt, response)
  encode = jax.jit(lambda p, x: rm.module.apply({"params": p}, x, method="encode"))
  encoded = np.asarray(encode({k: params[k] for k in ("token_embedder", "encoder")},
                              jnp.asarray(joined)), np.float64)
  kernel = np.asarray(params["head"]["kernel"], np.float64)[:, 0]
  bias = float(params["head"]["bias"][0])
  out, scale = [], []
  for i in range(joined.shape[0]):
    rows = [encoded[i, s] for s in range(joined.shape[1]) if joined[i, s] != PAD]
    pooled = sum(rows) / len(rows)
    out.append(float(pooled @ kernel) + bias)
    scale.append(float(np.abs(pooled) @ np.abs(kernel)) + abs(bias))
  return np.array(out), np.array(scale)


# Rounded terms behind a reward: the pooling over the joined positions, the head's dot product.
RM_TERMS = PROMPT.shape[1] + RESPONSE.shape[1] + CFG.d_model


def test_reward_model_rewards(reward_model):
  rm, params, rewards_fn = reward_model
  got = rewards_fn(params, jnp.asarray(PROMPT), jnp.asarray(RESPONSE))
  assert got.shape == (3,) and got.dtype == jnp.float32
  losses.check_finite(got, "reward model outputs")
  expected, scale = _np_reward(rm, params, PROMPT, RESPONSE)
  numerics.assert_close_f32(got, expected, RM_TERMS, scale)
  # A different response changes the reward.
  changed = RESPONSE.copy()
  changed[0, 1] = 29
  got_changed = rewards_fn(params, jnp.asarray(PROMPT), jnp.asarray(changed))
  assert abs(float(got_changed[0]) - float(got[0])) > 1e-4
  np.testing.assert_allclose(got_changed[1:], got[1:], rtol=1e-6)


def test_reward_model_ignores_padding(reward_model):
  rm, params, rewards_fn = reward_model
  got = rewards_fn(params, jnp.asarray(PROMPT), jnp.asarray(RESPONSE))
  # Wider prompt and response arrays: more PAD, same sequences.
  prompt = np.pad(PROMPT, ((0, 0), (0, 3)))
  response = np.pad(RESPONSE, ((0, 0), (0, 4)))
  padded = rewards_fn(params, jnp.asarray(prompt), jnp.asarray(response))
  # The encoder's float32 sums differ in width only: allowed the pooled outputs' rounding.
  numerics.assert_close_f32(padded, got, RM_TERMS, _np_reward(rm, params, PROMPT, RESPONSE)[1])
  # Junk after EOS is PAD to the reward model too.
  junk = RESPONSE.copy()
  junk[0, 3:] = [7, 8]
  np.testing.assert_allclose(rewards_fn(params, jnp.asarray(PROMPT), jnp.asarray(junk)), got,
                             rtol=1e-6)


def test_reward_model_trains_through_bradley_terry(reward_model):
  rm, params, _ = reward_model

  def loss_fn(p):
    chosen = rm.rewards(p, jnp.asarray(PROMPT), jnp.asarray(RESPONSE))
    rejected = rm.rewards(p, jnp.asarray(PROMPT), jnp.asarray(RESPONSE[::-1].copy()))
    return losses.bradley_terry_loss(chosen, rejected)[0]

  grads = jax.jit(jax.grad(loss_fn))(params)
  losses.check_finite(grads, "reward model gradients")
  for key in ("token_embedder", "encoder", "head"):
    assert max(float(jnp.abs(g).max()) for g in jax.tree_util.tree_leaves(grads[key])) > 0


def test_zero_head_gives_constant_rewards(sft):
  _, sft_params = sft
  rm = rewards.RewardModel(build.network(CFG), head_init_scale=0.0)
  params = rm.init_params(jax.random.PRNGKey(0), sft_params)
  np.testing.assert_array_equal(params["head"]["kernel"], 0.0)
  np.testing.assert_array_equal(
      jax.jit(rm.rewards)(params, jnp.asarray(PROMPT), jnp.asarray(RESPONSE)), 0.0)
