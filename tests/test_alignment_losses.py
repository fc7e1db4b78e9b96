"""Alignment losses against float64 NumPy written as plain loops, on hand-made inputs."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numerics
from deranj.training import losses


def _log_sigmoid(x):
  return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _np_masked_mean(x, mask):
  total, count = 0.0, 0.0
  for v, m in zip(np.ravel(x), np.ravel(mask)):
    total += float(v) * float(m)
    count += float(m)
  return total / count


# Two rows, ragged: row 0 has 3 response tokens, row 1 has 5 (all).
MASK = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.float32)


# ----------------------------------------------------------------------------- statistics


def test_masked_mean_axes_and_empty_mask():
  x = np.array([[1.0, 2.0, 30.0], [4.0, 5.0, 6.0]], np.float32)
  mask = np.array([[1, 1, 0], [0, 0, 0]], np.float32)
  np.testing.assert_allclose(losses.masked_mean(x, mask), 1.5)
  np.testing.assert_allclose(losses.masked_mean(x, mask, axis=1), [1.5, 0.0])  # empty row: 0
  np.testing.assert_allclose(losses.masked_mean(x, mask, axis=0), [1.0, 2.0, 0.0])
  np.testing.assert_allclose(losses.masked_mean(x, mask.astype(bool)), 1.5)


@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_matches_loop(shift_mean):
  x = np.array([[0.5, -1.0, 2.0, 99.0, -50.0], [3.0, 0.0, 1.5, -2.0, 0.25]], np.float32)
  got = np.asarray(losses.masked_whiten(jnp.asarray(x), jnp.asarray(MASK), shift_mean))
  vals = [float(v) for v, m in zip(x.ravel(), MASK.ravel()) if m]
  n = len(vals)
  mean = sum(vals) / n
  var = sum((v - mean) ** 2 for v in vals) / (n - 1)  # unbiased, as TRL
  expected = np.zeros_like(x, np.float64)
  for i in range(x.shape[0]):
    for j in range(x.shape[1]):
      expected[i, j] = (x[i, j] - mean) / math.sqrt(var + 1e-8) + (0.0 if shift_mean else mean)
  # float32 mean and variance over the n masked values, then (x - mean) / std (+ mean).
  std = math.sqrt(var + 1e-8)
  scale = (np.abs(x) + abs(mean)) / std + (0.0 if shift_mean else abs(mean))
  numerics.assert_close_f32(got, expected, n, scale)
  whitened_in = got[MASK > 0] - (0.0 if shift_mean else mean)
  np.testing.assert_allclose(np.std(whitened_in, ddof=1), 1.0, rtol=1e-5)


def test_entropy_from_logits():
  logits = np.array([[[2.0, 0.0, -1.0, 0.5]], [[0.0, 0.0, 0.0, 0.0]]], np.float32)  # [2, 1, 4]
  got = losses.entropy_from_logits(jnp.asarray(logits))
  assert got.shape == (2, 1)
  for i in range(2):
    z = sum(math.exp(float(v)) for v in logits[i, 0])
    p = [math.exp(float(v)) / z for v in logits[i, 0]]
    np.testing.assert_allclose(got[i, 0], -sum(q * math.log(q) for q in p), rtol=1e-6)
  np.testing.assert_allclose(got[1, 0], math.log(4), rtol=1e-6)
  # A near-one-hot distribution (masked with -1e10, the codebase's NEG_INF) has entropy 0.
  np.testing.assert_allclose(losses.entropy_from_logits(jnp.array([0.0, -1e10])), 0.0, atol=1e-6)


# ----------------------------------------------------------------------------- preferences


def test_bradley_terry_loss_and_accuracy():
  chosen = np.array([1.0, -0.5, 2.0, 0.3], np.float32)
  rejected = np.array([0.0, 0.5, 2.0, -3.0], np.float32)
  loss, acc = losses.bradley_terry_loss(jnp.asarray(chosen), jnp.asarray(rejected))
  expected = -sum(_log_sigmoid(float(c) - float(r)) for c, r in zip(chosen, rejected)) / 4
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  np.testing.assert_allclose(acc, (1 + 0 + 0.5 + 1) / 4)  # the tie counts 1/2
  # The gradient pushes the chosen reward up and the rejected one down.
  g_c, g_r = jax.grad(lambda c, r: losses.bradley_terry_loss(c, r)[0], argnums=(0, 1))(
      jnp.asarray(chosen), jnp.asarray(rejected))
  sig = [1 / (1 + math.exp(float(c) - float(r))) for c, r in zip(chosen, rejected)]
  np.testing.assert_allclose(g_c, [-s / 4 for s in sig], rtol=1e-5)
  np.testing.assert_allclose(g_r, [s / 4 for s in sig], rtol=1e-5)


PC = np.array([-10.0, -4.0, -7.5], np.float32)  # policy chosen
PR = np.array([-12.0, -3.0, -7.5], np.float32)  # policy rejected
RC = np.array([-11.0, -4.5, -8.0], np.float32)  # reference chosen
RR = np.array([-11.5, -2.0, -6.0], np.float32)  # reference rejected


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_loss_matches_loop(loss_type, beta):
  out = losses.dpo_loss(*(jnp.asarray(a) for a in (PC, PR, RC, RR)), beta, loss_type)
  got_losses, got_chosen, got_rejected = (np.asarray(o) for o in out)
  for i in range(3):
    h = (float(PC[i]) - float(PR[i])) - (float(RC[i]) - float(RR[i]))
    if loss_type == "sigmoid":
      expected = -_log_sigmoid(beta * h)
    else:
      expected = (h - 1 / (2 * beta)) ** 2
    np.testing.assert_allclose(got_losses[i], expected, rtol=1e-5)
    np.testing.assert_allclose(got_chosen[i], beta * (float(PC[i]) - float(RC[i])), rtol=1e-5)
    np.testing.assert_allclose(got_rejected[i], beta * (float(PR[i]) - float(RR[i])), rtol=1e-5)


def test_dpo_gradient_and_metrics_stop_gradient():
  beta = 0.1

  def total(pc, pr):
    losses_, chosen, rejected = losses.dpo_loss(pc, pr, jnp.asarray(RC), jnp.asarray(RR), beta)
    return jnp.sum(losses_) + jnp.sum(chosen) + jnp.sum(rejected)  # rewards add no gradient

  g_c, g_r = jax.grad(total, argnums=(0, 1))(jnp.asarray(PC), jnp.asarray(PR))
  for i in range(3):
    h = (float(PC[i]) - float(PR[i])) - (float(RC[i]) - float(RR[i]))
    d = -beta / (1 + math.exp(beta * h))  # d/dh of -log sigmoid(beta h)
    np.testing.assert_allclose(g_c[i], d, rtol=1e-5)
    np.testing.assert_allclose(g_r[i], -d, rtol=1e-5)


def test_dpo_rejects_unknown_loss_type():
  with pytest.raises(ValueError, match="hinge"):
    losses.dpo_loss(*(jnp.asarray(a) for a in (PC, PR, RC, RR)), 0.1, "hinge")


# ----------------------------------------------------------------------------- PPO


def test_kl_penalised_rewards_matches_loop():
  scores = np.array([2.0, -1.0], np.float32)
  logp = np.array([[-1.0, -2.0, -0.5, -9.0, -9.0], [-0.1, -0.2, -0.3, -0.4, -0.5]], np.float32)
  ref = np.array([[-1.5, -1.0, -0.5, 7.0, 7.0], [-0.2, -0.2, -0.1, -1.4, -0.3]], np.float32)
  beta = 0.1
  rewards, kl = losses.kl_penalised_rewards(*(jnp.asarray(a) for a in (scores, logp, ref, MASK)),
                                            beta)
  for i in range(2):
    last = max(j for j in range(5) if MASK[i, j])
    for j in range(5):
      k = (float(logp[i, j]) - float(ref[i, j])) if MASK[i, j] else 0.0
      r = -beta * k + (float(scores[i]) if j == last else 0.0)
      np.testing.assert_allclose(kl[i, j], k, rtol=1e-6, atol=1e-7)
      np.testing.assert_allclose(rewards[i, j], r, rtol=1e-6, atol=1e-7)


def test_kl_penalised_rewards_empty_row_gets_no_score():
  rewards, _ = losses.kl_penalised_rewards(
      jnp.array([5.0]), jnp.zeros((1, 3)), jnp.zeros((1, 3)), jnp.zeros((1, 3)), 0.1)
  np.testing.assert_array_equal(rewards, 0.0)


def _np_gae(rewards, values, mask, gamma, lam):
  """Textbook GAE per row, over the row's L response tokens; V_L = 0."""
  b, t = rewards.shape
  adv = np.zeros((b, t))
  ret = np.zeros((b, t))
  for i in range(b):
    length = int(sum(mask[i]))
    last_adv = 0.0
    for j in reversed(range(length)):
      next_value = float(values[i, j + 1]) if j + 1 < length else 0.0
      delta = float(rewards[i, j]) + gamma * next_value - float(values[i, j])
      last_adv = delta + gamma * lam * last_adv
      adv[i, j] = last_adv
      ret[i, j] = last_adv + float(values[i, j])
  return adv, ret


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5), (0.99, 0.0)])
def test_gae_matches_loop_with_masking(gamma, lam):
  rewards = np.array([[0.1, -0.2, 1.0, 0.0, 0.0], [0.0, 0.3, -0.1, 0.2, -1.0]], np.float32)
  values = np.array([[0.5, 0.4, 0.3, 0.0, 0.0], [-0.2, 0.1, 0.6, -0.3, 0.25]], np.float32)
  adv, ret = losses.gae_advantages(*(jnp.asarray(a) for a in (rewards, values, MASK)),
                                   gamma, lam)
  exp_adv, exp_ret = _np_gae(rewards, values, MASK, gamma, lam)
  # Each entry is a discounted sum over the row's T steps of rewards and values.
  terms = rewards.shape[1]
  row_scale = (np.abs(rewards) * MASK + np.abs(values) * MASK).sum(1, keepdims=True)
  numerics.assert_close_f32(adv, exp_adv, terms, row_scale)
  numerics.assert_close_f32(ret, exp_ret, terms, row_scale)
  # Garbage after the response (rewards, values) changes nothing.
  junk = np.where(MASK > 0, 0.0, 100.0).astype(np.float32)
  adv2, ret2 = losses.gae_advantages(jnp.asarray(rewards + junk), jnp.asarray(values - junk),
                                     jnp.asarray(MASK), gamma, lam)
  numerics.assert_close_f32(adv2, adv, terms, row_scale)
  numerics.assert_close_f32(ret2, ret, terms, row_scale)


def test_gae_lambda_one_gives_discounted_returns():
  # gae_lambda = 1: returns are the discounted reward-to-go, whatever the values.
  rewards = np.array([[1.0, 2.0, 3.0, 0.0, 0.0]], np.float32)
  values = np.array([[5.0, -2.0, 0.5, 0.0, 0.0]], np.float32)
  _, ret = losses.gae_advantages(jnp.asarray(rewards), jnp.asarray(values),
                                 jnp.asarray(MASK[:1]), 0.5, 1.0)
  np.testing.assert_allclose(ret[0], [1 + 0.5 * 2 + 0.25 * 3, 2 + 0.5 * 3, 3, 0, 0], rtol=1e-6)


def _np_ppo_policy(logp, old, adv, mask, eps):
  losses_, clipped_on, sq = [], [], []
  for i in range(logp.shape[0]):
    for j in range(logp.shape[1]):
      if not mask[i, j]:
        continue
      ratio = math.exp(float(logp[i, j]) - float(old[i, j]))
      a = float(adv[i, j])
      l1 = -a * ratio
      l2 = -a * min(max(ratio, 1 - eps), 1 + eps)
      losses_.append(max(l1, l2))
      clipped_on.append(1.0 if l2 > l1 else 0.0)
      sq.append((float(logp[i, j]) - float(old[i, j])) ** 2)
  n = len(losses_)
  return sum(losses_) / n, sum(clipped_on) / n, 0.5 * sum(sq) / n


# Ratios exp(logp - old) on both sides of [0.8, 1.2], with both signs of the advantage:
#   row 0: r=1.5 A>0 (clipped), r=1.5 A<0 (not), r=0.5 A>0 (not), masked junk x2
#   row 1: r=0.5 A<0 (clipped), r=1.1 A>0 (inside), r=0.9 A<0 (inside), r=1.3 A<0, r=0.7 A>0
RATIOS = np.array([[1.5, 1.5, 0.5, 9.0, 9.0], [0.5, 1.1, 0.9, 1.3, 0.7]])
OLD = np.array([[-1.0, -2.0, -0.5, -3.0, -3.0], [-0.7, -1.2, -2.0, -0.3, -1.1]], np.float32)
LOGP = (OLD + np.log(RATIOS)).astype(np.float32)
ADV = np.array([[1.0, -2.0, 0.5, 50.0, 50.0], [-1.5, 0.8, -0.4, -1.0, 2.0]], np.float32)


def test_ppo_policy_loss_clips_both_sides():
  eps = 0.2
  loss, metrics = losses.ppo_policy_loss(*(jnp.asarray(a) for a in (LOGP, OLD, ADV, MASK)), eps)
  exp_loss, exp_clipfrac, exp_kl = _np_ppo_policy(LOGP, OLD, ADV, MASK, eps)
  np.testing.assert_allclose(loss, exp_loss, rtol=1e-5)
  np.testing.assert_allclose(metrics["clipfrac"], exp_clipfrac, rtol=1e-6)
  np.testing.assert_allclose(metrics["approxkl"], exp_kl, rtol=1e-5)
  # The clipped term wins only at (0,0) r=1.5 A>0 and (1,0) r=0.5 A<0; with r outside
  # [1-eps, 1+eps] on the other side of the advantage the unclipped loss is larger.
  np.testing.assert_allclose(metrics["clipfrac"], 2 / 8)


def test_ppo_policy_gradient_is_zero_where_clipped():
  eps = 0.2
  grad = jax.grad(lambda lp: losses.ppo_policy_loss(
      lp, jnp.asarray(OLD), jnp.asarray(ADV), jnp.asarray(MASK), eps)[0])(jnp.asarray(LOGP))
  n = MASK.sum()
  for i in range(2):
    for j in range(5):
      ratio, a = RATIOS[i, j], float(ADV[i, j])
      clipped = MASK[i, j] and ((a > 0 and ratio > 1 + eps) or (a < 0 and ratio < 1 - eps))
      # d/dlogp of -A * ratio is -A * ratio; clipped tokens and masked ones give 0.
      expected = 0.0 if (clipped or not MASK[i, j]) else -a * ratio / n
      np.testing.assert_allclose(grad[i, j], expected, rtol=1e-5, atol=1e-7)


def test_ppo_value_loss_matches_loop():
  clip = 0.2
  old = np.array([[0.0, 1.0, -1.0, 4.0, 4.0], [0.5, 0.5, 0.5, 0.5, 0.5]], np.float32)
  values = np.array([[0.5, 1.1, -1.3, 9.0, 9.0], [0.1, 0.9, 0.6, 0.45, 1.5]], np.float32)
  returns = np.array([[1.0, 0.0, -2.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.4, 0.0]], np.float32)
  loss, metrics = losses.ppo_value_loss(
      *(jnp.asarray(a) for a in (values, old, returns, MASK)), clip)
  terms, clipped_on = [], []
  for i in range(2):
    for j in range(5):
      if not MASK[i, j]:
        continue
      v, o, r = float(values[i, j]), float(old[i, j]), float(returns[i, j])
      vc = o + min(max(v - o, -clip), clip)
      terms.append(max((v - r) ** 2, (vc - r) ** 2))
      clipped_on.append(1.0 if (vc - r) ** 2 > (v - r) ** 2 else 0.0)
  np.testing.assert_allclose(loss, 0.5 * sum(terms) / len(terms), rtol=1e-5)
  np.testing.assert_allclose(metrics["clipfrac"], sum(clipped_on) / len(terms), rtol=1e-6)
  assert 0 < metrics["clipfrac"] < 1  # the inputs exercise both cases


# ----------------------------------------------------------------------------- policy gradient


def test_leave_one_out_baseline_matches_loop():
  rewards = np.array([[1.0, 2.0, 6.0], [0.0, -3.0, 3.0]], np.float32)
  got = losses.leave_one_out_baseline(jnp.asarray(rewards))
  for p in range(2):
    for n in range(3):
      others = [float(rewards[p, k]) for k in range(3) if k != n]
      np.testing.assert_allclose(got[p, n], sum(others) / 2, rtol=1e-6)


def test_leave_one_out_baseline_needs_two_samples():
  with pytest.raises(ValueError, match="N >= 2"):
    losses.leave_one_out_baseline(jnp.ones((3, 1)))
  with pytest.raises(ValueError, match="multiple"):
    losses.policy_gradient_loss(jnp.ones(5), jnp.ones(5), 2)


def test_policy_gradient_loss_and_score_function_gradient():
  num_samples = 3
  rewards = np.array([1.0, 2.0, 6.0, 0.0, -3.0, 3.0], np.float32)  # 2 prompts x 3
  seq_logp = np.array([-3.0, -1.5, -4.0, -2.0, -2.5, -0.5], np.float32)
  advantages = []
  for i in range(6):
    p = i // num_samples
    others = [float(rewards[p * num_samples + k]) for k in range(num_samples)
              if p * num_samples + k != i]
    advantages.append(float(rewards[i]) - sum(others) / len(others))
  loss, metrics = losses.policy_gradient_loss(jnp.asarray(seq_logp), jnp.asarray(rewards),
                                              num_samples)
  np.testing.assert_allclose(
      loss, -sum(a * float(l) for a, l in zip(advantages, seq_logp)) / 6, rtol=1e-5)
  np.testing.assert_allclose(metrics["reward_mean"], np.mean(rewards), rtol=1e-6)

  # Through a toy policy: per-sample logits theta [6, V], sequence = one token y_i.
  # The gradient must be -1/6 sum_i A_i grad log softmax(theta_i)[y_i], with A fixed.
  vocab = 4
  theta = np.linspace(-1.0, 1.0, 6 * vocab).reshape(6, vocab).astype(np.float32)
  ys = np.array([0, 3, 1, 2, 2, 0])

  def loss_of_theta(th):
    lp = jax.nn.log_softmax(th)[jnp.arange(6), ys]
    return losses.policy_gradient_loss(lp, jnp.asarray(rewards), num_samples)[0]

  grad = np.asarray(jax.grad(loss_of_theta)(jnp.asarray(theta)))
  expected = np.zeros((6, vocab))
  for i in range(6):
    z = sum(math.exp(float(v)) for v in theta[i])
    for v in range(vocab):
      prob = math.exp(float(theta[i, v])) / z
      expected[i, v] = -advantages[i] * ((1.0 if v == ys[i] else 0.0) - prob) / 6
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-7)


def test_policy_gradient_baseline_is_stop_gradient():
  # Rewards computed from the log-probs (as a KL penalty does) must not be differentiated.
  seq_logp = jnp.array([-1.0, -2.0, -0.5, -3.0])
  adv = np.array([-1.0 - -2.0, -2.0 - -1.0, -0.5 - -3.0, -3.0 - -0.5])  # r = logp, N = 2
  grad = jax.grad(lambda lp: losses.policy_gradient_loss(lp, lp, 2)[0])(seq_logp)
  np.testing.assert_allclose(grad, -adv / 4, rtol=1e-6)


# ----------------------------------------------------------------------------- checks


def test_check_finite_names_the_culprit():
  losses.check_finite({"a": jnp.ones(3), "n": jnp.arange(3)}, "rollout")  # no error
  tree = {"scores": jnp.array([0.0, jnp.nan, 1.0]), "ok": jnp.zeros(2),
          "logp": jnp.array([[0.0, -jnp.inf]], jnp.bfloat16)}
  with pytest.raises(FloatingPointError, match=r"reward outputs.*'logp'.*1 inf.*'scores'.*1 NaN"):
    losses.check_finite(tree, "reward outputs")
  with pytest.raises(losses.NonFiniteError, match="loss"):
    losses.check_finite(jnp.array(jnp.inf), "loss")
