"""PPO with a per-token KL penalty, GAE and a value model (Figure 2's aligner).

Each trainer step is one rollout batch:
  1. sample a response per prompt from the current policy (temperature 1, full vocab);
  2. score it; per-token rewards -beta * (log pi - log pi_ref), plus the score at the
     last response token (`losses.kl_penalised_rewards`);
  3. values from the value model; GAE with `gamma` and `gae_lambda`; advantages whitened;
  4. `num_epochs` passes over the rollout in `num_minibatches` shuffled minibatches, each
     an optimizer update of the clipped policy loss + `vf_coef` x the clipped value loss.
Evaluation samples `eval_num_samples` responses per prompt (see `rollouts.RolloutObjective`).

Params: {"policy": model, "value": {"trunk": model, "head": {kernel [D, 1], bias [1]}}}.
The value model is a separate copy of the SFT model; its value at response position t is
a linear head on the final (normed) hidden state there (`model.hidden_states`), which
has seen the prompt and the response before t. Its updates are scaled by
`value_learning_rate_multiplier` (the paper: policy 5e-6, value 1e-5, so 2). The
optimizer's own step count (and so its schedule) counts minibatch updates.
"""
from __future__ import annotations

from typing import Any

import gin
import jax
import jax.numpy as jnp
import optax

from deranj.models import base as models_base
from deranj.training import losses
from deranj.training import objectives
from deranj.training import rollouts

Array = jax.Array
P = jax.sharding.PartitionSpec


@gin.configurable
class PPO(rollouts.RolloutObjective):
  """See the module docstring. Metric names follow TRL's PPO trainer."""

  name = "ppo"

  def __init__(self, model: models_base.Model = gin.REQUIRED,
               reward: Any = gin.REQUIRED, *, beta: float = 0.1, max_decode_len: int = 64,
               num_epochs: int = 4, num_minibatches: int = 1, clip_eps: float = 0.2,
               clip_value: float = 0.2, gamma: float = 1.0, gae_lambda: float = 0.95,
               vf_coef: float = 0.1, value_learning_rate_multiplier: float = 2.0,
               whiten_rewards: bool = False, temperature: float = 1.0, eos_id: int = 1,
               eval_num_samples: int = 4):
    if num_epochs < 1 or num_minibatches < 1:
      raise objectives.ObjectiveError(
          f"PPO: num_epochs ({num_epochs}) and num_minibatches ({num_minibatches}) must be >= 1.")
    super().__init__(model, reward, beta=beta, max_decode_len=max_decode_len,
                     temperature=temperature, eos_id=eos_id, eval_num_samples=eval_num_samples)
    self.num_epochs, self.num_minibatches = num_epochs, num_minibatches
    self.updates_per_step = num_epochs * num_minibatches
    self.clip_eps, self.clip_value, self.gamma, self.gae_lambda = (
        clip_eps, clip_value, gamma, gae_lambda)
    self.vf_coef = vf_coef
    self.value_learning_rate_multiplier = value_learning_rate_multiplier
    self.whiten_rewards = whiten_rewards

  # ------------------------------------------------------------------ params

  def init_params(self, rng, base_params):
    d = self.model.hidden_size
    dtype = self.model.config.param_dtype
    head = {"kernel": jnp.zeros((d, 1), dtype), "bias": jnp.zeros((1,), dtype)}
    del rng  # a zero head: values start at 0, so early advantages are the rewards
    return {"policy": base_params,
            "value": {"trunk": jax.tree_util.tree_map(jnp.copy, base_params), "head": head}}

  def param_logical_axes(self):
    axes = self.model.logical_axes()
    return {"policy": axes,
            "value": {"trunk": axes, "head": {"kernel": P(models_base.EMBED, None),
                                                "bias": P(None)}}}

  def policy_params(self, params):
    return params["policy"]

  # ------------------------------------------------------------------ pieces

  def values(self, value_params, rollout: rollouts.Rollout) -> Array:
    """Value estimates [B, T] at each response position (0 on padding)."""
    hidden = self.model.hidden_states(value_params["trunk"], rollout.prompts,
                                      rollout.responses)  # [B, T, D]
    head = value_params["head"]
    values = hidden.astype(jnp.float32) @ head["kernel"][:, 0] + head["bias"][0]
    return values * rollout.mask

  def _score_rollout(self, params, frozen, prompts, rng, num_samples=1):
    policy = jax.lax.stop_gradient(params["policy"])
    rollout = rollouts.sample_rollout(self.model, policy, prompts, rng,
                                      max_decode_len=self.max_decode_len,
                                      num_samples=num_samples, temperature=self.temperature,
                                      eos_id=self.eos_id)
    logp, logits = rollouts.token_logprobs(self.model, policy, rollout)
    ref_logp, _ = rollouts.token_logprobs(self.model, frozen["ref"], rollout)
    scores = self.reward(frozen["reward"], rollout.prompts, rollout.responses)
    return rollout, logp, logits, ref_logp, scores

  # ------------------------------------------------------------------ steps

  def _minibatch_loss(self, params, mb):
    rollout = mb["rollout"]
    logp, _ = rollouts.token_logprobs(self.model, params["policy"], rollout)
    policy_loss, pm = losses.ppo_policy_loss(logp, mb["old_logp"], mb["advantages"],
                                             rollout.mask, self.clip_eps)
    values = self.values(params["value"], rollout)
    value_loss, vm = losses.ppo_value_loss(values, mb["old_values"], mb["returns"],
                                           rollout.mask, self.clip_value)
    loss = policy_loss + self.vf_coef * value_loss
    return loss, {"loss": loss, "loss/policy": policy_loss, "loss/value": value_loss,
                  "policy/clipfrac": pm["clipfrac"], "policy/approxkl": pm["approxkl"],
                  "val/clipfrac": vm["clipfrac"]}

  def train_step(self, state, frozen, batch, rng, *, optimizer, num_microbatches=1):
    del num_microbatches  # minibatches play that part here
    rollout_rng, shuffle_rng = jax.random.split(rng)
    rollout, old_logp, logits, ref_logp, scores = self._score_rollout(
        state.params, frozen, batch["prompts"], rollout_rng)
    mask = rollout.mask
    old_values = self.values(state.params["value"], rollout)
    token_rewards, kl = losses.kl_penalised_rewards(scores, old_logp, ref_logp, mask,
                                                    self.beta)
    if self.whiten_rewards:
      token_rewards = losses.masked_whiten(token_rewards, mask, shift_mean=False)
    advantages, returns = losses.gae_advantages(token_rewards, old_values, mask,
                                                self.gamma, self.gae_lambda)
    advantages = losses.masked_whiten(advantages, mask)
    buffer = jax.lax.stop_gradient({"rollout": rollout, "old_logp": old_logp,
                                    "old_values": old_values, "advantages": advantages,
                                    "returns": returns})

    rows = mask.shape[0]
    if rows % self.num_minibatches:
      raise objectives.ObjectiveError(
          f"PPO: batch {rows} is not divisible by PPO.num_minibatches={self.num_minibatches}.")
    orders = jax.vmap(lambda r: jax.random.permutation(r, rows))(
        jax.random.split(shuffle_rng, self.num_epochs))
    minibatches = orders.reshape(self.num_epochs * self.num_minibatches, -1)

    def update(carry, index):
      params, opt_state = carry
      mb = jax.tree_util.tree_map(lambda x: x[index], buffer)
      grads, metrics = jax.grad(self._minibatch_loss, has_aux=True)(params, mb)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      updates["value"] = jax.tree_util.tree_map(
          lambda u: u * self.value_learning_rate_multiplier, updates["value"])
      metrics["grad_norm"] = optax.global_norm(grads)
      return (optax.apply_updates(params, updates), opt_state), metrics

    (params, opt_state), metrics = jax.lax.scan(update, (state.params, state.opt_state),
                                                minibatches)
    metrics = jax.tree_util.tree_map(jnp.mean, metrics)
    non_score = -self.beta * kl.sum(-1)
    metrics.update({
        "objective/kl": jnp.mean(kl.sum(-1)),
        "objective/entropy": jnp.mean(rollouts.sequence_entropy(logits, mask)),
        "objective/non_score_reward": jnp.mean(non_score),
        "objective/rlhf_reward": jnp.mean(scores + non_score),
        "objective/scores": jnp.mean(scores),
        **rollouts.response_length_metrics(rollout, self.eos_id),
        objectives.NONFINITE_PREFIX + "rollout": rollouts.count_nonfinite(old_logp, ref_logp,
                                                                 old_values),
        objectives.NONFINITE_PREFIX + "reward": rollouts.count_nonfinite(scores),
    })
    state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return state, metrics

  def eval_step(self, params, frozen, batch, rng):
    """Reward, KL, KL to the optimum and length of samples on held-out prompts."""
    rollout, logp, _, ref_logp, scores = self._score_rollout(
        params, frozen, batch["prompts"], rng, self.eval_num_samples)
    return self.eval_metrics(scores, logp.sum(-1), ref_logp.sum(-1), rollout)
