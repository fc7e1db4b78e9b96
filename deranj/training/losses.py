"""Losses of the alignment objectives: reward model, DPO/IPO, PPO and policy gradient.

Pure functions of arrays, jit-friendly except `check_finite` (host side). Definitions
follow TRL's where it has one (named in each docstring) so results are comparable.

Shapes: B = batch (sequences), T = response length, P = prompts, N = samples per
prompt, V = vocab. A `mask` [B, T] is 1.0 on response tokens (EOS included) and 0.0
after; it may be bool or float.

Token-level cross-entropy for supervised training lives in `deranj.models.losses`.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


# ----------------------------------------------------------------------------- statistics


def masked_mean(x: Array, mask: Array, axis=None) -> Array:
  """sum(x * mask) / sum(mask) over `axis` (all axes when None).

  Args:
    x: [...] values.
    mask: weights broadcastable to `x`, usually 0/1.
    axis: axis or tuple of axes to reduce; None reduces everything.

  Returns:
    The masked mean, `x`'s shape without `axis`; 0.0 where the mask is empty (not
    NaN, so an empty batch cannot poison a loss or its gradient).
  """
  mask = jnp.broadcast_to(mask, x.shape).astype(jnp.float32)
  total = jnp.sum(x * mask, axis=axis)
  count = jnp.sum(mask, axis=axis)
  return jnp.where(count > 0, total / jnp.where(count > 0, count, 1.0), 0.0)


def masked_var(x: Array, mask: Array, unbiased: bool = True) -> Array:
  """Variance of the masked entries of `x` (a scalar); TRL's `masked_var`.

  With `unbiased`, Bessel's correction n / (n - 1) for n = sum(mask). TRL raises for
  n <= 1; under jit this cannot, so n <= 1 gives the biased variance (0 for n = 1).
  """
  mean = masked_mean(x, mask)
  var = masked_mean(jnp.square(x - mean), mask)
  if unbiased:
    n = jnp.sum(jnp.broadcast_to(mask, x.shape).astype(jnp.float32))
    var = var * jnp.where(n > 1, n / jnp.where(n > 1, n - 1, 1.0), 1.0)
  return var


def masked_whiten(x: Array, mask: Array, shift_mean: bool = True) -> Array:
  """(x - mean) / sqrt(var + 1e-8) with masked statistics; TRL's `masked_whiten`.

  Args:
    x: [...] values, e.g. advantages [B, T].
    mask: [...] 0/1; only masked-in entries enter the mean and the unbiased variance.
    shift_mean: when False the mean is added back (scale only), as TRL does for rewards.

  Returns:
    [...] whitened `x`. Masked-out entries are transformed too (losses mask them).
  """
  mean = masked_mean(x, mask)
  var = masked_var(x, mask, unbiased=True)
  whitened = (x - mean) * jax.lax.rsqrt(var + 1e-8)
  if not shift_mean:
    whitened = whitened + mean
  return whitened


def entropy_from_logits(logits: Array) -> Array:
  """Entropy of softmax(logits) in nats: [..., V] -> [...] float32.

  Logits must be finite (this codebase masks with -1e10, never -inf).
  """
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  probs = jax.nn.softmax(logits, axis=-1)
  # H = log Z - E_p[logit]; avoids forming log p (TRL's formula).
  return log_z - jnp.sum(probs * logits, axis=-1)


# ----------------------------------------------------------------------------- preferences


def bradley_terry_loss(chosen_rewards: Array, rejected_rewards: Array) -> tuple[Array, Array]:
  """Reward-model loss on preference pairs: mean -log sigmoid(r_chosen - r_rejected).

  Args:
    chosen_rewards: [B] rewards of the preferred responses.
    rejected_rewards: [B] rewards of the other responses.

  Returns:
    (loss, accuracy), scalars. Accuracy counts r_chosen > r_rejected; a tie counts
    1/2, so an untrained (constant) reward model scores chance, 0.5.
  """
  margin = (chosen_rewards - rejected_rewards).astype(jnp.float32)
  loss = -jnp.mean(jax.nn.log_sigmoid(margin))
  accuracy = jnp.mean(jnp.where(margin > 0, 1.0, jnp.where(margin == 0, 0.5, 0.0)))
  return loss, accuracy


def dpo_loss(policy_chosen_logps: Array, policy_rejected_logps: Array,
             ref_chosen_logps: Array, ref_rejected_logps: Array, beta: float,
             loss_type: str = "sigmoid") -> tuple[Array, Array, Array]:
  """Per-pair DPO (Rafailov et al. 2023) or IPO (Azar et al. 2023) loss; TRL's `dpo_loss`.

  With h = (logpi(y_w) - logpi(y_l)) - (logref(y_w) - logref(y_l)):
    "sigmoid": -log sigmoid(beta * h)       (the paper's Appendix C)
    "ipo":     (h - 1 / (2 * beta))^2        (TRL feeds IPO per-token mean log-probs;
                                              that is the caller's choice of input)

  Args:
    policy_chosen_logps: [B] log pi_theta(y_w | x), summed over response tokens.
    policy_rejected_logps: [B] log pi_theta(y_l | x).
    ref_chosen_logps: [B] log pi_ref(y_w | x).
    ref_rejected_logps: [B] log pi_ref(y_l | x).
    beta: the KL strength (DeRa's beta, which lam later rescales).
    loss_type: "sigmoid" or "ipo".

  Returns:
    (losses [B], chosen_rewards [B], rejected_rewards [B]); the implicit rewards
    beta * (logpi - logref) carry no gradient (they are metrics).

  Raises:
    ValueError: for any other `loss_type`.
  """
  if loss_type not in ("sigmoid", "ipo"):
    raise ValueError(f"dpo_loss: loss_type={loss_type!r}; expected 'sigmoid' or 'ipo'.")
  logits = ((policy_chosen_logps - policy_rejected_logps)
            - (ref_chosen_logps - ref_rejected_logps)).astype(jnp.float32)
  if loss_type == "sigmoid":
    losses = -jax.nn.log_sigmoid(beta * logits)
  else:
    losses = jnp.square(logits - 1.0 / (2.0 * beta))
  chosen_rewards = jax.lax.stop_gradient(beta * (policy_chosen_logps - ref_chosen_logps))
  rejected_rewards = jax.lax.stop_gradient(beta * (policy_rejected_logps - ref_rejected_logps))
  return losses, chosen_rewards, rejected_rewards


# ----------------------------------------------------------------------------- PPO


def kl_penalised_rewards(scores: Array, logprobs: Array, ref_logprobs: Array, mask: Array,
                         beta: float) -> tuple[Array, Array]:
  """Per-token PPO rewards: -beta * KL estimate, plus the sequence score at the end.

  TRL's `compute_rewards` with the "kl" estimator logpi - logpi_ref: summed over a
  sampled response it is an unbiased estimate of KL(pi || pi_ref) (eq. 13).

  Args:
    scores: [B] sequence rewards (reward model or eq. 10's length reward).
    logprobs: [B, T] log pi_theta of the sampled tokens.
    ref_logprobs: [B, T] log pi_ref of the same tokens.
    mask: [B, T] response tokens.
    beta: KL coefficient.

  Returns:
    (rewards [B, T], kl [B, T]), both 0 at masked positions. Each row's score is
    added at its last unmasked token; a row with an empty mask gets no score.
  """
  mask = mask.astype(jnp.float32)
  kl = (logprobs - ref_logprobs).astype(jnp.float32) * mask
  t = mask.shape[-1]
  last = jnp.max(jnp.where(mask > 0, jnp.arange(t), -1), axis=-1)  # [B], -1 if empty
  at_last = jax.nn.one_hot(last, t, dtype=jnp.float32)  # one_hot(-1) is all zeros
  rewards = -beta * kl + scores.astype(jnp.float32)[:, None] * at_last
  return rewards, kl


def gae_advantages(rewards: Array, values: Array, mask: Array, gamma: float,
                   gae_lambda: float) -> tuple[Array, Array]:
  """Generalised advantage estimation (Schulman et al. 2016), backwards in time.

    delta_t = r_t + gamma * V_{t+1} - V_t
    A_t = delta_t + gamma * gae_lambda * A_{t+1}

  with V and A taken as 0 at masked positions, so the value after a row's last
  token is 0 (the episode ends at EOS) and rewards/values after it contribute
  nothing. The mask is meant as a prefix; a hole would end the episode there.

  Args:
    rewards: [B, T] per-token rewards (e.g. from `kl_penalised_rewards`).
    values: [B, T] value predictions at each response token.
    mask: [B, T] response tokens.
    gamma: discount.
    gae_lambda: GAE's bias/variance trade-off.

  Returns:
    (advantages [B, T], returns [B, T] = advantages + values), 0 where masked.
    Not whitened: apply `masked_whiten` to the advantages if wanted.
  """
  mask = mask.astype(jnp.float32)
  rewards = rewards.astype(jnp.float32) * mask
  values = values.astype(jnp.float32) * mask

  def step(carry, xs):
    next_value, next_adv = carry  # [B], 0 past the end
    r, v, m = xs
    adv = (r + gamma * next_value - v + gamma * gae_lambda * next_adv) * m
    return (v, adv), adv

  zeros = jnp.zeros(rewards.shape[:1], jnp.float32)
  # Scan over time: inputs [T, B].
  _, adv_t = jax.lax.scan(step, (zeros, zeros), (rewards.T, values.T, mask.T), reverse=True)
  advantages = adv_t.T
  returns = (advantages + values) * mask
  return advantages, returns


def ppo_policy_loss(logprobs: Array, old_logprobs: Array, advantages: Array, mask: Array,
                    clip_eps: float) -> tuple[Array, dict[str, Array]]:
  """PPO's clipped surrogate (Schulman et al. 2017), token-level as in TRL.

  With ratio = exp(logprobs - old_logprobs), per token
    max(-A * ratio, -A * clip(ratio, 1 - clip_eps, 1 + clip_eps)),
  averaged over masked-in tokens.

  Args:
    logprobs: [B, T] log pi_theta of the sampled tokens under the current params.
    old_logprobs: [B, T] the same at rollout time (no gradient).
    advantages: [B, T] (no gradient), usually whitened.
    mask: [B, T] response tokens.
    clip_eps: the clipping range epsilon.

  Returns:
    (loss scalar, metrics): "clipfrac" (share of tokens where the clipped term is the
    larger, i.e. active), "approxkl" 0.5 * mean((logp - old)^2), "ratio" mean ratio.
  """
  old_logprobs = jax.lax.stop_gradient(old_logprobs)
  advantages = jax.lax.stop_gradient(advantages)
  log_ratio = logprobs - old_logprobs
  ratio = jnp.exp(log_ratio)
  unclipped = -advantages * ratio
  clipped = -advantages * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
  loss = masked_mean(jnp.maximum(unclipped, clipped), mask)
  metrics = {
      "clipfrac": masked_mean((clipped > unclipped).astype(jnp.float32), mask),
      "approxkl": 0.5 * masked_mean(jnp.square(log_ratio), mask),
      "ratio": masked_mean(ratio, mask),
  }
  return loss, jax.lax.stop_gradient(metrics)


def ppo_value_loss(values: Array, old_values: Array, returns: Array, mask: Array,
                   clip_value: float) -> tuple[Array, dict[str, Array]]:
  """PPO's clipped value loss, TRL's: 0.5 * mean(max((V - R)^2, (V_clip - R)^2)).

  V_clip = old_values + clip(values - old_values, -clip_value, clip_value) keeps the
  value head from moving far from its rollout-time predictions in one update.

  Args:
    values: [B, T] current value predictions.
    old_values: [B, T] predictions at rollout time (no gradient).
    returns: [B, T] targets, e.g. from `gae_advantages` (no gradient).
    mask: [B, T] response tokens.
    clip_value: the clipping range.

  Returns:
    (loss scalar, {"clipfrac": share of tokens where the clipped error is larger}).
  """
  old_values = jax.lax.stop_gradient(old_values)
  returns = jax.lax.stop_gradient(returns)
  clipped_values = old_values + jnp.clip(values - old_values, -clip_value, clip_value)
  unclipped = jnp.square(values - returns)
  clipped = jnp.square(clipped_values - returns)
  loss = 0.5 * masked_mean(jnp.maximum(unclipped, clipped), mask)
  clipfrac = masked_mean((clipped > unclipped).astype(jnp.float32), mask)
  return loss, {"clipfrac": jax.lax.stop_gradient(clipfrac)}


# ----------------------------------------------------------------------------- policy gradient


def leave_one_out_baseline(rewards: Array) -> Array:
  """Each sample's baseline: the mean reward of the other N - 1 samples of its prompt.

  Args:
    rewards: [P, N] rewards, N samples per prompt.

  Returns:
    [P, N] baselines (sum_row - r) / (N - 1); independent of the sample's own reward,
    so subtracting it keeps the policy gradient unbiased.

  Raises:
    ValueError: if N < 2 (no other sample to average).
  """
  if rewards.ndim != 2 or rewards.shape[1] < 2:
    raise ValueError(f"leave_one_out_baseline: rewards must be [P, N] with N >= 2 samples "
                     f"per prompt, got shape {rewards.shape}.")
  n = rewards.shape[1]
  return (jnp.sum(rewards, axis=1, keepdims=True) - rewards) / (n - 1)


def policy_gradient_loss(seq_logprobs: Array, rewards: Array,
                         num_samples: int) -> tuple[Array, dict[str, Array]]:
  """REINFORCE with a leave-one-out baseline (the paper's eq. 13 for summarization).

  loss = -mean_i(stop_gradient(R_i - b_i) * log pi_theta(y_i | x_i)), so its gradient
  is the score-function estimate -mean_i (R_i - b_i) grad log pi_theta(y_i | x_i). For
  eq. 13, pass R_i = reward - beta * (log pi_theta(y_i) - log pi_ref(y_i)); the whole
  advantage is stop-gradient, so the KL term is treated as a reward too.

  Args:
    seq_logprobs: [P * N] log pi_theta(y | x) summed over each response's tokens.
    rewards: [P * N] rewards; row p * N + n is sample n of prompt p (as the sampler's
      `num_decodes` lays them out).
    num_samples: N >= 2.

  Returns:
    (loss scalar, metrics: "reward_mean", "reward_std", "advantage_abs_mean",
    "seq_logprob_mean").

  Raises:
    ValueError: if the batch is not a multiple of `num_samples` or N < 2.
  """
  batch = seq_logprobs.shape[0]
  if batch % num_samples:
    raise ValueError(f"policy_gradient_loss: batch {batch} is not a multiple of "
                     f"num_samples={num_samples}.")
  grouped = rewards.astype(jnp.float32).reshape(batch // num_samples, num_samples)
  advantages = (grouped - leave_one_out_baseline(grouped)).reshape(batch)
  advantages = jax.lax.stop_gradient(advantages)
  loss = -jnp.mean(advantages * seq_logprobs)
  metrics = {
      "reward_mean": jnp.mean(rewards),
      "reward_std": jnp.std(rewards),
      "advantage_abs_mean": jnp.mean(jnp.abs(advantages)),
      "seq_logprob_mean": jnp.mean(seq_logprobs),
  }
  return loss, jax.lax.stop_gradient(metrics)


def token_kl(policy_logits: Array, ref_logits: Array, mask: Array) -> Array:
  """KL(pi(.|x, y_<t) || pi_ref(.|x, y_<t)) at each response position, summed over the
  vocabulary: [B, T, V] x 2 -> [B, T] float32, 0 where `mask` is 0.

  Logits as the sampler draws from them (PAD masked with a finite -1e10: its
  probability is 0 under both, so it adds 0).
  """
  logp = jax.nn.log_softmax(policy_logits.astype(jnp.float32), axis=-1)
  logq = jax.nn.log_softmax(ref_logits.astype(jnp.float32), axis=-1)
  return jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1) * mask


def kl_penalty_loss(token_logprobs: Array, token_kls: Array, mask: Array,
                    num_samples: int) -> tuple[Array, Array]:
  """A loss whose gradient estimates grad KL(pi_theta || pi_ref) from sampled responses,
  with the per-token KLs computed exactly instead of the sampled log-ratio.

  KL(pi || pi_ref) = E_y sum_t k_t(y_<t) with k_t the analytic per-token KL
  (`token_kl`), so its gradient is E_y [sum_t grad k_t + sum_t grad log pi(y_t|y_<t)
  * G_t], G_t = sum_{s>t} k_s (k_s does not depend on y_t for s <= t). The second term
  subtracts from G_t the mean G_t of the prompt's other samples at the same position
  (independent of this sample, so unbiased). Same expectation as REINFORCE on
  -(log pi - log pi_ref), far lower variance: no sampled log-ratio.

  Args:
    token_logprobs: [P * N, T] log pi(y_t | x, y_<t), 0 on padding; differentiable.
    token_kls: [P * N, T] `token_kl`, differentiable.
    mask: [P * N, T] response tokens.
    num_samples: N; rows p * N .. p * N + N - 1 share prompt p. N = 1: no baseline.

  Returns:
    (per-row surrogate [P * N] whose mean is the loss; the analytic sequence KL [P * N],
    sum_t k_t, stop-gradient).
  """
  mask = mask.astype(jnp.float32)
  k = token_kls * mask
  kl_to_go = jax.lax.stop_gradient(jnp.cumsum(k[:, ::-1], axis=1)[:, ::-1] - k)
  if num_samples > 1:
    b, t = kl_to_go.shape
    grouped = kl_to_go.reshape(b // num_samples, num_samples, t)
    baseline = (jnp.sum(grouped, axis=1, keepdims=True) - grouped) / (num_samples - 1)
    kl_to_go = (grouped - baseline).reshape(b, t)
  surrogate = jnp.sum(k, axis=1) + jnp.sum(token_logprobs * mask * kl_to_go, axis=1)
  return surrogate, jax.lax.stop_gradient(jnp.sum(k, axis=1))


# ----------------------------------------------------------------------------- optimum


def kl_to_optimum(rewards: Array, logp: Array, logp_ref: Array, beta: float,
                  num_samples: int) -> Array:
  """KL(pi || pi*(beta)) estimated from samples of pi, averaged over prompts.

  pi*(beta) = pi_ref exp(r / beta) / Z_beta maximises r - beta * KL(pi || pi_ref). With
  R = r - beta * (log pi - log pi_ref) on responses y ~ pi(.|x), E_pi[exp(R / beta)] =
  Z_beta, so per prompt

    KL(pi || pi*(beta)) = log E_pi[exp(R / beta)] - E_pi[R / beta].

  Each prompt's S samples estimate both expectations (log-mean-exp minus mean). The
  estimate is >= 0, exactly 0 when pi = pi*(beta) (R is then constant), and biased low
  by about Var(exp(R / beta)) / (2 S E[exp(R / beta)]^2) (Jensen), so compare runs at
  one S.

  Args:
    rewards: [P * S] r(x, y); row p * S + s is sample s of prompt p (the sampler's
      `num_decodes` layout).
    logp: [P * S] log pi(y | x), summed over the response's tokens.
    logp_ref: [P * S] log pi_ref(y | x).
    beta: the KL strength (> 0).
    num_samples: S >= 2.

  Returns:
    The mean over the P prompts of their estimates, a float32 scalar.

  Raises:
    ValueError: for beta <= 0, S < 2, or rows not a multiple of S.
  """
  if not beta > 0:
    raise ValueError(f"kl_to_optimum: beta must be > 0, got {beta}.")
  rows = rewards.shape[0]
  if num_samples < 2 or rows % num_samples or not rewards.shape == logp.shape == logp_ref.shape:
    raise ValueError(f"kl_to_optimum: rewards {rewards.shape}, logp {logp.shape} and logp_ref "
                     f"{logp_ref.shape} must be [P * S] with S = num_samples = {num_samples} "
                     ">= 2 samples per prompt.")
  z = (rewards.astype(jnp.float32) / beta
       - (logp.astype(jnp.float32) - logp_ref.astype(jnp.float32)))
  z = z.reshape(rows // num_samples, num_samples)
  # Centred first: log-mean-exp(z - mean z) is the difference, without cancellation.
  z = z - jnp.mean(z, axis=1, keepdims=True)
  per_prompt = jax.nn.logsumexp(z, axis=1) - jnp.log(num_samples)
  return jnp.mean(per_prompt)


# ----------------------------------------------------------------------------- checks


class NonFiniteError(FloatingPointError):
  """NaN or inf where finite numbers were required (a rollout, a reward, a loss)."""


def check_finite(tree: Any, what: str) -> None:
  """Raises `NonFiniteError` naming `what` and each leaf holding NaN or inf.

  Host side: it fetches the leaves, so call it outside jit (e.g. on rollout outputs
  or reward-model scores before they enter an update). Integer leaves are skipped.

  Args:
    tree: a pytree of arrays (or one array).
    what: what the tree is, for the message, e.g. "reward model scores".
  """
  problems = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    arr = np.asarray(leaf)
    if not jnp.issubdtype(arr.dtype, jnp.inexact):
      continue
    if jnp.issubdtype(arr.dtype, jnp.floating) and arr.dtype.itemsize < 4:
      arr = arr.astype(np.float32)  # bfloat16 / float16: NumPy ufuncs on float32
    finite = np.isfinite(arr)
    if finite.all():
      continue
    first = tuple(int(i) for i in np.argwhere(~finite)[0])
    name = jax.tree_util.keystr(path) or "<array>"
    problems.append(f"{name}: {int(np.isnan(arr).sum())} NaN and {int(np.isinf(arr).sum())} "
                    f"inf of {arr.size} values (first at index {first})")
  if problems:
    raise NonFiniteError(f"{what} contains non-finite values: " + "; ".join(problems))
