"""The tiny pretrained T5 that deranj ships, the starting point of the demo and tests.

`deranj/assets/tiny_t5.msgpack` holds the parameters (flax.serialization, no pickle);
`tiny_t5.json` the T5Config fields, the tokenizer it was trained with
(deranj/assets/spm.model, checked by sha256) and how it was pretrained
(`scripts/pretrain_tiny.sh`). `load_tiny_t5()` returns (config, params).
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import flax.serialization
import jax
import numpy as np

from deranj.data import tokenizer
from deranj.models import base
from deranj.models import t5

_ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
TINY_T5_PARAMS = os.path.join(_ASSETS, "tiny_t5.msgpack")
TINY_T5_CONFIG = os.path.join(_ASSETS, "tiny_t5.json")

_REBUILD = "rebuild it with `bash scripts/pretrain_tiny.sh`"


class PretrainedError(ValueError):
  """A shipped checkpoint that is missing or does not match its config or tokenizer."""


def tiny_t5_metadata() -> dict[str, Any]:
  """The JSON beside the checkpoint: config, tokenizer hash, pretraining record."""
  if not os.path.isfile(TINY_T5_CONFIG):
    raise PretrainedError(f"{TINY_T5_CONFIG} not found; {_REBUILD}.")
  with open(TINY_T5_CONFIG) as f:
    return json.load(f)


def load_tiny_t5() -> tuple[t5.T5Config, Any]:
  """(T5Config, params) of the shipped tiny T5; params are float32 numpy arrays."""
  meta = tiny_t5_metadata()
  config = t5.T5Config(**meta["config"])
  with open(tokenizer.model_path(), "rb") as f:
    if hashlib.sha256(f.read()).hexdigest() != meta["tokenizer"]["sha256"]:
      raise PretrainedError(f"{tokenizer.model_path()} is not the tokenizer {TINY_T5_PARAMS} "
                            f"was trained with; {_REBUILD} after rebuilding the tokenizer.")
  if not os.path.isfile(TINY_T5_PARAMS):
    raise PretrainedError(f"{TINY_T5_PARAMS} not found; {_REBUILD}.")
  with open(TINY_T5_PARAMS, "rb") as f:
    params = flax.serialization.msgpack_restore(f.read())
  model = base.EncoderDecoderModel(t5.Transformer(config))
  if jax.tree_util.tree_map(np.shape, params) != model.param_shapes():
    raise PretrainedError(f"{TINY_T5_PARAMS} does not match the config in {TINY_T5_CONFIG}; "
                          f"{_REBUILD}.")
  return config, params
