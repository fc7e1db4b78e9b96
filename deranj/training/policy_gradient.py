"""Policy gradient against a reward with a KL penalty (paper eq. 13, Figure 3's aligner).

Each step samples `num_samples` responses per prompt from the current policy and takes
one gradient step on an unbiased estimate of grad [E r - beta KL(pi || pi_ref)].
`kl_estimator` picks how the KL's share is estimated:

  'sampled' (REINFORCE on the whole objective, leave-one-out baseline):
    R_i  = r(x, y_i) - beta * (log pi(y_i|x) - log pi_ref(y_i|x))     (stop-gradient)
    loss = -mean_i (R_i - mean_{j != i} R_j) * log pi(y_i|x)
  'analytic' (REINFORCE on the reward only; the KL from per-token KLs over the vocabulary,
  `losses.kl_penalty_loss`):
    loss = -mean_i (r_i - mean_{j != i} r_j) * log pi(y_i|x) + beta * mean_i surrogate_i

Both have the same expected gradient (tests/test_pg_exact_gradient.py checks it against
the exact gradient in a closed world); 'analytic' replaces the sampled log-ratio summed
over every token, whose noise moves the policy away from the reference without raising
the reward, by its conditional expectation. It runs the reference inside the loss
(logits [B, T, V]) instead of once per rollout.

The frozen params are the reference (the INIT_CHECKPOINT SFT model) and the reward's.
Evaluation samples `eval_num_samples` responses per prompt (see `rollouts.RolloutObjective`).
"""
from __future__ import annotations

from typing import Any

import gin
import jax
import jax.numpy as jnp

from deranj.models import base as models_base
from deranj.training import losses
from deranj.training import objectives
from deranj.training import rollouts

Array = jax.Array
KL_ESTIMATORS = ("sampled", "analytic")


@gin.configurable
class PolicyGradient(rollouts.RolloutObjective):
  """REINFORCE + leave-one-out baseline on reward - beta * KL (see the module docstring)."""

  name = "policy_gradient"

  def __init__(self, model: models_base.EncoderDecoderModel = gin.REQUIRED,
               reward: Any = gin.REQUIRED, *, beta: float = 0.1, num_samples: int = 4,
               max_decode_len: int = 64, temperature: float = 1.0, eos_id: int = 1,
               eval_num_samples: int = 4, kl_estimator: str = "sampled"):
    if num_samples < 2:
      raise objectives.ObjectiveError(
          f"PolicyGradient.num_samples={num_samples}: the leave-one-out baseline needs >= 2.")
    if kl_estimator not in KL_ESTIMATORS:
      raise objectives.ObjectiveError(
          f"PolicyGradient.kl_estimator={kl_estimator!r}: expected one of {KL_ESTIMATORS}.")
    self.kl_estimator = kl_estimator
    super().__init__(model, reward, beta=beta, max_decode_len=max_decode_len,
                     temperature=temperature, eos_id=eos_id, eval_num_samples=eval_num_samples)
    self.num_samples = num_samples

  def loss(self, params, frozen, batch, rng):
    """`batch` is a scored rollout (see `train_step`); one row per response."""
    del rng
    # Microbatches split rows contiguously, so a prompt's samples stay adjacent.
    rollout = rollouts.Rollout.from_batch(batch, num_samples=self.num_samples,
                                          pad_id=self.model.pad_id)
    logp, logits = rollouts.token_logprobs(self.model, params, rollout)
    seq_logp = logp.sum(-1)
    extra = {}
    if self.kl_estimator == "sampled":
      kl = jax.lax.stop_gradient(seq_logp) - batch["ref_logp"]
      total = batch["scores"] - self.beta * kl
      loss, pg = losses.policy_gradient_loss(seq_logp, total, self.num_samples)
    else:
      ref_logp, ref_logits = rollouts.token_logprobs(self.model, frozen["ref"], rollout)
      kl = jax.lax.stop_gradient(seq_logp) - ref_logp.sum(-1)
      total = batch["scores"] - self.beta * kl
      reward_loss, pg = losses.policy_gradient_loss(seq_logp, batch["scores"],
                                                    self.num_samples)
      surrogate, analytic_kl = losses.kl_penalty_loss(
          logp, losses.token_kl(logits, ref_logits, rollout.mask), rollout.mask,
          self.num_samples)
      loss = reward_loss + self.beta * jnp.mean(surrogate)
      extra = {"objective/kl_analytic": jnp.mean(analytic_kl)}
    metrics = {
        "loss": loss,
        "objective/scores": jnp.mean(batch["scores"]),
        "objective/kl": jnp.mean(kl),
        "objective/rlhf_reward": jnp.mean(total),
        **extra,
        "objective/entropy": jnp.mean(rollouts.sequence_entropy(
            jax.lax.stop_gradient(logits), rollout.mask)),
        "policy/advantage_abs_mean": pg["advantage_abs_mean"],
        **rollouts.response_length_metrics(rollout, self.eos_id),
    }
    return loss, metrics

  def train_step(self, state, frozen, batch, rng, *, optimizer, num_microbatches=1):
    sampled_kl = self.kl_estimator == "sampled"  # else the loss runs the reference
    rollout, ref_seq_logp, scores = self.scored_rollout(
        state.params, frozen, batch["prompts"], rng, self.num_samples, with_ref=sampled_kl)
    scored = {**rollout.batch(), "scores": scores}
    if sampled_kl:
      scored["ref_logp"] = ref_seq_logp
    # Microbatches split rows contiguously, so each holds whole prompts' sample groups.
    grads, metrics = objectives.accumulate_gradients(
        lambda p, b, r: self.loss(p, frozen, b, r), state.params, scored, rng,
        num_microbatches)
    state, step_metrics = objectives.apply_gradients(state, grads, optimizer)
    nonfinite = {objectives.NONFINITE_PREFIX + "reward": rollouts.count_nonfinite(scores)}
    if sampled_kl:
      nonfinite[objectives.NONFINITE_PREFIX + "rollout"] = rollouts.count_nonfinite(
          ref_seq_logp)
    return state, {**metrics, **step_metrics, **nonfinite}
