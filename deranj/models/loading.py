"""Load and save whole models: one name for every checkpoint format deranj reads.

`load_model(spec)` accepts
  "tiny"                  the tiny pretrained T5 the project ships;
  a Hugging Face T5 dir   config.json + model.safetensors (or sharded safetensors);
  a deranj model dir      deranj_model.json + params.msgpack (written by `save_model`),
                          or deranj_model.json + an orbax `params/` checkpoint;
  a training run's MODEL_DIR  its final model, `MODEL_DIR/model/` (see `resolve`).
Pickles are never read; reward models (kind "reward_model") load with their own loader.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

from deranj.models import base
from deranj.models import hf
from deranj.models import t5

CONFIG_FILE = "deranj_model.json"
MSGPACK_FILE = "params.msgpack"
ORBAX_DIR = "params"
RUN_MODEL_DIR = "model"  # where a finished training run exports its model
RUN_CHECKPOINTS_DIR = "checkpoints"
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class ModelLoadError(ValueError):
  """A checkpoint path that cannot be read as a model."""


def config_to_dict(config: t5.T5Config) -> dict[str, Any]:
  out = dict(config.__dict__)
  for key in ("dtype", "param_dtype"):
    out[key] = jnp.dtype(out[key]).name
  return out


def config_from_dict(fields: dict[str, Any], **overrides) -> t5.T5Config:
  fields = {**fields, **overrides}
  for key in ("dtype", "param_dtype"):
    if isinstance(fields.get(key), str):
      fields[key] = _DTYPES[fields[key]]
  known = set(t5.T5Config.__dataclass_fields__)
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ModelLoadError(f"unknown T5Config fields {unknown}.")
  return t5.T5Config(**fields)


def save_model(directory: str, config: t5.T5Config, params, **metadata) -> None:
  """Writes deranj_model.json + params.msgpack; the directory appears complete or not at all."""
  parent = os.path.dirname(os.path.abspath(directory))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
  try:
    with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
      json.dump({"config": config_to_dict(config), **metadata}, f, indent=2)
    with open(os.path.join(tmp, MSGPACK_FILE), "wb") as f:
      f.write(flax.serialization.msgpack_serialize(jax.device_get(params)))
    if os.path.exists(directory):
      shutil.rmtree(directory)
    os.replace(tmp, directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _check_shapes(config: t5.T5Config, params, where: str):
  model = base.EncoderDecoderModel(t5.Transformer(config))
  if jax.tree_util.tree_map(np.shape, params) != model.param_shapes():
    raise ModelLoadError(f"{where}: parameters do not match the config in {CONFIG_FILE}.")


def _is_model_dir(directory: str) -> bool:
  return any(os.path.isfile(os.path.join(directory, n)) for n in (CONFIG_FILE, "config.json"))


def resolve(spec: str) -> str:
  """The model directory `spec` names: a run's MODEL_DIR gives its `model/`, else `spec`.

  Raises:
    ModelLoadError: for a run directory whose run has not finished (no `model/` yet).
  """
  if spec == "tiny" or not os.path.isdir(spec) or _is_model_dir(spec):
    return spec
  export = os.path.join(spec, RUN_MODEL_DIR)
  if os.path.isdir(export):
    return export
  if os.path.isdir(os.path.join(spec, RUN_CHECKPOINTS_DIR)):
    raise ModelLoadError(f"{spec} is a training run with no final model ({RUN_MODEL_DIR}/): "
                         "the run has not finished; resume it to the end first.")
  return spec


def read_metadata(spec: str) -> dict[str, Any]:
  """What `save_model` recorded beside the config (a run's objective, steps,
  init_checkpoint, ...); {} for "tiny" and Hugging Face directories."""
  path = os.path.join(resolve(spec), CONFIG_FILE)
  if spec == "tiny" or not os.path.isfile(path):
    return {}
  try:
    with open(path) as f:
      fields = json.load(f)
  except json.JSONDecodeError as e:
    raise ModelLoadError(f"{path} is not valid JSON: {e}") from None
  if not isinstance(fields, dict):
    raise ModelLoadError(f"{path} is not a deranj model config (not a JSON object).")
  return {k: v for k, v in fields.items() if k != "config"}


def load_model(spec: str, **config_overrides) -> tuple[base.EncoderDecoderModel, Any]:
  """(EncoderDecoderModel, params) from a checkpoint spec (see the module docstring)."""
  spec = resolve(spec)
  if spec == "tiny":
    from deranj.models import pretrained  # pylint: disable=g-import-not-at-top
    config, params = pretrained.load_tiny_t5()
    if config_overrides:
      config = config_from_dict(config_to_dict(config), **config_overrides)
  elif not os.path.isdir(spec):
    raise ModelLoadError(f"checkpoint {spec!r} is not a directory (nor 'tiny').")
  elif os.path.isfile(os.path.join(spec, CONFIG_FILE)):
    config, params = _load_deranj_dir(spec, config_overrides)
  elif os.path.isfile(os.path.join(spec, "config.json")):
    config, params = hf.load_t5(spec, **config_overrides)
  else:
    raise ModelLoadError(
        f"{spec} is neither a deranj model directory ({CONFIG_FILE}) nor a Hugging Face T5 "
        "directory (config.json + safetensors).")
  params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, config.param_dtype), params)
  return base.EncoderDecoderModel(t5.Transformer(config)), params


def _load_deranj_dir(directory: str, overrides) -> tuple[t5.T5Config, Any]:
  path = os.path.join(directory, CONFIG_FILE)
  try:
    with open(path) as f:
      fields = json.load(f)
    kind = fields.get("kind")
    config = config_from_dict(fields["config"], **overrides)
  except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
    raise ModelLoadError(f"{path} is not a deranj model config: {e!r}") from None
  if kind is not None:
    raise ModelLoadError(f"{directory} holds a {str(kind).replace('_', ' ')} (kind {kind!r} in "
                         f"{CONFIG_FILE}), not a T5 policy.")
  msgpack = os.path.join(directory, MSGPACK_FILE)
  orbax_dir = os.path.join(directory, ORBAX_DIR)
  if os.path.isfile(msgpack):
    try:
      with open(msgpack, "rb") as f:
        params = flax.serialization.msgpack_restore(f.read())
    except Exception as e:  # msgpack raises several types on bad bytes
      raise ModelLoadError(f"cannot read {msgpack}: {e}") from None
  elif os.path.isdir(orbax_dir):
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    try:
      params = ocp.StandardCheckpointer().restore(os.path.abspath(orbax_dir))
    except Exception as e:  # orbax raises several types on bad checkpoints
      raise ModelLoadError(f"cannot restore orbax checkpoint {orbax_dir}: {e}") from None
  else:
    raise ModelLoadError(f"{directory} has {CONFIG_FILE} but neither {MSGPACK_FILE} nor "
                         f"an orbax {ORBAX_DIR}/ directory.")
  _check_shapes(config, params, directory)
  return config, params
