"""Rewards for alignment: the length reward (paper eq. 10) and a learned T5 reward model.

Token conventions are the sampler's: PAD = 0, EOS = 1; a response [B, T] holds its
tokens, then EOS, then PAD (`deranj.decoding`'s output).
"""
from __future__ import annotations

from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from deranj.models import base
from deranj.models import t5

Array = jax.Array
Params = Any

# The parts of a T5 that `t5.Transformer.encode` reads.
ENCODER_KEYS = ("token_embedder", "encoder")


def _before_first_eos(tokens: Array, eos_id: int) -> Array:
  """[B, T] -> [B, T] bool: positions strictly before each row's first EOS."""
  return jnp.cumsum(tokens == eos_id, axis=-1) == 0


def response_lengths(tokens: Array, eos_id: int = 1, pad_id: int = 0) -> Array:
  """Response lengths in tokens, EOS excluded: [B, T] -> [B] int32.

  Counts the non-PAD tokens before the first EOS; without an EOS (a truncated
  sample), all non-PAD tokens.
  """
  keep = _before_first_eos(tokens, eos_id) & (tokens != pad_id)
  return jnp.sum(keep, axis=-1, dtype=jnp.int32)


def length_reward(lengths: Array, l_min: int, l_max: int) -> Array:
  """Paper eq. 10: 0 if l_min <= length <= l_max (both inclusive), else -1.

  Args:
    lengths: [B] response lengths (see `response_lengths`).
    l_min: shortest rewarded length.
    l_max: longest rewarded length.

  Returns:
    [B] float32 rewards in {0, -1}.
  """
  inside = (lengths >= l_min) & (lengths <= l_max)
  return jnp.where(inside, 0.0, -1.0).astype(jnp.float32)


def join_prompt_response(prompt: Array, response: Array, pad_id: int = 0,
                         eos_id: int = 1) -> Array:
  """Concatenates each row's prompt and response without the PAD between them.

  Args:
    prompt: [B, S] encoder inputs, right-padded with `pad_id`.
    response: [B, T] sampled tokens: tokens, EOS, then PAD.

  Returns:
    [B, S + T]: the row's non-PAD prompt tokens, then its non-PAD response tokens up
    to and including the first EOS (anything after it is dropped), then PAD. Static
    shapes (a stable sort per row), so it runs under jit.
  """
  is_eos = response == eos_id
  # Up to and including the first EOS: no EOS strictly before this position.
  response_keep = (response != pad_id) & (jnp.cumsum(is_eos, axis=-1) - is_eos == 0)
  tokens = jnp.concatenate([prompt, response], axis=1)
  keep = jnp.concatenate([prompt != pad_id, response_keep], axis=1)
  # Kept tokens first, each group in its original order.
  order = jnp.argsort(~keep, axis=1, stable=True)
  joined = jnp.take_along_axis(tokens, order, axis=1)
  return jnp.where(jnp.take_along_axis(keep, order, axis=1), joined, pad_id).astype(prompt.dtype)


class RewardModel:
  """A scalar reward r(x, y) from a T5 encoder reading prompt and response together.

  The joined sequence x ++ y (`join_prompt_response`) runs through the T5 encoder;
  the final encoder output (after its RMS norm) is mean-pooled over non-PAD
  positions and a linear head maps the [D] pool to the reward:

    r = mean_{s: tokens_s != PAD} encoded[s] @ head.kernel[:, 0] + head.bias[0]

  Why mean pooling: the encoder is bidirectional, so every position already sees
  the whole sequence and no position is special; the mean uses all of them (lower
  variance than one token's vector, the choice of Sentence-T5 for T5 encoders),
  does not depend on the response ending with EOS (truncated samples lack one),
  and, since PAD keys are masked and PAD outputs excluded, is independent of
  padding. A T5 encoder has no [CLS] token to pool instead.

  Params: {"token_embedder", "encoder"} as in `t5.Transformer`, plus
  {"head": {"kernel": [D, 1], "bias": [1]}}. Starting from an SFT model (as in
  the paper, Appendix D) reuses its embedder and encoder; the decoder is dropped.
  """

  def __init__(self, module: Union[t5.Transformer, base.EncoderDecoderModel], *,
               pad_id: int = 0, eos_id: int = 1, head_init_scale: float = 1.0):
    """Wraps `module`'s encoder; the head is created by `init_params`.

    Args:
      module: the T5 (or its model wrapper) whose encoder reads the sequences.
      pad_id: PAD id of prompts and responses.
      eos_id: EOS id ending responses.
      head_init_scale: the head kernel starts at N(0, head_init_scale^2 / D): unit
        scale gives O(1) reward differences at initialisation; 0 gives a constant
        (zero) reward model, whose head still gets gradients.
    """
    if isinstance(module, base.EncoderDecoderModel):
      module = module.module
    self.module = module
    # The embedder and encoder are the encoder-decoder's own subtrees: their init, axes
    # and shapes come from it (parameter names and init RNGs are per module path).
    self.backbone = base.EncoderDecoderModel(module)
    self.pad_id = pad_id
    self.eos_id = eos_id
    self.head_init_scale = head_init_scale

  @property
  def config(self) -> t5.T5Config:
    return self.module.config

  # --------------------------------------------------------------------------- params

  def _encoder_part(self, tree: Any) -> dict[str, Any]:
    return {k: tree[k] for k in ENCODER_KEYS}

  def _head_params(self, rng: Array) -> Params:
    d = self.config.d_model
    std = self.head_init_scale * d**-0.5
    kernel = std * jax.random.normal(rng, (d, 1), self.config.param_dtype)
    return {"kernel": kernel, "bias": jnp.zeros((1,), self.config.param_dtype)}

  def init_params(self, rng: Array, from_params: Optional[Params] = None) -> Params:
    """Reward-model params, fresh or from an encoder-decoder's params.

    Args:
      rng: PRNG key for the head (and the encoder when `from_params` is None).
      from_params: full `t5.Transformer` params (e.g. the SFT model's); their
        "token_embedder" and "encoder" subtrees are used as they are.

    Raises:
      ValueError: if `from_params` lacks those subtrees or their shapes differ from
        this model's config.
    """
    encoder_rng, head_rng = jax.random.split(rng)
    if from_params is None:
      params = self._encoder_part(self.backbone.init_params(encoder_rng))
    else:
      missing = [k for k in ENCODER_KEYS if k not in from_params]
      if missing:
        raise ValueError(f"RewardModel.init_params: from_params lacks {missing}; expected a "
                         f"t5.Transformer's params with keys {list(ENCODER_KEYS)}.")
      params = self._encoder_part(from_params)
      got = jax.tree_util.tree_map(lambda x: tuple(np.shape(x)), params)
      if got != self._encoder_part(self.backbone.param_shapes()):
        raise ValueError("RewardModel.init_params: from_params' embedder/encoder do not match "
                         f"this model's config {self.config}.")
    params = dict(params)
    params["head"] = self._head_params(head_rng)
    return params

  def logical_axes(self) -> Any:
    """The params' tree with PartitionSpecs of logical axis names as leaves."""
    axes = self._encoder_part(self.backbone.logical_axes())
    axes["head"] = {"kernel": jax.sharding.PartitionSpec(t5.EMBED, None),
                    "bias": jax.sharding.PartitionSpec(None)}
    return axes

  def param_shapes(self) -> Any:
    """The params' tree with each leaf's shape as a tuple."""
    shapes = self._encoder_part(self.backbone.param_shapes())
    shapes["head"] = {"kernel": (self.config.d_model, 1), "bias": (1,)}
    return shapes

  # --------------------------------------------------------------------------- rewards

  def rewards_from_tokens(self, params: Params, tokens: Array,
                          dropout_rng: Optional[Array] = None) -> Array:
    """Rewards of already-joined sequences: [B, L] -> [B] float32.

    Dropout only when `dropout_rng` is given.
    """
    rngs = None if dropout_rng is None else {"dropout": dropout_rng}
    encoder_params = {k: params[k] for k in ENCODER_KEYS}
    encoded = self.module.apply({"params": encoder_params}, tokens,
                                enable_dropout=dropout_rng is not None, rngs=rngs,
                                method=t5.Transformer.encode)  # [B, L, D]
    weights = (tokens != self.pad_id).astype(jnp.float32)[..., None]  # [B, L, 1]
    pooled = (jnp.sum(encoded.astype(jnp.float32) * weights, axis=1)
              / jnp.maximum(jnp.sum(weights, axis=1), 1.0))  # [B, D]
    head = params["head"]
    return pooled @ head["kernel"][:, 0].astype(jnp.float32) + head["bias"][0]

  def rewards(self, params: Params, prompt: Array, response: Array,
              dropout_rng: Optional[Array] = None) -> Array:
    """r(x, y) for prompts [B, S] and responses [B, T] -> [B] float32."""
    tokens = join_prompt_response(prompt, response, pad_id=self.pad_id, eos_id=self.eos_id)
    return self.rewards_from_tokens(params, tokens, dropout_rng)
