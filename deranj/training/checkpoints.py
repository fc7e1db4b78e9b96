"""Training checkpoints (orbax) and the parameters a run starts from.

A run directory (MODEL_DIR) holds
  checkpoints/<step>/{params,train}   orbax items: the trainable params; {step, opt_state}
  model/                              the final policy as a deranj model directory
                                      (deranj_model.json + params.msgpack), for sampling
  config.gin                          the operative gin config
  train/, eval/                       TensorBoard event files
  .lock                               held (flock) by the run using the directory

orbax writes each step into a temporary directory and renames it when complete, so a
save cut short by a crash is never listed as a step; leftovers are removed on the next
start. `INIT_CHECKPOINT` (see `load_init_params`) is "tiny", a Hugging Face T5
directory, a deranj model directory, or another run's MODEL_DIR.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from deranj.models import hf
from deranj.models import loading

# One run layout: deranj.sample recognises a run directory by the same names.
CHECKPOINTS_DIR = loading.RUN_CHECKPOINTS_DIR
_METADATA_FILE = "_CHECKPOINT_METADATA"  # written by orbax when a step is finalised
MODEL_EXPORT_DIR = loading.RUN_MODEL_DIR
LOCK_FILE = ".lock"


CheckpointError = hf.CheckpointError  # one class: train.py's handler also sees HF errors


class RunDirectoryBusyError(RuntimeError):
  """MODEL_DIR is held by another live run; the message names its pid."""


class RunLock:
  """An exclusive flock on MODEL_DIR/.lock, holding the owner's pid.

  The kernel drops the lock when its process dies, so a stale file never blocks. The
  file is removed on release; a waiter that locked the removed file retries on the new one.
  """

  def __init__(self, model_dir: str):
    self.path = os.path.join(model_dir, LOCK_FILE)
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EACCES):
          os.close(fd)
          raise
        owner = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RunDirectoryBusyError(
            f"{model_dir} is in use by another training run (pid {owner}); wait for it to "
            "end or choose another MODEL_DIR.") from None
      try:
        same = os.path.samestat(os.fstat(fd), os.stat(self.path))
      except FileNotFoundError:
        same = False
      if same:
        break
      os.close(fd)  # the holder removed this file while we waited: lock the new one
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    self._fd = fd

  def release(self) -> None:
    if self._fd is None:
      return
    with contextlib.suppress(FileNotFoundError):
      os.unlink(self.path)
    os.close(self._fd)
    self._fd = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.release()


def _abstract(tree):
  return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)


class Checkpointer:
  """Saves {params, train} every `save_every` steps, keeps the last `keep`."""

  def __init__(self, model_dir: str, *, save_every: int, keep: Optional[int] = 3):
    self.directory = os.path.join(os.path.abspath(model_dir), CHECKPOINTS_DIR)
    self.set_aside = set_aside_incomplete(self.directory)
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=max(int(save_every), 1), max_to_keep=keep, create=True,
        cleanup_tmp_directories=True, enable_async_checkpointing=False)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("params", "train"))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state, *, force: bool = False) -> bool:
    args = ocp.args.Composite(
        params=ocp.args.StandardSave(state.params),
        train=ocp.args.StandardSave({"step": state.step, "opt_state": state.opt_state}))
    # Ctrl-C never lands here: the trainer stops between steps (trainer._StopRequest).
    saved = self.manager.save(step, args=args, force=force)
    self.manager.wait_until_finished()
    return saved

  def restore(self, step: int, target):
    """The state saved at `step`, placed like `target` (a state of the right structure)."""
    path = os.path.join(self.directory, str(step))
    args = ocp.args.Composite(
        params=ocp.args.StandardRestore(_abstract(target.params)),
        train=ocp.args.StandardRestore(
            _abstract({"step": target.step, "opt_state": target.opt_state})))
    try:
      restored = self.manager.restore(step, args=args)
    except Exception as e:  # orbax raises many types for bad files
      raise CheckpointError(f"cannot restore the checkpoint {path}: {_first_line(e)} "
                            "(delete that step directory to resume from an earlier one).") from None
    return target.replace(step=restored["train"]["step"], params=restored["params"],
                          opt_state=restored["train"]["opt_state"])

  def close(self):
    self.manager.close()


def set_aside_incomplete(directory: str) -> list[str]:
  """Renames step directories that orbax never finalised to `<step>.incomplete-<time>`.

  orbax's local saves are atomic renames, but a copy, a sync or another file system can
  leave a step directory without its metadata; such a step must not count as the latest.
  """
  moved = []
  if not os.path.isdir(directory):
    return moved
  for name in sorted(os.listdir(directory)):
    path = os.path.join(directory, name)
    if name.isdigit() and os.path.isdir(path) and not os.path.isfile(
        os.path.join(path, _METADATA_FILE)):
      target = f"{path}.incomplete-{int(time.time())}"
      os.rename(path, target)
      moved.append(target)
  return moved


def _first_line(error: Exception) -> str:
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[0] if text else ''}"


def is_finished(model_dir: str) -> bool:
  """True when the run exported its final model (the last thing `train` does)."""
  return os.path.isfile(os.path.join(model_dir, MODEL_EXPORT_DIR, loading.CONFIG_FILE))


def _restore_run_params(model_dir: str) -> Any:
  directory = os.path.join(model_dir, CHECKPOINTS_DIR)
  steps = []
  if os.path.isdir(directory):
    steps = [int(n) for n in os.listdir(directory) if n.isdigit()
             and os.path.isdir(os.path.join(directory, n, "params"))]
  if not steps:
    raise CheckpointError(f"{model_dir} is a training run directory with no finished model "
                          f"({MODEL_EXPORT_DIR}/) and no checkpoint under {directory}.")
  path = os.path.join(directory, str(max(steps)), "params")
  try:
    return ocp.StandardCheckpointer().restore(path)
  except Exception as e:  # orbax raises many types for bad files
    raise CheckpointError(f"cannot restore {path}: {_first_line(e)}") from None


def load_init_params(spec: str, expected_shapes: Any, *, policy_key: str = "policy") -> Any:
  """Model params from INIT_CHECKPOINT, checked against the configured model's shapes.

  A run directory gives its exported model, else the params of its latest checkpoint
  (their `policy_key` subtree when the run trained a policy with extra heads).
  """
  if spec != "tiny" and not os.path.exists(spec):
    raise CheckpointError(f"INIT_CHECKPOINT {spec!r} does not exist.")
  if os.path.isdir(spec) and not os.listdir(spec):
    raise CheckpointError(f"INIT_CHECKPOINT {spec!r} is an empty directory.")
  export = os.path.join(spec, MODEL_EXPORT_DIR)
  try:
    if os.path.isdir(os.path.join(spec, CHECKPOINTS_DIR)) and not os.path.isdir(export):
      params = _restore_run_params(spec)
      if isinstance(params, dict) and policy_key in params:
        params = params[policy_key]
    else:
      _, params = loading.load_model(export if os.path.isdir(export) else spec)
  except (loading.ModelLoadError, hf.CheckpointError) as e:
    raise CheckpointError(f"INIT_CHECKPOINT {spec!r}: {e}") from None
  shapes = jax.tree_util.tree_map(np.shape, params)
  if shapes != expected_shapes:
    raise CheckpointError(
        f"INIT_CHECKPOINT {spec!r} does not match the model configured in gin (T5Config.*): "
        f"{_shape_difference(shapes, expected_shapes)}.")
  return params


def _shape_difference(got, want) -> str:
  flat_got = dict(jax.tree_util.tree_flatten_with_path(got, is_leaf=_is_shape)[0])
  flat_want = dict(jax.tree_util.tree_flatten_with_path(want, is_leaf=_is_shape)[0])
  for path in flat_want:
    if path not in flat_got:
      return f"missing {jax.tree_util.keystr(path)}"
    if flat_got[path] != flat_want[path]:
      return (f"{jax.tree_util.keystr(path)} has shape {flat_got[path]}, the config wants "
              f"{flat_want[path]}")
  extra = [jax.tree_util.keystr(p) for p in flat_got if p not in flat_want]
  return f"unexpected {extra[0]}" if extra else "different structure"


def _is_shape(x) -> bool:
  return isinstance(x, tuple) and all(isinstance(d, int) for d in x)
