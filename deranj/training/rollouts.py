"""What the on-policy objectives (PPO, policy gradient) share: sampling responses from the
current policy with deranj's sampler, scoring them, and per-token log-probabilities.

Rewards are objects with frozen params, so a learned reward model's weights enter the
jitted step as arguments (sharded like any params), not as constants:

    reward = LengthReward(l_min=40, l_max=50)       # paper eq. 10
    reward = LearnedReward('/runs/reward_model')    # a trained RewardModelObjective run
    scores = reward(reward.params(), prompts, responses)   # [B]
"""
from __future__ import annotations

import copy
from typing import Any, Optional

import flax
import gin
import jax
import jax.numpy as jnp

from deranj import decoding
from deranj import rewards
from deranj.models import base as models_base
from deranj.training import losses
from deranj.training import objectives

Array = jax.Array
Params = Any


@gin.configurable
class LengthReward:
  """0 when the response has l_min..l_max tokens (EOS excluded), else -1 (eq. 10).

  `pad_id` fills responses after EOS: None takes the policy's when a `RolloutObjective`
  uses the reward (0, T5's, when called alone).
  """

  def __init__(self, l_min: int = 40, l_max: int = 50, eos_id: int = 1,
               pad_id: Optional[int] = None):
    if not 0 <= l_min <= l_max:
      raise ValueError(f"LengthReward: need 0 <= l_min <= l_max, got {l_min}, {l_max}.")
    self.l_min, self.l_max, self.eos_id, self.pad_id = l_min, l_max, eos_id, pad_id

  def params(self) -> Params:
    return {}

  def logical_axes(self) -> Any:
    return {}

  def __call__(self, params: Params, prompts: Array, responses: Array) -> Array:
    del params, prompts
    pad_id = 0 if self.pad_id is None else self.pad_id
    return rewards.length_reward(rewards.response_lengths(responses, self.eos_id, pad_id),
                                 self.l_min, self.l_max)


def reward_for_policy(reward: Any, model: models_base.Model, owner: str) -> Any:
  """`reward` reading responses padded with the policy's pad_id: a copy of a LengthReward
  without one gets the policy's; a reward whose PAD differs from the policy's is refused
  (it would count the fill after EOS as tokens, or a real token as PAD)."""
  policy_pad = getattr(model, "pad_id", 0)  # objectives built without a model: T5's
  if isinstance(reward, LengthReward):
    if reward.pad_id is None:
      reward = copy.copy(reward)
      reward.pad_id = policy_pad
    pad_id, what = reward.pad_id, "LengthReward.pad_id"
  elif isinstance(reward, LearnedReward):
    pad_id, what = reward.model.pad_id, f"the pad_id of the reward model {reward.checkpoint}"
  else:
    return reward
  if pad_id != policy_pad:
    raise objectives.ObjectiveError(
        f"{owner}: {what} is {pad_id}, the policy's pad_id {policy_pad} (which fills its "
        "responses after EOS); they must agree.")
  return reward


def check_reachable(reward: Any, max_decode_len: int, owner: str) -> None:
  """Fails early when no response of at most `max_decode_len` tokens can earn a length
  reward: every score would be -1 and the run would learn nothing from the reward."""
  if isinstance(reward, LengthReward) and reward.l_min > max_decode_len:
    raise ValueError(
        f"{owner}: LengthReward wants {reward.l_min}..{reward.l_max} tokens but responses "
        f"stop at max_decode_len={max_decode_len}, so every response would score -1; "
        f"bind LengthReward.l_min / l_max (e.g. to %L_MIN / %L_MAX).")


def check_temperature(temperature: float, owner: str) -> None:
  """Refuses rollouts at temperature != 1.

  The objective, reward - beta * KL(pi_theta || pi_ref), is about pi_theta itself: the
  KL penalty, PPO's ratios and the score-function gradient all take log pi_theta of
  the sampled tokens, which is only right when the tokens were sampled from pi_theta.
  Scoring the tempered distribution instead would optimise pi_theta^(1/T), not the
  exported model. So the sampler must run at T = 1.
  """
  if temperature != 1.0:
    raise objectives.ObjectiveError(
        f"{owner}.temperature={temperature}: the KL-regularised objective needs rollouts "
        f"sampled from the policy itself (temperature 1); remove the binding "
        f"{owner}.temperature.")


class RolloutObjective(objectives.Objective):
  """What PPO and policy gradient share: a policy sampled on prompts, scored by `reward`,
  with a KL penalty of strength `beta` against the frozen starting model (`ref`).

  Evaluation samples `eval_num_samples` responses per held-out prompt and logs, besides
  reward and KL, `objective/kl_to_optimum`: KL(pi || pi*(beta)) estimated from them
  (`losses.kl_to_optimum`), 0 only at the objective's optimum.
  """

  required_features = ("prompts",)

  def __init__(self, model: models_base.EncoderDecoderModel, reward: Any, *, beta: float,
               max_decode_len: int, temperature: float, eos_id: int, eval_num_samples: int):
    owner = type(self).__name__
    check_reachable(reward, max_decode_len, owner)
    check_temperature(temperature, owner)
    if not beta > 0:
      raise objectives.ObjectiveError(f"{owner}.beta={beta}: the KL strength must be > 0.")
    if eval_num_samples < 2:
      raise objectives.ObjectiveError(
          f"{owner}.eval_num_samples={eval_num_samples}: the KL to the optimum needs >= 2 "
          "samples per evaluation prompt (4 or more recommended).")
    self.model, self.beta = model, beta
    self.reward = reward_for_policy(reward, model, owner)
    self.max_decode_len, self.temperature, self.eos_id = max_decode_len, temperature, eos_id
    self.eval_num_samples = eval_num_samples

  def eval_metrics(self, scores: Array, logp: Array, ref_logp: Array,
                   rollout: Rollout) -> dict[str, Array]:
    """Evaluation metrics of `eval_num_samples` samples per prompt: sequence scores and
    log-probabilities [P * S]."""
    return {"objective/scores": jnp.mean(scores),
            "objective/kl": jnp.mean(logp - ref_logp),
            "objective/kl_to_optimum": losses.kl_to_optimum(
                scores, logp, ref_logp, self.beta, self.eval_num_samples),
            **response_length_metrics(rollout, self.eos_id)}

  def scored_rollout(self, params: Params, frozen: Params, prompts: Array, rng: Array,
                     num_samples: int, with_ref: bool = True
                     ) -> tuple[Rollout, Optional[Array], Array]:
    """`num_samples` responses per prompt from the policy `params`: (the rollout, the
    reference's summed log-probs of them [B] (None without `with_ref`), scores [B])."""
    rollout = sample_rollout(self.model, params, prompts, rng,
                             max_decode_len=self.max_decode_len, num_samples=num_samples,
                             temperature=self.temperature, eos_id=self.eos_id)
    ref_seq_logp = None
    if with_ref:
      ref_logp, _ = token_logprobs(self.model, frozen["ref"], rollout)
      ref_seq_logp = ref_logp.sum(-1)
    scores = self.reward(frozen["reward"], rollout.prompts, rollout.responses)
    return rollout, ref_seq_logp, scores

  def eval_step(self, params, frozen, batch, rng):
    """Reward, KL, KL to the optimum and length of the policy's samples on held-out prompts."""
    rollout, ref_seq_logp, scores = self.scored_rollout(params, frozen, batch["prompts"], rng,
                                                        self.eval_num_samples)
    logp, _ = token_logprobs(self.model, params, rollout)
    return self.eval_metrics(scores, logp.sum(-1), ref_seq_logp, rollout)

  def frozen_params(self, base_params: Params) -> dict[str, Params]:
    return {"ref": base_params, "reward": self.reward.params()}

  def frozen_logical_axes(self) -> dict[str, Any]:
    return {"ref": self.model.logical_axes(), "reward": self.reward.logical_axes()}


@gin.configurable
class LearnedReward:
  """The reward model exported by a `reward_model` run (its MODEL_DIR or model/ dir)."""

  def __init__(self, checkpoint: str = gin.REQUIRED):
    from deranj.training import reward_model  # pylint: disable=g-import-not-at-top
    self.model, self._params = reward_model.load_reward_model(checkpoint)
    self.checkpoint = checkpoint

  def params(self) -> Params:
    return self._params

  def logical_axes(self) -> Any:
    return self.model.logical_axes()

  def __call__(self, params: Params, prompts: Array, responses: Array) -> Array:
    return self.model.rewards(params, prompts, responses)


@flax.struct.dataclass
class Rollout:
  """Sampled responses, one row each (B = prompts x samples)."""
  prompts: Array  # [B, S], each prompt repeated for its samples
  responses: Array  # [B, T], pad_id after EOS
  mask: Array  # [B, T] float32, 1 on response tokens (EOS included)
  num_samples: int = flax.struct.field(pytree_node=False, default=1)  # per prompt, adjacent
  pad_id: int = flax.struct.field(pytree_node=False, default=0)  # the policy's

  @property
  def unique_prompts(self) -> Array:
    """Each prompt once: [B / num_samples, S]."""
    return self.prompts[::self.num_samples]

  def batch(self) -> dict[str, Array]:
    """A model batch (deranj.models.base); `from_batch` reads it back."""
    return {"prompts": self.prompts, "responses": self.responses, "loss_weights": self.mask}

  @classmethod
  def from_batch(cls, batch, **static) -> "Rollout":
    return cls(prompts=batch["prompts"], responses=batch["responses"],
               mask=batch["loss_weights"], **static)


def sample_rollout(model: models_base.EncoderDecoderModel, params: Params, prompts: Array,
                   rng: Array, *, max_decode_len: int, num_samples: int = 1,
                   temperature: float = 1.0, eos_id: int = 1) -> Rollout:
  """Samples `num_samples` responses per prompt (full vocabulary); jit-friendly. The
  sampler fills rows after EOS with the model's pad_id (never emitted), so the mask is
  `tokens != pad_id`: with NO_PAD, id 0 is a response token like any other."""
  out = decoding.sample(model, jax.lax.stop_gradient(params), prompts, rng,
                        max_decode_len=max_decode_len, eos_id=eos_id, temperature=temperature,
                        num_decodes=num_samples)
  tokens = out.tokens
  return Rollout(prompts=jnp.repeat(prompts, num_samples, axis=0), responses=tokens,
                 mask=(tokens != model.pad_id).astype(jnp.float32), num_samples=num_samples,
                 pad_id=model.pad_id)


def token_logprobs(model: models_base.EncoderDecoderModel, params: Params,
                   rollout: Rollout) -> tuple[Array, Array]:
  """(log-probabilities of the response tokens [B, T], 0 on padding; logits [B, T, V]) of
  the distribution the sampler draws from: PAD's logit masked (`decoding.mask_pad`), as
  the policy never emits it, so gradients and KLs are of the sampled policy. A prompt's
  samples share one encoding."""
  return decoding.sampled_token_logprobs(model, params, rollout.unique_prompts,
                                         rollout.responses)


def count_nonfinite(*arrays: Array) -> Array:
  return sum(jnp.sum(~jnp.isfinite(a)) for a in arrays).astype(jnp.float32)


def sequence_entropy(logits: Array, mask: Array) -> Array:
  """Sum over response tokens of the per-token entropy: [B]."""
  return jnp.sum(losses.entropy_from_logits(logits) * mask, axis=-1)


def response_length_metrics(rollout: Rollout, eos_id: int = 1) -> dict[str, Array]:
  lengths = rewards.response_lengths(rollout.responses, eos_id, rollout.pad_id)
  return {"response/length": jnp.mean(lengths.astype(jnp.float32))}
