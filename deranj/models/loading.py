"""Load and save whole models: one name for every checkpoint format deranj reads.

`load_model(spec)` accepts
  "tiny"                  the tiny pretrained T5 the project ships;
  a Hugging Face dir      config.json + model.safetensors (or sharded safetensors): T5, or
                          Llama / Mistral / Qwen2 / Qwen3 (a decoder-only model whose
                          pad_id is NO_PAD: every id of those vocabularies is a token);
  a deranj model dir      deranj_model.json + params.msgpack (written by `save_model`),
                          or deranj_model.json + an orbax `params/` checkpoint;
  a training run's MODEL_DIR  its final model, `MODEL_DIR/model/` (see `resolve`).
and returns the model wrapper (`base.EncoderDecoderModel` or `base.DecoderOnlyModel`)
with its params. deranj_model.json holds the network's config, and for a decoder-only
model `"family": "decoder_only"` and its `pad_id` (no family: T5). Pickles are never
read; reward models (kind "reward_model") load with their own loader.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Union

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

from deranj.models import base
from deranj.models import decoder
from deranj.models import hf
from deranj.models import t5

CONFIG_FILE = "deranj_model.json"
MSGPACK_FILE = "params.msgpack"
ORBAX_DIR = "params"
RUN_MODEL_DIR = "model"  # where a finished training run exports its model
RUN_CHECKPOINTS_DIR = "checkpoints"
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
FAMILY_KEY = "family"  # in deranj_model.json; absent for T5
DECODER_ONLY = "decoder_only"
PAD_ID_KEY = "pad_id"  # a decoder-only model's
# Overrides that concern only T5 (decoder-only networks have no dropout): ignored there.
_T5_ONLY_OVERRIDES = ("dropout_rate",)


class ModelLoadError(ValueError):
  """A checkpoint path that cannot be read as a model."""


Config = Union[t5.T5Config, decoder.DecoderConfig]


def config_to_dict(config: Config) -> dict[str, Any]:
  out = dict(config.__dict__)
  for key in ("dtype", "param_dtype"):
    out[key] = jnp.dtype(out[key]).name
  if isinstance(out.get("rope_scaling"), decoder.RopeScaling):
    out["rope_scaling"] = dict(out["rope_scaling"].__dict__)
  return out


def config_from_dict(fields: dict[str, Any], config_class: type = t5.T5Config,
                     **overrides) -> Config:
  """A T5Config (or `config_class`, e.g. DecoderConfig) from `config_to_dict`'s fields."""
  fields = {**fields, **overrides}
  for key in ("dtype", "param_dtype"):
    if isinstance(fields.get(key), str):
      fields[key] = _DTYPES[fields[key]]
  known = set(config_class.__dataclass_fields__)
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ModelLoadError(f"unknown {config_class.__name__} fields {unknown}.")
  if isinstance(fields.get("rope_scaling"), dict):
    fields["rope_scaling"] = decoder.RopeScaling(**fields["rope_scaling"])
  return config_class(**fields)


def model_record(model: Union[Config, base.Model]) -> dict[str, Any]:
  """What deranj_model.json says of a model (a wrapper, or a bare T5Config): its config,
  and for a decoder-only model its family and pad_id."""
  if isinstance(model, base.DecoderOnlyModel):
    return {"config": config_to_dict(model.config), FAMILY_KEY: DECODER_ONLY,
            PAD_ID_KEY: model.pad_id}
  if isinstance(model, base.EncoderDecoderModel):
    model = model.config
  if isinstance(model, decoder.DecoderConfig):
    raise TypeError("save a decoder-only model as its DecoderOnlyModel (its pad_id is "
                    "recorded), not as a bare DecoderConfig.")
  return {"config": config_to_dict(model)}


def model_from_record(record: dict[str, Any], **overrides) -> base.Model:
  """The model wrapper `model_record` describes; `overrides` set config fields."""
  if record.get(FAMILY_KEY, "t5") == DECODER_ONLY:
    overrides = {k: v for k, v in overrides.items() if k not in _T5_ONLY_OVERRIDES}
    config = config_from_dict(record["config"], decoder.DecoderConfig, **overrides)
    return base.DecoderOnlyModel(decoder.Transformer(config), pad_id=record[PAD_ID_KEY])
  if record.get(FAMILY_KEY, "t5") != "t5":
    raise ModelLoadError(f"unknown model family {record[FAMILY_KEY]!r}.")
  return base.EncoderDecoderModel(t5.Transformer(config_from_dict(record["config"],
                                                                  **overrides)))


def save_model(directory: str, model: Union[Config, base.Model], params, **metadata) -> None:
  """Writes deranj_model.json + params.msgpack; the directory appears complete or not at all.

  `model` is the model wrapper, or a bare T5Config.
  """
  record = model_record(model)
  parent = os.path.dirname(os.path.abspath(directory))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
  try:
    with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
      json.dump({**record, **metadata}, f, indent=2)
    with open(os.path.join(tmp, MSGPACK_FILE), "wb") as f:
      f.write(flax.serialization.msgpack_serialize(jax.device_get(params)))
    if os.path.exists(directory):
      shutil.rmtree(directory)
    os.replace(tmp, directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _check_shapes(model: base.Model, params, where: str):
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
  return {k: v for k, v in fields.items() if k not in ("config", FAMILY_KEY, PAD_ID_KEY)}


def is_hf_decoder_dir(directory: str) -> bool:
  """Whether `directory` is a Hugging Face directory of a supported decoder-only model
  (its config.json names a Llama / Mistral / Qwen2 / Qwen3 architecture)."""
  path = os.path.join(directory, "config.json")
  if not os.path.isfile(path) or os.path.isfile(os.path.join(directory, CONFIG_FILE)):
    return False
  try:
    with open(path) as f:
      hf_config = json.load(f)
  except (json.JSONDecodeError, OSError):
    return False
  if not isinstance(hf_config, dict):
    return False
  architectures = hf_config.get("architectures") or []
  return (any(a in hf.DECODER_ARCHITECTURES for a in architectures)
          or hf_config.get("model_type") in hf.DECODER_ARCHITECTURES.values())


def load_model(spec: str, **config_overrides) -> tuple[base.Model, Any]:
  """(model wrapper, params) from a checkpoint spec (see the module docstring).

  `config_overrides` set config fields; `dropout_rate` is ignored for decoder-only
  models (they have no dropout).
  """
  spec = resolve(spec)
  if spec == "tiny":
    from deranj.models import pretrained  # pylint: disable=g-import-not-at-top
    config, params = pretrained.load_tiny_t5()
    if config_overrides:
      config = config_from_dict(config_to_dict(config), **config_overrides)
    model = base.EncoderDecoderModel(t5.Transformer(config))
  elif not os.path.isdir(spec):
    raise ModelLoadError(f"checkpoint {spec!r} is not a directory (nor 'tiny').")
  elif os.path.isfile(os.path.join(spec, CONFIG_FILE)):
    model, params = _load_deranj_dir(spec, config_overrides)
  elif is_hf_decoder_dir(spec):
    overrides = {k: v for k, v in config_overrides.items() if k not in _T5_ONLY_OVERRIDES}
    config, params = hf.load_decoder(spec, **overrides)
    model = base.DecoderOnlyModel(decoder.Transformer(config), pad_id=base.NO_PAD)
  elif os.path.isfile(os.path.join(spec, "config.json")):
    config, params = hf.load_t5(spec, **config_overrides)
    model = base.EncoderDecoderModel(t5.Transformer(config))
  else:
    raise ModelLoadError(
        f"{spec} is neither a deranj model directory ({CONFIG_FILE}) nor a Hugging Face "
        "directory (config.json + safetensors).")
  dtype = model.config.param_dtype
  params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), params)
  return model, params


def _load_deranj_dir(directory: str, overrides) -> tuple[base.Model, Any]:
  path = os.path.join(directory, CONFIG_FILE)
  try:
    with open(path) as f:
      fields = json.load(f)
    kind = fields.get("kind")
    model = model_from_record(fields, **overrides)
  except ModelLoadError:
    raise
  except (json.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError) as e:
    raise ModelLoadError(f"{path} is not a deranj model config: {e!r}") from None
  if kind is not None:
    raise ModelLoadError(f"{directory} holds a {str(kind).replace('_', ' ')} (kind {kind!r} in "
                         f"{CONFIG_FILE}), not a policy.")
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
  _check_shapes(model, params, directory)
  return model, params
