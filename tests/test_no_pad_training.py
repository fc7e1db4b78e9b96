"""RL and preference objectives on a NO_PAD decoder-only model (every id a token, -1 fills
after EOS): id 0 inside a response counts as a token in masks, lengths, rewards and losses,
against float64 NumPy on a tiny batch."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny_models
from deranj.models import base
from deranj.models import decoder
from deranj.training import dpo
from deranj.training import objectives
from deranj.training import policy_gradient
from deranj.training import ppo
from deranj.training import rollouts
from numerics import assert_close_f32

V, EOS, T = 12, 1, 7
WIDTH = 32  # the widest contraction in the network
X = base.NO_PAD
# Two prompts (row 0 left-padded, holding a real 0) and two responses each: 0 inside,
# EOS, then NO_PAD; row 2 is truncated (no EOS).
PROMPTS = np.array([[X, 3, 0, 7], [4, 5, 6, 2]], np.int32)
RESPONSES = np.array([[5, 0, 0, 7, EOS, X, X],
                      [0, 9, EOS, X, X, X, X],
                      [3, 0, 4, 0, 8, 0, 2],
                      [0, EOS, X, X, X, X, X]], np.int32)
LENGTHS = np.array([4, 2, 7, 1])  # EOS excluded, every 0 counted


@pytest.fixture(scope="module")
def tiny():
  """(NO_PAD model, policy params, reference params)."""
  model = base.DecoderOnlyModel(decoder.Transformer(decoder.DecoderConfig(
      vocab_size=V, hidden_size=16, intermediate_size=WIDTH, num_layers=1, num_heads=2,
      num_kv_heads=1, head_dim=8)))
  assert model.pad_id == X
  return model, tiny_models.random_params(model, 0), tiny_models.random_params(model, 1)


@functools.partial(jax.jit, static_argnums=0)  # op by op, each small op compiles alone
def _logits(model, params, prompts, responses):
  return model.logits(params, base.response_batch(prompts, responses))


def _token_logp(model, params, prompts, responses):
  """float64 (log pi of each response token [B, T], 0 on NO_PAD; logits [B, T, V])."""
  logits = np.asarray(_logits(model, params, jnp.asarray(prompts), jnp.asarray(responses)),
                      np.float64)
  m = logits.max(-1, keepdims=True)
  logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
  token = np.take_along_axis(logp, np.maximum(responses, 0)[..., None], -1)[..., 0]
  return np.where(responses != X, token, 0.0), logits


def _f32_terms(logits):
  """(terms, scale) of a float32 sum of T log-softmaxes over V ids of these logits."""
  return T * (WIDTH + V), T * np.abs(logits).max()


def test_rollout_mask_and_lengths_count_token_zero(tiny):
  model, params, _ = tiny
  rollout = rollouts.sample_rollout(model, params, jnp.asarray(PROMPTS), jax.random.PRNGKey(0),
                                    max_decode_len=8, num_samples=8, eos_id=EOS)
  tokens = np.asarray(rollout.responses)
  mask = np.asarray(rollout.mask)
  ended = np.cumsum(tokens == EOS, axis=1) - (tokens == EOS) > 0  # after the first EOS
  np.testing.assert_array_equal(tokens[ended], X)
  np.testing.assert_array_equal(mask, ~ended)
  assert np.sum((tokens == 0) & (mask == 1)) >= 3  # zeros sampled, and masked in
  assert rollout.pad_id == X
  lengths = (~ended & (tokens != EOS)).sum(1)
  got = rollouts.response_length_metrics(rollout, EOS)["response/length"]
  assert_close_f32(got, lengths.mean(), len(lengths))
  # PPO's values are read on every response token, 0 included.
  objective = ppo.PPO(model, rollouts.LengthReward(1, 4, EOS), max_decode_len=8, eos_id=EOS)
  value = {"trunk": params, "head": {"kernel": jnp.zeros((16, 1)), "bias": jnp.full((1,), .3)}}
  np.testing.assert_array_equal(objective.values(value, rollout), 0.3 * mask.astype(np.float32))


def test_policy_gradient_loss_counts_token_zero(tiny):
  model, params, ref_params = tiny
  beta = 0.1
  objective = policy_gradient.PolicyGradient(model, rollouts.LengthReward(2, 4, EOS),
                                             beta=beta, num_samples=2, max_decode_len=T,
                                             eos_id=EOS)
  prompts = np.repeat(PROMPTS, 2, axis=0)
  scores = np.asarray(objective.reward({}, jnp.asarray(prompts), jnp.asarray(RESPONSES)))
  np.testing.assert_array_equal(scores, np.where((LENGTHS >= 2) & (LENGTHS <= 4), 0.0, -1.0))
  ref_logp, _ = _token_logp(model, ref_params, prompts, RESPONSES)
  batch = {"prompts": jnp.asarray(prompts),
           "responses": jnp.asarray(RESPONSES),
           "loss_weights": jnp.asarray(RESPONSES != X, jnp.float32),
           "ref_logp": jnp.asarray(ref_logp.sum(-1), jnp.float32),
           "scores": jnp.asarray(scores, jnp.float32)}
  loss, metrics = jax.jit(objective.loss)(params, None, batch, None)

  token_logp, logits = _token_logp(model, params, prompts, RESPONSES)
  seq = token_logp.sum(-1)
  total = scores - beta * (seq - ref_logp.sum(-1))
  advantage = total - total.reshape(2, 2)[:, ::-1].reshape(4)  # the other sample's
  terms, scale = _f32_terms(logits)
  assert_close_f32(loss, -np.mean(advantage * seq), 2 * terms,
                   np.mean(np.abs(advantage) * scale) + scale * beta * np.abs(seq).mean())
  assert_close_f32(metrics["objective/kl"], np.mean(seq - ref_logp.sum(-1)), 2 * terms, scale)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  entropy = -(p * np.log(p)).sum(-1)
  assert_close_f32(metrics["objective/entropy"], np.mean((entropy * (RESPONSES != X)).sum(-1)),
                   terms, np.log(V) * T)
  assert_close_f32(metrics["response/length"], LENGTHS.mean(), 4)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_loss_counts_token_zero(tiny, loss_type):
  """IPO's per-token means divide by lengths that count every 0."""
  model, params, ref_params = tiny
  beta = 0.1
  objective = dpo.DPO(model, beta=beta, loss_type=loss_type)
  batch = {"prompts": jnp.asarray(PROMPTS),
           "chosen_responses": jnp.asarray(RESPONSES[[0, 2]]),
           "rejected_responses": jnp.asarray(RESPONSES[[1, 3]])}
  loss, metrics = jax.jit(objective.loss)(params, ref_params, batch, None)

  def logps(p, rows):
    token_logp, logits = _token_logp(model, p, PROMPTS, RESPONSES[rows])
    return token_logp.sum(-1), logits

  (chosen, logits), (rejected, _) = logps(params, [0, 2]), logps(params, [1, 3])
  (ref_chosen, _), (ref_rejected, _) = logps(ref_params, [0, 2]), logps(ref_params, [1, 3])
  if loss_type == "ipo":
    chosen_len, rejected_len = LENGTHS[[0, 2]] + np.array([1, 0]), LENGTHS[[1, 3]] + 1  # + EOS
    chosen, ref_chosen = chosen / chosen_len, ref_chosen / chosen_len
    rejected, ref_rejected = rejected / rejected_len, ref_rejected / rejected_len
  h = (chosen - rejected) - (ref_chosen - ref_rejected)
  expected = (h - 1 / (2 * beta))**2 if loss_type == "ipo" else np.log1p(np.exp(-beta * h))
  terms, scale = _f32_terms(logits)  # of each log-probability in h
  slope = 2 * np.abs(h - 1 / (2 * beta)).max() if loss_type == "ipo" else beta  # d loss / d h
  assert_close_f32(loss, expected.mean(), 4 * terms, scale * slope)
  assert_close_f32(metrics["logps/chosen"], chosen.mean(), terms, scale)


def test_rewards_must_share_the_policys_pad_id(tiny):
  model, _, _ = tiny
  with pytest.raises(objectives.ObjectiveError, match=r"^PPO: LengthReward.pad_id is 0, the "
                     r"policy's pad_id -1 \(which fills its responses after EOS\)"):
    ppo.PPO(model, rollouts.LengthReward(1, 4, pad_id=0), max_decode_len=8)
  given = rollouts.LengthReward(1, 3)
  objective = ppo.PPO(model, given, max_decode_len=8)
  assert objective.reward.pad_id == X and given.pad_id is None  # the binding is not changed
  # Alone, a LengthReward pads with T5's 0.
  responses = jnp.asarray([[3, 0, 0, EOS], [3, 4, 0, 0]])
  np.testing.assert_array_equal(given({}, None, responses), [0.0, 0.0])
  np.testing.assert_array_equal(objective.reward({}, None, responses), [0.0, -1.0])
