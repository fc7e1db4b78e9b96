"""The training loop: one loop, many objectives, everything from gin (T5X's train.py).

    train.model_dir = %MODEL_DIR
    train.objective = @SFT()
    SFT.model = @build_model()
    build_model.config = @T5Config()     # or @DecoderConfig(): a decoder-only model

A run resumes from the latest checkpoint in MODEL_DIR. Batch k and the step's rng depend
on (seed, k) alone, so a resumed run takes exactly the steps an uninterrupted one would.
The seed is derived from SEED, the objective and its β (`run_seed`), so runs of a β sweep
draw their own batches and rollouts; `train.derive_seed = False` uses SEED as is (common
random numbers across runs). A non-finite loss stops the run, naming the step, before
anything after the last good checkpoint is saved. One run at a time holds MODEL_DIR.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import os
import signal
import threading
import time
from typing import Any, Callable, Mapping, Optional

import gin
import jax
import jax.numpy as jnp
import numpy as np

from deranj import partitioning
from deranj.data import files
from deranj.data import settings  # noqa: F401  (the data settings' gin names)
from deranj.models import build  # noqa: F401  (gin: build_model, T5Config, DecoderConfig)
from deranj.training import checkpoints
from deranj.training import metrics as metrics_lib
from deranj.training import objectives
from deranj.training import optimizers

class TrainingError(ValueError):
  """A training setting that cannot work; the message names the gin binding."""


class TrainingDivergedError(FloatingPointError):
  """A non-finite loss or gradient; the message names the step and the last checkpoint."""


class TrainingInterrupted(KeyboardInterrupt):
  """Ctrl-C during the loop; the message names the last checkpoint."""


def _check_settings(**settings) -> None:
  for name in ("num_steps", "batch_size", "log_every", "checkpoint_every", "num_microbatches"):
    if settings[name] < 1:
      raise TrainingError(f"train.{name} must be >= 1, got {settings[name]}.")
  if settings["batch_size"] % settings["num_microbatches"]:
    raise TrainingError(f"train.batch_size={settings['batch_size']} is not divisible by "
                        f"train.num_microbatches={settings['num_microbatches']}.")


def _seed_salt(seed: int, objective: objectives.Objective) -> str:
  beta = getattr(objective, "beta", None)
  return f"{seed}/{objective.name}" + ("" if beta is None else f"/beta={float(beta)!r}")


def run_seed(seed: int, objective: objectives.Objective, derive: bool = True) -> int:
  """The seed a run uses: `seed` itself, or (`derive`) a stable hash of it with the
  objective's name and KL strength β, so that models retrained at β/λ are not copies of
  one trajectory of batches and rollouts."""
  if not derive:
    return seed
  digest = hashlib.sha256(_seed_salt(seed, objective).encode()).digest()
  return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def log_interval(log_every: int, num_steps: int) -> int:
  """Steps between progress lines: `log_every`, or less so that a run logs at least every
  ~10% of its steps."""
  return min(log_every, max(1, num_steps // 10))


def _mean_metrics(pending: list[tuple[int, dict]]) -> dict[str, float]:
  keys = pending[-1][1].keys()
  return {k: float(np.mean([m[k] for _, m in pending])) for k in keys}


def _first_bad_step(pending: list[tuple[int, dict]]) -> Optional[tuple[int, str]]:
  for step, metrics in pending:
    # The objective's own counts first (rollouts, rewards): they name the source.
    for key, value in metrics.items():
      if key.startswith(objectives.NONFINITE_PREFIX) and float(value) > 0:
        what = key[len(objectives.NONFINITE_PREFIX):]
        return step, f"{int(value)} non-finite values in the {what} ({key})"
    for key in ("loss", "grad_norm"):
      if key in metrics and not math.isfinite(float(metrics[key])):
        return step, f"{key} is {float(metrics[key])}"
  return None


@gin.configurable(denylist=["stream"])
def train(*, model_dir: str = gin.REQUIRED, objective: objectives.Objective = gin.REQUIRED,
          task: str = gin.REQUIRED, num_steps: int = gin.REQUIRED,
          batch_size: int = gin.REQUIRED, inputs_length: int = 512, targets_length: int = 64,
          init_checkpoint: Optional[str] = None, seed: int = 0, derive_seed: bool = True,
          num_microbatches: int = 1,
          log_every: int = 50, checkpoint_every: int = 500, keep_checkpoints: Optional[int] = 3,
          eval_every: int = 0, eval_split: Optional[str] = "validation",
          eval_examples: Optional[int] = 256, eval_batch_size: Optional[int] = None,
          max_train_examples: Optional[int] = None, partitioner: Any = None,
          eval_hook: Optional[Callable[[Any, int], Mapping[str, float]]] = None,
          stream=None) -> dict[str, Any]:
  """Trains `objective` on `task` for `num_steps` steps in `model_dir`.

  `eval_every` = 0 evaluates at the end only; `eval_split` = None never. `eval_hook`
  (params of the policy, step) -> {name: value} runs at step 0 of a fresh run and at
  every evaluation (also with `eval_split` = None), its metrics written with the eval
  metrics. Returns the last logged train metrics and the final evaluation.
  """
  _check_settings(num_steps=num_steps, batch_size=batch_size, log_every=log_every,
                  checkpoint_every=checkpoint_every, num_microbatches=num_microbatches)
  if partitioner is None:
    partitioner = partitioning.Partitioner()
  model_dir = os.path.abspath(model_dir)
  os.makedirs(model_dir, exist_ok=True)
  with contextlib.ExitStack() as cleanup:  # closed in reverse: the lock last
    cleanup.enter_context(checkpoints.RunLock(model_dir))
    # INIT_CHECKPOINT is read before TensorFlow loads (the logger's writers, the data): a
    # bad one stops the run at once.
    model = objective.model
    base_params = None
    if init_checkpoint:
      base_params = checkpoints.load_init_params(init_checkpoint, model.param_shapes())
    log = metrics_lib.MetricsLogger(model_dir, num_steps, stream=stream)
    cleanup.callback(log.close)
    log.line(f"[setup] {objective.name} on {task!r} in {model_dir}")
    given, seed = seed, run_seed(seed, objective, derive_seed)
    log.line(f"[setup] seed {seed}" + (
        f" = hash({_seed_salt(given, objective)}); train.derive_seed = False uses {given}"
        if derive_seed else " (train.seed as is: train.derive_seed = False)"))

    # Data: batch k is a function of (seed, k). seqio and the tasks load TensorFlow:
    # imported here, so that a command line's mistakes stop `deranj.train` before it.
    import seqio  # pylint: disable=g-import-not-at-top
    from deranj.data import pipeline  # pylint: disable=g-import-not-at-top
    from deranj.data import tasks  # pylint: disable=g-import-not-at-top
    lengths = {"inputs": inputs_length, "targets": targets_length}
    tasks.register_t5_tasks()
    train_split = pipeline.load(task, "train", lengths, keep_texts=False,
                                max_examples=max_train_examples)
    objective.check_features(train_split.features, f"task {task!r}")
    eval_data = None
    if eval_split:
      split = pipeline.load(task, eval_split, lengths, max_examples=eval_examples)
      vocabulary = next(iter(seqio.get_mixture_or_task(task).output_features.values())).vocabulary
      eval_data = objectives.EvalData(split.features, split.texts,
                                      lambda ids: vocabulary.decode([int(i) for i in ids]))

    # Params: INIT_CHECKPOINT (or random) -> the objective's trainable and frozen trees.
    init_rng, train_rng, eval_rng = jax.random.split(jax.random.PRNGKey(seed), 3)
    if init_checkpoint:
      log.line(f"[setup] initialised from {init_checkpoint}")
    elif objective.frozen_logical_axes():
      raise TrainingError(f"the {objective.name} objective needs train.init_checkpoint (the "
                          "SFT model that is also its frozen reference).")
    else:
      base_params = model.init_params(init_rng)
    params = objective.init_params(init_rng, base_params)
    frozen = objective.frozen_params(base_params)
    del base_params
    params = partitioner.shard_params(params, objective.param_logical_axes())
    if frozen:
      frozen = partitioner.shard_params(frozen, objective.frozen_logical_axes())
      # Own buffers: the trainable params (donated each step) may start as the same arrays.
      frozen = jax.jit(lambda tree: jax.tree_util.tree_map(jnp.copy, tree))(frozen)

    train_features = objective.prepare_features(train_split.features, frozen,
                                                eval_batch_size or batch_size)
    stream_ = pipeline.BatchStream(train_features, batch_size, seed)
    del train_split

    schedule = optimizers.learning_rate_schedule(num_steps)
    optimizer = optimizers.make_optimizer(
        optimizers.per_train_step(schedule, objective.updates_per_step))
    state = objectives.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                  opt_state=jax.jit(optimizer.init)(params))
    # One fixed placement for every state leaf, in and out of the step: params as the
    # rules say, optimizer moments as propagated from them, scalars replicated. Without
    # it the second step would see new shardings and compile again.
    state_shardings = jax.tree_util.tree_map(
        lambda x: x.sharding if isinstance(x.sharding, jax.sharding.NamedSharding)
        else partitioner.replicated, state)
    state = jax.device_put(state, state_shardings)
    ckpt = checkpoints.Checkpointer(model_dir, save_every=checkpoint_every,
                                    keep=keep_checkpoints)
    cleanup.callback(ckpt.close)
    for path in ckpt.set_aside:
      log.line(f"[setup] {path}: an unfinished checkpoint, set aside")
    latest = ckpt.latest_step()
    if latest is not None:
      state = ckpt.restore(latest, state)
      log.line(f"[setup] resumed from {ckpt.directory}/{latest}")
    start = int(state.step)
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(state.params))
    log.line(f"[setup] {num_params / 1e6:.2f}M trainable parameters, steps {start}..{num_steps}, "
             f"batch {batch_size}, mesh {dict(partitioner.mesh.shape)}")
    every = log_interval(log_every, num_steps)

    step_fn = jax.jit(functools.partial(objective.train_step, optimizer=optimizer,
                                        num_microbatches=num_microbatches),
                      out_shardings=(state_shardings, partitioner.replicated), donate_argnums=0)
    last_saved = latest
    pending: list[tuple[int, dict]] = []
    logged: dict[str, float] = {}

    def flush(step: int) -> None:
      nonlocal pending, logged
      if not pending:
        return
      pending = jax.device_get(pending)
      bad = _first_bad_step(pending)
      if bad is not None:
        where = (f"the last good checkpoint is {ckpt.directory}/{last_saved}" if last_saved
                 is not None else "no checkpoint was saved")
        raise TrainingDivergedError(f"step {bad[0]}: {bad[1]}; training stopped ({where}).")
      logged = _mean_metrics(pending)
      log.write_train(step, logged, float(schedule(step)))
      pending = []

    eval_metrics: dict[str, float] = {}

    def evaluate(step: int) -> None:
      nonlocal eval_metrics
      if eval_data is None and eval_hook is None:
        return
      t0 = time.time()
      metrics = {}
      if eval_data is not None:
        # One key for every evaluation (common random numbers): two evaluations of
        # nearly equal policies draw nearly equal samples, so their difference is the
        # policy's change, not sampling noise (what the figures' plateau tests read).
        metrics = objective.evaluate(state.params, frozen, eval_data, eval_rng,
                                     eval_batch_size or batch_size)
      if eval_hook is not None:
        metrics = {**metrics, **eval_hook(objective.policy_params(state.params), step)}
      eval_metrics = metrics
      log.write_eval(step, {**eval_metrics, "eval_seconds": time.time() - t0})

    if eval_hook is not None and start == 0:
      log.write_eval(0, dict(eval_hook(objective.policy_params(state.params), 0)))

    stop = _StopRequest()
    try:
      for step in range(start, num_steps):
        if stop.requested:
          raise KeyboardInterrupt
        batch = partitioner.shard_batch(stream_.batch_at(step))
        state, step_metrics = step_fn(state, frozen, batch, jax.random.fold_in(train_rng, step))
        pending.append((step + 1, step_metrics))
        done = step + 1
        if step == start:
          jax.block_until_ready(state.step)
          log.start(step + 1)  # rates exclude the compiling step
          _write_operative_config(model_dir)
        if done % every == 0 or done == num_steps:
          flush(done)
        if done % checkpoint_every == 0 or done == num_steps:
          flush(done)
          ckpt.save(done, state, force=done == num_steps)
          last_saved = done
        if eval_every and done % eval_every == 0 and done != num_steps:
          evaluate(done)
      if latest is None or latest < num_steps or not checkpoints.is_finished(model_dir):
        evaluate(num_steps)
        objective.export(os.path.join(model_dir, checkpoints.MODEL_EXPORT_DIR), state.params,
                         objective=objective.name, steps=num_steps,
                         init_checkpoint=_recorded_path(init_checkpoint), task=task)
        _write_operative_config(model_dir)
        log.line(f"[done] model in {model_dir}/{checkpoints.MODEL_EXPORT_DIR}")
    except KeyboardInterrupt:
      last = ckpt.latest_step()
      where = (f"the last checkpoint is {ckpt.directory}/{last}" if last is not None
               else "no checkpoint was saved")
      raise TrainingInterrupted(f"training interrupted; {where} (run the same command again "
                                "to resume).") from None
    finally:
      stop.close()
    return {"train": logged, "eval": eval_metrics, "state": state}


class _StopRequest:
  """Ctrl-C (SIGINT) asks the loop to stop between steps, so it never lands inside a
  save or a compiled step (where orbax's or XLA's threads can be left hanging); a second
  Ctrl-C stops at once. Only the main thread can own the handler."""

  def __init__(self):
    self.requested = False
    self._previous = None
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGINT, self._handle)

  def _handle(self, *_):
    if self.requested:
      raise KeyboardInterrupt
    self.requested = True

  def close(self):
    if self._previous is not None:
      signal.signal(signal.SIGINT, self._previous)
      self._previous = None


def _recorded_path(checkpoint: Optional[str]) -> Optional[str]:
  """A local INIT_CHECKPOINT as an absolute path, so the export's record (which
  `deranj.sample` reads to find the reference) holds from any directory."""
  if checkpoint and os.path.exists(checkpoint):
    return os.path.abspath(checkpoint)
  return checkpoint


def _write_operative_config(model_dir: str) -> None:
  with files.atomic_write(os.path.join(model_dir, "config.gin")) as f:
    f.write(gin.operative_config_str())
