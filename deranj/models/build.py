"""A model wrapper from a config: what gin's `build_model` makes for the trainer.

    SFT.model = @build_model()
    build_model.config = @T5Config()     # or @DecoderConfig(): a decoder-only model

`T5Config` and `DecoderConfig` are registered with gin here under those names, so the
configs' bindings do not depend on which module defines the networks.
"""
from __future__ import annotations

from typing import Union

import gin

from deranj.data import tokenizer
from deranj.models import base
from deranj.models import decoder
from deranj.models import t5

T5Config = t5.T5Config
DecoderConfig = decoder.DecoderConfig
Config = Union[T5Config, DecoderConfig]

gin.external_configurable(T5Config, name="T5Config")
gin.external_configurable(DecoderConfig, name="DecoderConfig")


class ModelConfigError(ValueError):
  """A `build_model` binding that cannot make a model; the message names it."""


@gin.configurable
def build_model(config: Config = gin.REQUIRED, *, z_loss: float = 1e-4,
                label_smoothing: float = 0.0, pad_id: int = tokenizer.PAD_ID) -> base.Model:
  """The model wrapper of `config`: a T5 (EncoderDecoderModel) or, for a DecoderConfig,
  a DecoderOnlyModel whose PAD id is `pad_id` (the tasks' SentencePiece PAD; T5's is
  always 0)."""
  if isinstance(config, DecoderConfig):
    try:
      return base.DecoderOnlyModel(network(config), pad_id=pad_id,
                                   z_loss=z_loss, label_smoothing=label_smoothing)
    except ValueError as e:
      raise ModelConfigError(f"build_model.pad_id: {e}") from None
  if not isinstance(config, T5Config):
    raise ModelConfigError(f"build_model.config must be @T5Config() or @DecoderConfig(), "
                           f"got {type(config).__name__}.")
  if pad_id != 0:
    raise ModelConfigError(f"build_model.pad_id={pad_id}: a T5's PAD id is 0.")
  return base.EncoderDecoderModel(network(config), z_loss=z_loss,
                                  label_smoothing=label_smoothing)


def network(config: Config):
  """The bare Flax network of `config` (`t5.Transformer` or `decoder.Transformer`), for
  callers that wrap it themselves (`base.as_model`, a reward model)."""
  if isinstance(config, DecoderConfig):
    return decoder.Transformer(config)
  if isinstance(config, T5Config):
    return t5.Transformer(config)
  raise ModelConfigError(f"expected a T5Config or a DecoderConfig, got {type(config).__name__}.")
