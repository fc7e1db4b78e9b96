"""What an objective gives the trainer, and supervised fine-tuning (SFT).

The trainer owns the loop, data, optimizer, checkpoints and metrics; an objective owns
what one step computes. Its pieces:

  init_params(rng, base_params)   trainable params, from the INIT_CHECKPOINT model params
  frozen_params(base_params)      arrays the step reads but never updates (a reference
                                  model); passed to the jitted step as an argument, not
                                  baked into it, and never checkpointed
  prepare_features(features, frozen, batch_size)  once, before the loop
  loss(params, frozen, batch, rng) -> (loss, metrics)
  train_step(state, frozen, batch, rng, optimizer, num_microbatches) -> (state, metrics)
                                  default: gradient of `loss`, accumulated over
                                  microbatches; PPO overrides it with rollouts
  evaluate(params, frozen, split, rng, batch_size) -> metrics   (host side)
  policy_params(params)           the policy's params to export as the run's model
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Optional, Sequence

import flax
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax

from deranj import decoding
from deranj import text_metrics
from deranj.data import tokenizer
from deranj.models import base as models_base

Array = jax.Array
Params = Any
Batch = Mapping[str, Array]
Metrics = dict[str, Array]


# Metrics whose key starts with this count NaN/inf an objective found (in a rollout
# buffer, in reward-model outputs); the trainer stops the run when any is > 0.
NONFINITE_PREFIX = "nonfinite/"


class ObjectiveError(ValueError):
  """A task or setting the objective cannot train on; the message says which."""


@dataclasses.dataclass(frozen=True)
class EvalData:
  """An evaluation split: features int32 [N, L], texts N strings each, and the task's
  `decode(ids) -> str` (its vocabulary)."""
  features: Mapping[str, np.ndarray]
  texts: Mapping[str, list[str]]
  decode: Callable[[Sequence[int]], str]


@flax.struct.dataclass
class TrainState:
  """Everything a checkpoint holds: the step, trainable params and optimizer state."""
  step: Array  # int32 scalar
  params: Params
  opt_state: Any


def _split_microbatches(batch: Batch, num_microbatches: int) -> Batch:
  def split(x):
    return x.reshape((num_microbatches, x.shape[0] // num_microbatches) + x.shape[1:])
  return jax.tree_util.tree_map(split, batch)


def accumulate_gradients(loss_fn, params: Params, batch: Batch, rng: Array,
                         num_microbatches: int) -> tuple[Params, Metrics]:
  """Mean gradient and metrics of `loss_fn(params, batch, rng)` over equal microbatches.

  Each microbatch's loss is its own token mean, so with ragged lengths this is the mean
  of microbatch means (as T5X without loss normalisation), not the full-batch token mean.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if num_microbatches <= 1:
    (_, metrics), grads = grad_fn(params, batch, rng)
    return grads, metrics
  micro = _split_microbatches(batch, num_microbatches)
  rngs = jax.random.split(rng, num_microbatches)

  def body(carry, xs):
    grads_sum, metrics_sum = carry
    mb, mb_rng = xs
    (_, metrics), grads = grad_fn(params, mb, mb_rng)
    add = functools.partial(jax.tree_util.tree_map, jnp.add)
    return (add(grads_sum, grads), add(metrics_sum, metrics)), None

  first = jax.tree_util.tree_map(lambda x: x[0], micro)
  metrics_shape = jax.eval_shape(lambda: grad_fn(params, first, rngs[0])[0][1])
  zeros = (jax.tree_util.tree_map(jnp.zeros_like, params),
           jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), metrics_shape))
  (grads, metrics), _ = jax.lax.scan(body, zeros, (micro, rngs))
  scale = lambda x: x / num_microbatches  # noqa: E731
  return jax.tree_util.tree_map(scale, grads), jax.tree_util.tree_map(scale, metrics)


def apply_gradients(state: TrainState, grads: Params, optimizer: optax.GradientTransformation
                    ) -> tuple[TrainState, Metrics]:
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
  return new_state, {"grad_norm": optax.global_norm(grads)}


class Objective:
  """Base class; see the module docstring. Subclasses set `self.model`."""

  name = "objective"
  required_features: Sequence[str] = ("prompts",)
  # Optimizer updates per train step (PPO: epochs x minibatches); the learning-rate
  # schedule counts train steps, so the trainer divides the optimizer's count by this.
  updates_per_step: int = 1

  model: models_base.EncoderDecoderModel

  # ------------------------------------------------------------------ params

  def init_params(self, rng: Array, base_params: Optional[Params]) -> Params:
    del rng
    return base_params

  def param_logical_axes(self) -> Any:
    return self.model.logical_axes()

  def frozen_params(self, base_params: Optional[Params]) -> Params:
    del base_params
    return {}

  def frozen_logical_axes(self) -> Any:
    return {}

  def policy_params(self, params: Params) -> Params:
    return params

  def export(self, directory: str, params: Params, **metadata) -> None:
    """Writes the trained policy as a deranj model directory (`loading.load_model` reads it)."""
    from deranj.models import loading  # pylint: disable=g-import-not-at-top
    loading.save_model(directory, self.model, jax.device_get(self.policy_params(params)),
                       **metadata)

  def prepare_features(self, features: Mapping[str, np.ndarray], frozen: Params,
                       batch_size: int) -> Mapping[str, np.ndarray]:
    """Called once on the training split before the loop; may add columns computed from
    the frozen params (e.g. DPO's reference log-probabilities). Default: unchanged."""
    del frozen, batch_size
    return features

  def check_features(self, features: Mapping[str, Any], where: str) -> None:
    missing = [f for f in self.required_features if f not in features]
    if missing:
      raise ObjectiveError(f"the {self.name} objective needs features {missing}, which "
                           f"{where} does not have (has {sorted(features)}); pick a task "
                           "of the right kind with the gin binding `train.task`.")

  # ------------------------------------------------------------------ steps

  def loss(self, params: Params, frozen: Params, batch: Batch, rng: Array
           ) -> tuple[Array, Metrics]:
    raise NotImplementedError

  def train_step(self, state: TrainState, frozen: Params, batch: Batch, rng: Array, *,
                 optimizer: optax.GradientTransformation, num_microbatches: int = 1
                 ) -> tuple[TrainState, Metrics]:
    loss_fn = lambda p, b, r: self.loss(p, frozen, b, r)  # noqa: E731
    grads, metrics = accumulate_gradients(loss_fn, state.params, batch, rng, num_microbatches)
    state, step_metrics = apply_gradients(state, grads, optimizer)
    return state, {**metrics, **step_metrics}

  def eval_step(self, params: Params, frozen: Params, batch: Batch, rng: Array) -> Metrics:
    """Metrics of one evaluation batch (no dropout); averaged over batches by the caller."""
    return self.loss(params, frozen, batch, None)[1]

  def evaluate(self, params: Params, frozen: Params, data: EvalData, rng: Array,
               batch_size: int) -> dict[str, float]:
    """Example-weighted means of `eval_step` over the evaluation split."""
    from deranj.data import pipeline  # pylint: disable=g-import-not-at-top
    step = _jitted_eval_step(self)
    totals: dict[str, float] = {}
    count = 0
    for i, batch in enumerate(pipeline.eval_batches(data.features, batch_size)):
      n = len(next(iter(batch.values())))
      metrics = jax.device_get(step(params, frozen, batch, jax.random.fold_in(rng, i)))
      for k, v in metrics.items():
        totals[k] = totals.get(k, 0.0) + float(v) * n
      count += n
    return {k: v / max(count, 1) for k, v in totals.items()}


@functools.lru_cache(maxsize=None)
def _jitted_eval_step(objective: Objective):
  return jax.jit(objective.eval_step)


@gin.configurable
class SFT(Objective):
  """Teacher-forced cross-entropy on a summarization task's (inputs, targets).

  Evaluation adds ROUGE-1/2/L of greedy decodes of the first `rouge_examples` prompts of
  the evaluation split against their reference texts.
  """

  name = "sft"
  required_features = ("prompts", "responses")

  def __init__(self, model: models_base.EncoderDecoderModel = gin.REQUIRED, *,
               rouge_examples: int = 32, max_decode_len: int = 64):
    self.model = model
    self.rouge_examples = rouge_examples
    self.max_decode_len = max_decode_len

  def loss(self, params, frozen, batch, rng):
    del frozen
    return self.model.loss_fn(params, batch, rng)

  def eval_step(self, params, frozen, batch, rng):
    metrics = self.loss(params, frozen, batch, None)[1]
    return {k: metrics[k] for k in ("loss", "accuracy")}

  def evaluate(self, params, frozen, data, rng, batch_size):
    metrics = super().evaluate(params, frozen, data, rng, batch_size)
    features = data.features
    n = min(self.rouge_examples, len(features["prompts"]))
    if n and "targets" in data.texts:
      predictions = []
      for start in range(0, n, batch_size):
        prompts = features["prompts"][start:min(start + batch_size, n)]
        out = decoding.sample(self.model, params, prompts, rng,
                              max_decode_len=self.max_decode_len, temperature=0.0)
        predictions += [data.decode(tokenizer.response_ids(t)) for t in np.asarray(out.tokens)]
      metrics.update(text_metrics.rouge_scores(predictions, data.texts["targets"][:n]))
    return metrics
