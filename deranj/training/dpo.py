"""Direct preference optimisation (DPO; Rafailov et al. 2023) and IPO (Azar et al. 2023).

    train.objective = @DPO()
    DPO.model = @build_model()
    DPO.beta = %BETA
    train.task = %PREFERENCE_TASK            # features: prompt, chosen_*, rejected_*
    train.init_checkpoint = %INIT_CHECKPOINT # the SFT model: policy start and reference

The loss is the paper's Appendix C:

    -log sigmoid(beta * [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))])

with ref = the INIT_CHECKPOINT (SFT) model, frozen. Its log-probabilities come from the
frozen params inside each step (no gradient), or, with `precompute_reference`, once for
the whole training split before the loop (columns `reference_{chosen,rejected}_logps`);
the step uses those columns when the batch has them. Metrics are named as TRL's.
The exported model is the policy.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping, Optional

import gin
import jax
import jax.numpy as jnp
import numpy as np

from deranj.data import batching
from deranj.data import pipeline
from deranj.models import base as models_base
from deranj.training import losses
from deranj.training import objectives

Array = jax.Array
Params = Any

LOSS_TYPES = ("sigmoid", "ipo")
REFERENCE_COLUMNS = ("reference_chosen_logps", "reference_rejected_logps")


def sequence_logps(model: models_base.EncoderDecoderModel, params: Params,
                   batch: Mapping[str, Array], dropout_rng: Optional[Array] = None
                   ) -> tuple[Array, Array, Array, Array]:
  """Summed response log-probabilities of both sides of a preference batch.

  Args:
    model: the policy (or reference) model.
    params: its params.
    batch: prompts [B, S], chosen_responses and rejected_responses [B, T].
    dropout_rng: dropout only when given.

  Returns:
    (chosen_logps [B], rejected_logps [B], chosen_lengths [B], rejected_lengths [B]),
    float32; logps are `model.sequence_logprobs` (tokens other than the model's
    pad_id, EOS included, one [2B] forward pass), lengths the number of those tokens.
  """
  prompts = batch["prompts"]
  responses = jnp.concatenate([batch[f"{side}_responses"]
                               for side in pipeline.PREFERENCE_SIDES], axis=0)
  logps = model.sequence_logprobs(params, jnp.concatenate([prompts, prompts], axis=0),
                                  responses, dropout_rng=dropout_rng)
  lengths = jnp.sum(responses != model.pad_id, axis=-1).astype(jnp.float32)
  b = prompts.shape[0]
  return logps[:b], logps[b:], lengths[:b], lengths[b:]


@gin.configurable
class DPO(objectives.Objective):
  """DPO/IPO against the frozen INIT_CHECKPOINT model; see the module docstring.

  Metrics (TRL's names), means over the batch's pairs:
    loss
    rewards/chosen, rewards/rejected  implicit rewards beta * (log pi - log ref)
    rewards/margins                   rewards/chosen - rewards/rejected
    rewards/accuracies                share of pairs with chosen reward > rejected
    logps/chosen, logps/rejected      log pi of the responses
  For IPO the log-probabilities are per-token means (as TRL), so are these metrics.
  """

  name = "dpo"
  required_features = ("prompts",) + tuple(
      f"{side}_responses" for side in pipeline.PREFERENCE_SIDES)

  def __init__(self, model: models_base.EncoderDecoderModel = gin.REQUIRED, *,
               beta: float = 0.1, loss_type: str = "sigmoid",
               precompute_reference: bool = False, dropout: bool = False):
    """DPO or IPO with `model` as the policy and the frozen reference.

    Args:
      model: the policy's architecture (also the reference's).
      beta: the KL strength; the paper's D.3 uses 0.1.
      loss_type: "sigmoid" (DPO) or "ipo".
      precompute_reference: compute the reference log-probs of the training split once
        before the loop rather than in every step (one forward pass less per step).
      dropout: dropout in the policy's forward pass. Off by default, as TRL's
        `disable_dropout`: with it the policy's log-probs differ from the reference's
        even at step 0, which biases the loss and the implicit rewards.

    Raises:
      objectives.ObjectiveError: for a bad `loss_type` or `beta`.
    """
    if loss_type not in LOSS_TYPES:
      raise objectives.ObjectiveError(f"DPO.loss_type={loss_type!r}: expected one of "
                                      f"{LOSS_TYPES}.")
    if not beta > 0:
      raise objectives.ObjectiveError(f"DPO.beta={beta}: must be > 0.")
    self.model = model
    self.beta = float(beta)
    self.loss_type = loss_type
    self.precompute_reference = precompute_reference
    self.dropout = dropout

  # ------------------------------------------------------------------ params

  def frozen_params(self, base_params):
    return base_params  # the trainer gives frozen trees their own buffers

  def frozen_logical_axes(self):
    return self.model.logical_axes()

  # ------------------------------------------------------------------ reference

  def reference_logps(self, frozen: Params, batch: Mapping[str, Array]) -> tuple[Array, Array]:
    """Summed reference log-probs (chosen [B], rejected [B]); no gradient."""
    chosen, rejected, _, _ = sequence_logps(self.model, frozen, batch)
    return jax.lax.stop_gradient(chosen), jax.lax.stop_gradient(rejected)

  def prepare_features(self, features, frozen, batch_size):
    """With `precompute_reference`, adds float32 [N] columns REFERENCE_COLUMNS."""
    if not self.precompute_reference:
      return features
    score = _jitted_reference_logps(self)
    n = len(features["prompts"])
    names = self.required_features
    chosen, rejected = batching.map_in_fixed_batches(
        lambda *batch: score(frozen, dict(zip(names, batch))),
        [features[k] for k in names], batch_size)
    columns = {REFERENCE_COLUMNS[0]: chosen.astype(np.float32),
               REFERENCE_COLUMNS[1]: rejected.astype(np.float32)}
    losses.check_finite(columns, f"reference log-probabilities of the {n} training pairs")
    return {**features, **columns}

  # ------------------------------------------------------------------ loss

  def loss(self, params, frozen, batch, rng):
    dropout_rng = rng if self.dropout else None
    chosen, rejected, chosen_len, rejected_len = sequence_logps(self.model, params, batch,
                                                                dropout_rng)
    if REFERENCE_COLUMNS[0] in batch:
      ref_chosen, ref_rejected = (batch[k] for k in REFERENCE_COLUMNS)
    else:
      ref_chosen, ref_rejected = self.reference_logps(frozen, batch)
    if self.loss_type == "ipo":
      # IPO's margin target 1 / (2 beta) is set for per-token mean log-probs (TRL).
      chosen, ref_chosen = chosen / chosen_len, ref_chosen / chosen_len
      rejected, ref_rejected = rejected / rejected_len, ref_rejected / rejected_len
    pair_losses, chosen_rewards, rejected_rewards = losses.dpo_loss(
        chosen, rejected, ref_chosen, ref_rejected, self.beta, self.loss_type)
    loss = jnp.mean(pair_losses)
    metrics = {
        "loss": loss,
        "rewards/chosen": jnp.mean(chosen_rewards),
        "rewards/rejected": jnp.mean(rejected_rewards),
        "rewards/margins": jnp.mean(chosen_rewards - rejected_rewards),
        "rewards/accuracies": jnp.mean((chosen_rewards > rejected_rewards).astype(jnp.float32)),
        "logps/chosen": jnp.mean(jax.lax.stop_gradient(chosen)),
        "logps/rejected": jnp.mean(jax.lax.stop_gradient(rejected)),
    }
    return loss, metrics


@functools.lru_cache(maxsize=None)
def _jitted_reference_logps(objective: DPO):
  return jax.jit(objective.reference_logps)
