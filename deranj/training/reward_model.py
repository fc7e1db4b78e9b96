"""Reward-model training: a `RewardModel` fit to preference pairs.

    train.objective = @RewardModelObjective()
    RewardModelObjective.model = @build_model()
    train.task = %PREFERENCE_TASK            # features: prompt, chosen_*, rejected_*
    train.init_checkpoint = %INIT_CHECKPOINT # the SFT model (paper, Appendix D)

The reward model reuses the INIT_CHECKPOINT model's network (a T5's embedder and encoder,
the decoder dropped; a decoder-only model's all but an untied output head) and adds a
linear head (`deranj.rewards.RewardModel`). The loss is the
Bradley-Terry loss -log sigmoid(r(x, y_w) - r(x, y_l)). The run's `model/` directory
holds the reward model, which `load_reward_model` reads back for a later stage (PPO,
policy gradient, or scoring samples).
"""
from __future__ import annotations

import functools
import json
import os
from typing import Any, Optional

import flax.serialization
import gin
import jax
import jax.numpy as jnp
import numpy as np

from deranj import rewards
from deranj.data import pipeline
from deranj.models import base as models_base
from deranj.models import loading
from deranj.training import checkpoints
from deranj.training import losses
from deranj.training import objectives

Array = jax.Array
Params = Any

# The `kind` a reward model's deranj_model.json carries (a policy's has none).
KIND = "reward_model"
PREFERENCE_FEATURES = ("prompts", "chosen_responses", "rejected_responses")


def pair_metrics(chosen: Array, rejected: Array) -> dict[str, Array]:
  """Bradley-Terry loss and accuracy of rewards [B], [B], plus their means."""
  loss, accuracy = losses.bradley_terry_loss(chosen, rejected)
  return {"loss": loss, "accuracy": accuracy,
          "rewards/chosen": jnp.mean(chosen), "rewards/rejected": jnp.mean(rejected),
          "rewards/margins": jnp.mean(chosen - rejected)}


@gin.configurable
class RewardModelObjective(objectives.Objective):
  """Bradley-Terry training of a reward model on (prompt, chosen, rejected) pairs.

  Metrics: `loss`, `accuracy` (share of pairs with r_chosen > r_rejected, ties 1/2),
  `rewards/{chosen,rejected,margins}` (means). Evaluation reports the same on the
  held-out pairs, from all of their rewards at once, after checking them for NaN/inf.
  """

  name = "reward_model"
  required_features = PREFERENCE_FEATURES

  def __init__(self, model: models_base.Model = gin.REQUIRED, *,
               head_init_scale: float = 0.0, dropout: bool = False):
    """A reward model over `model`'s encoder.

    Args:
      model: the INIT_CHECKPOINT's architecture; its network (a T5's encoder) becomes the
        reward model's.
      head_init_scale: the head starts at N(0, head_init_scale^2 / d_model). Zero: a
        constant reward model at step 0 (loss log 2, accuracy 1/2), with no arbitrary
        direction to unlearn; a little faster here (held-out accuracy 0.93 against 0.88
        after 60 smoke-preset steps with scale 1).
      dropout: dropout while training. Off by default, as TRL's `disable_dropout`: the
        two rewards of a pair then see the same network, so the margin is not noise.
    """
    self.model = model
    self.reward_model = rewards.RewardModel(model, head_init_scale=head_init_scale)
    self.dropout = dropout

  def init_params(self, rng, base_params):
    return self.reward_model.init_params(rng, base_params)

  def param_logical_axes(self):
    return self.reward_model.logical_axes()

  def export(self, directory: str, params: Params, **metadata) -> None:
    save_reward_model(directory, self.reward_model, params, **metadata)

  def pair_rewards(self, params: Params, batch, dropout_rng: Optional[Array] = None
                   ) -> tuple[Array, Array]:
    """Rewards of the chosen and the rejected responses: ([B], [B]) float32.

    Both sides run as one [2B] batch, so they share dropout's draw only by chance.
    """
    prompt = batch["prompts"]
    responses = jnp.concatenate([batch["chosen_responses"], batch["rejected_responses"]],
                                axis=0)
    both = self.reward_model.rewards(params, jnp.concatenate([prompt, prompt], axis=0),
                                     responses, dropout_rng)
    return both[:prompt.shape[0]], both[prompt.shape[0]:]

  def loss(self, params, frozen, batch, rng):
    del frozen
    chosen, rejected = self.pair_rewards(params, batch, rng if self.dropout else None)
    metrics = pair_metrics(chosen, rejected)
    return metrics["loss"], metrics

  def evaluate(self, params, frozen, data, rng, batch_size):
    del frozen, rng
    score = _jitted_pair_rewards(self)
    chosen, rejected = [], []
    for batch in pipeline.eval_batches(data.features, batch_size):
      c, r = jax.device_get(score(params, {k: batch[k] for k in PREFERENCE_FEATURES}))
      chosen.append(c)
      rejected.append(r)
    scores = {"chosen": np.concatenate(chosen), "rejected": np.concatenate(rejected)}
    losses.check_finite(scores, f"reward model scores of {len(scores['chosen'])} held-out "
                        "pairs (the reward model's params hold NaN/inf, or it diverged)")
    return {k: float(v) for k, v in pair_metrics(scores["chosen"], scores["rejected"]).items()}


@functools.lru_cache(maxsize=None)
def _jitted_pair_rewards(objective: RewardModelObjective):
  return jax.jit(lambda params, batch: objective.pair_rewards(params, batch))


# ----------------------------------------------------------------------------- files


def save_reward_model(directory: str, reward_model: rewards.RewardModel, params: Params,
                      **metadata) -> None:
  """Writes deranj_model.json (the backbone's config, kind "reward_model", pad/eos ids,
  pooling) and params.msgpack, atomically (`loading.save_model`)."""
  loading.save_model(directory, reward_model.backbone, jax.device_get(params), **metadata,
                     kind=KIND, reward_model={"pad_id": reward_model.pad_id,
                                              "eos_id": reward_model.eos_id,
                                              "pooling": reward_model.backbone.pooling})


def load_reward_model(directory: str) -> tuple[rewards.RewardModel, Params]:
  """(RewardModel, params) from `save_reward_model`'s directory or a reward-model run's
  MODEL_DIR (its `model/`).

  Raises:
    loading.ModelLoadError: naming the path, if it is not a reward model or does not
      match its config.
  """
  export = os.path.join(directory, checkpoints.MODEL_EXPORT_DIR)
  if os.path.isdir(export):
    directory = export
  path = os.path.join(directory, loading.CONFIG_FILE)
  if not os.path.isfile(path):
    raise loading.ModelLoadError(f"{directory} is not a reward model directory (no "
                                 f"{loading.CONFIG_FILE}).")
  try:
    with open(path) as f:
      info = json.load(f)
    if info.get("kind") != KIND:
      raise loading.ModelLoadError(f"{path} describes a {info.get('kind') or 'policy'} "
                                   "model, not a reward model.")
    backbone = loading.model_from_record(info)
    settings = info[KIND]
    reward_model = rewards.RewardModel(backbone, pad_id=settings["pad_id"],
                                       eos_id=settings["eos_id"])
  except loading.ModelLoadError:
    raise
  except (json.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError) as e:
    raise loading.ModelLoadError(f"{path} is not a reward model config: {e!r}") from None
  config = backbone.config
  msgpack = os.path.join(directory, loading.MSGPACK_FILE)
  try:
    with open(msgpack, "rb") as f:
      params = flax.serialization.msgpack_restore(f.read())
  except Exception as e:  # msgpack raises several types on bad bytes
    raise loading.ModelLoadError(f"cannot read {msgpack}: {e}") from None
  if jax.tree_util.tree_map(np.shape, params) != reward_model.param_shapes():
    raise loading.ModelLoadError(f"{directory}: reward model parameters do not match the "
                                 f"config in {loading.CONFIG_FILE}.")
  params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, config.param_dtype), params)
  return reward_model, params
