"""Policy gradient against a reward with a KL penalty (paper eq. 13, Figure 3's aligner).

Each step samples `num_samples` responses per prompt from the current policy and takes
one gradient step on REINFORCE with a leave-one-out baseline:

  R_i  = r(x, y_i) - beta * (log pi(y_i|x) - log pi_ref(y_i|x))     (stop-gradient)
  loss = -mean_i (R_i - mean_{j != i} R_j) * log pi(y_i|x)

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


@gin.configurable
class PolicyGradient(rollouts.RolloutObjective):
  """REINFORCE + leave-one-out baseline on reward - beta * KL (see the module docstring)."""

  name = "policy_gradient"

  def __init__(self, model: models_base.EncoderDecoderModel = gin.REQUIRED,
               reward: Any = gin.REQUIRED, *, beta: float = 0.1, num_samples: int = 4,
               max_decode_len: int = 64, temperature: float = 1.0, eos_id: int = 1,
               eval_num_samples: int = 4):
    if num_samples < 2:
      raise objectives.ObjectiveError(
          f"PolicyGradient.num_samples={num_samples}: the leave-one-out baseline needs >= 2.")
    super().__init__(model, reward, beta=beta, max_decode_len=max_decode_len,
                     temperature=temperature, eos_id=eos_id, eval_num_samples=eval_num_samples)
    self.num_samples = num_samples

  def _rollout(self, params, frozen, prompts, rng, num_samples):
    rollout = rollouts.sample_rollout(
        self.model, params, prompts, rng, max_decode_len=self.max_decode_len,
        num_samples=num_samples, temperature=self.temperature, eos_id=self.eos_id)
    ref_logp, _ = rollouts.token_logprobs(self.model, frozen["ref"], rollout)
    scores = self.reward(frozen["reward"], rollout.prompts, rollout.responses)
    return rollout, ref_logp.sum(-1), scores

  def loss(self, params, frozen, batch, rng):
    """`batch` is a scored rollout (see `train_step`); one row per response."""
    del frozen, rng
    # Microbatches split rows contiguously, so a prompt's samples stay adjacent.
    rollout = rollouts.Rollout.from_batch(batch, num_samples=self.num_samples,
                                          pad_id=self.model.pad_id)
    logp, logits = rollouts.token_logprobs(self.model, params, rollout)
    seq_logp = logp.sum(-1)
    kl = jax.lax.stop_gradient(seq_logp) - batch["ref_logp"]
    total = batch["scores"] - self.beta * kl
    loss, pg = losses.policy_gradient_loss(seq_logp, total, self.num_samples)
    metrics = {
        "loss": loss,
        "objective/scores": jnp.mean(batch["scores"]),
        "objective/kl": jnp.mean(kl),
        "objective/rlhf_reward": jnp.mean(total),
        "objective/entropy": jnp.mean(rollouts.sequence_entropy(
            jax.lax.stop_gradient(logits), rollout.mask)),
        "policy/advantage_abs_mean": pg["advantage_abs_mean"],
        **rollouts.response_length_metrics(rollout, self.eos_id),
    }
    return loss, metrics

  def train_step(self, state, frozen, batch, rng, *, optimizer, num_microbatches=1):
    rollout, ref_seq_logp, scores = self._rollout(state.params, frozen,
                                                  batch["prompts"], rng,
                                                  self.num_samples)
    scored = {**rollout.batch(), "ref_logp": ref_seq_logp, "scores": scores}
    # Microbatches split rows contiguously, so each holds whole prompts' sample groups.
    grads, metrics = objectives.accumulate_gradients(
        lambda p, b, r: self.loss(p, frozen, b, r), state.params, scored, rng,
        num_microbatches)
    state, step_metrics = objectives.apply_gradients(state, grads, optimizer)
    nonfinite = {objectives.NONFINITE_PREFIX + "rollout": rollouts.count_nonfinite(ref_seq_logp),
                 objectives.NONFINITE_PREFIX + "reward": rollouts.count_nonfinite(scores)}
    return state, {**metrics, **step_metrics, **nonfinite}

  def eval_step(self, params, frozen, batch, rng):
    """Reward, KL, KL to the optimum and length of samples on held-out prompts."""
    rollout, ref_seq_logp, scores = self._rollout(params, frozen,
                                                  batch["prompts"], rng,
                                                  self.eval_num_samples)
    logp, _ = rollouts.token_logprobs(self.model, params, rollout)
    return self.eval_metrics(scores, logp.sum(-1), ref_seq_logp, rollout)
