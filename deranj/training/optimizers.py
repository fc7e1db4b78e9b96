"""Optimizers and learning-rate schedules, built from gin.

    make_optimizer.name = 'adafactor'           # or 'adamw'
    learning_rate_schedule.base_learning_rate = 1e-3
    learning_rate_schedule.kind = 'rsqrt'       # 'constant' | 'rsqrt' | 'cosine'
    learning_rate_schedule.warmup_steps = 1000

Every schedule warms up linearly from 0 over `warmup_steps` (none when 0). After it:
  constant  base
  rsqrt     base * sqrt(warmup_steps / step)   (T5's inverse square root; base at warmup end)
  cosine    base -> base * final_fraction along a half cosine ending at `total_steps`
"""
from __future__ import annotations

from typing import Optional

import gin
import jax.numpy as jnp
import optax

SCHEDULES = ("constant", "rsqrt", "cosine")
OPTIMIZERS = ("adafactor", "adamw")


class OptimizerConfigError(ValueError):
  """A bad optimizer or schedule setting; the message names the gin binding."""


@gin.configurable
def learning_rate_schedule(total_steps: int, *, base_learning_rate: float = 1e-3,
                           kind: str = "constant", warmup_steps: int = 0,
                           final_fraction: float = 0.0) -> optax.Schedule:
  """step -> learning rate (see the module docstring)."""
  if kind not in SCHEDULES:
    raise OptimizerConfigError(
        f"learning_rate_schedule.kind={kind!r}: expected one of {SCHEDULES}.")
  if warmup_steps < 0 or base_learning_rate <= 0:
    raise OptimizerConfigError(
        "learning_rate_schedule: warmup_steps must be >= 0 and base_learning_rate > 0, got "
        f"{warmup_steps} and {base_learning_rate}.")
  if kind == "cosine" and total_steps <= warmup_steps:
    raise OptimizerConfigError(
        f"learning_rate_schedule: cosine decay needs more steps ({total_steps}) than "
        f"warmup_steps ({warmup_steps}).")

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = jnp.float32(max(warmup_steps, 1))
    warmup = base_learning_rate * jnp.minimum(step / warm, 1.0) if warmup_steps else (
        jnp.float32(base_learning_rate))
    if kind == "constant":
      return warmup
    if kind == "rsqrt":
      return jnp.where(step < warm, warmup,
                       base_learning_rate * jnp.sqrt(warm / jnp.maximum(step, warm)))
    progress = jnp.clip((step - warmup_steps) / (total_steps - warmup_steps), 0.0, 1.0)
    cosine = final_fraction + (1 - final_fraction) * 0.5 * (1 + jnp.cos(jnp.pi * progress))
    return jnp.where(step < warmup_steps, warmup, base_learning_rate * cosine)

  return schedule


@gin.configurable
def make_optimizer(schedule: optax.Schedule, *, name: str = "adamw",
                   weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-8, clip_norm: Optional[float] = 1.0,
                   adafactor_momentum: Optional[float] = None
                   ) -> optax.GradientTransformation:
  """Global-norm clipping (when `clip_norm`), then Adafactor or AdamW at `schedule`.

  Adafactor keeps optax's defaults (factored second moments, update clipping at 1,
  relative step scaled by the parameter RMS), the T5 setting.
  """
  if name not in OPTIMIZERS:
    raise OptimizerConfigError(f"make_optimizer.name={name!r}: expected one of {OPTIMIZERS}.")
  if name == "adamw":
    inner = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
  else:
    inner = optax.adafactor(schedule, momentum=adafactor_momentum,
                            weight_decay_rate=weight_decay or None)
  if clip_norm:
    return optax.chain(optax.clip_by_global_norm(clip_norm), inner)
  return inner


def per_train_step(schedule: optax.Schedule, updates_per_step: int) -> optax.Schedule:
  """The schedule as the optimizer sees it when each train step makes `updates_per_step`
  updates (PPO's epochs x minibatches): the rate of train step count // updates_per_step,
  so warmup and decay are in train steps for every objective."""
  if updates_per_step == 1:
    return schedule
  return lambda count: schedule(count // updates_per_step)

