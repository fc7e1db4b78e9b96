"""Rewards for alignment: the length reward (paper eq. 10) and a learned reward model.

Token conventions are the sampler's: PAD = the model's pad_id (0 unless given; a
decoder-only model without a PAD token fills with `base.NO_PAD`, -1, and 0 is a token),
EOS = 1; a response [B, T] holds its tokens, then EOS, then PAD (`deranj.decoding`'s
output).
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from deranj.models import base

Array = jax.Array
Params = Any


def _before_first_eos(tokens: Array, eos_id: int) -> Array:
  """[B, T] -> [B, T] bool: positions strictly before each row's first EOS."""
  return jnp.cumsum(tokens == eos_id, axis=-1) == 0


def response_lengths(tokens: Array, eos_id: int = 1, pad_id: int = 0) -> Array:
  """Response lengths in tokens, EOS excluded: [B, T] -> [B] int32.

  Counts the non-PAD tokens before the first EOS; without an EOS (a truncated
  sample), all non-PAD tokens. `pad_id`: the policy's (its samples' fill after EOS).
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
  """A scalar reward r(x, y) from a model reading prompt and response together.

  The joined sequence x ++ y (`join_prompt_response`) goes through the backbone's
  `pooled_hidden`, one [D] vector per sequence, and a linear head maps it to the reward:

    r = pooled_hidden(x ++ y) @ head.kernel[:, 0] + head.bias[0]

  A T5 backbone mean-pools its encoder's output over non-PAD positions (bidirectional:
  every position has seen the whole sequence; the mean uses them all, does not depend on
  the response ending with EOS, and is independent of padding; the choice of
  Sentence-T5). A decoder-only backbone takes the final hidden state of the last token,
  the only one that has read the whole sequence.

  Params: the backbone's `pooling_params` (T5: {"token_embedder", "encoder"}; decoder-only:
  all but an untied output head) plus {"head": {"kernel": [D, 1], "bias": [1]}}. Starting
  from an SFT model (as in the paper, Appendix D) reuses those parts of its params.
  """

  def __init__(self, module: Any, *, pad_id: Optional[int] = None, eos_id: int = 1,
               head_init_scale: float = 1.0):
    """Wraps `module`'s backbone; the head is created by `init_params`.

    Args:
      module: a model wrapper (`base.EncoderDecoderModel`, `base.DecoderOnlyModel`) or a
        bare `t5.Transformer`.
      pad_id: PAD id of prompts and responses; the backbone's (which it must equal).
      eos_id: EOS id ending responses.
      head_init_scale: the head kernel starts at N(0, head_init_scale^2 / D): unit
        scale gives O(1) reward differences at initialisation; 0 gives a constant
        (zero) reward model, whose head still gets gradients.
    """
    self.backbone = base.as_model(module)
    self.module = self.backbone.module
    if pad_id is not None and pad_id != self.backbone.pad_id:
      raise ValueError(f"RewardModel: pad_id={pad_id} differs from the model's pad_id "
                       f"{self.backbone.pad_id}.")
    self.pad_id = self.backbone.pad_id
    self.eos_id = eos_id
    self.head_init_scale = head_init_scale

  @property
  def config(self) -> Any:
    return self.backbone.config

  # --------------------------------------------------------------------------- params

  def _head_params(self, rng: Array) -> Params:
    d = self.backbone.hidden_size
    std = self.head_init_scale * d**-0.5
    kernel = std * jax.random.normal(rng, (d, 1), self.config.param_dtype)
    return {"kernel": kernel, "bias": jnp.zeros((1,), self.config.param_dtype)}

  def init_params(self, rng: Array, from_params: Optional[Params] = None) -> Params:
    """Reward-model params, fresh or from the backbone model's params.

    Args:
      rng: PRNG key for the head (and the backbone when `from_params` is None).
      from_params: the backbone model's full params (e.g. the SFT model's); the parts
        `pooled_hidden` reads are used as they are.

    Raises:
      ValueError: if `from_params` lacks those parts or their shapes differ from
        this model's config.
    """
    backbone_rng, head_rng = jax.random.split(rng)
    if from_params is None:
      params = self.backbone.pooling_params(self.backbone.init_params(backbone_rng))
    else:
      want = self.backbone.pooling_params(self.backbone.param_shapes())
      missing = [k for k in want if k not in from_params]
      if missing:
        raise ValueError(f"RewardModel.init_params: from_params lacks {missing}; expected the "
                         f"params of a {type(self.backbone).__name__} with keys {list(want)}.")
      params = self.backbone.pooling_params(from_params)
      got = jax.tree_util.tree_map(lambda x: tuple(np.shape(x)), params)
      if got != want:
        raise ValueError("RewardModel.init_params: from_params' parameters do not match "
                         f"this model's config {self.config}.")
    params = dict(params)
    params["head"] = self._head_params(head_rng)
    return params

  def logical_axes(self) -> Any:
    """The params' tree with PartitionSpecs of logical axis names as leaves."""
    axes = dict(self.backbone.pooling_params(self.backbone.logical_axes()))
    axes["head"] = {"kernel": jax.sharding.PartitionSpec(base.EMBED, None),
                    "bias": jax.sharding.PartitionSpec(None)}
    return axes

  def param_shapes(self) -> Any:
    """The params' tree with each leaf's shape as a tuple."""
    shapes = dict(self.backbone.pooling_params(self.backbone.param_shapes()))
    shapes["head"] = {"kernel": (self.backbone.hidden_size, 1), "bias": (1,)}
    return shapes

  # --------------------------------------------------------------------------- rewards

  def rewards_from_tokens(self, params: Params, tokens: Array,
                          dropout_rng: Optional[Array] = None) -> Array:
    """Rewards of already-joined sequences: [B, L] -> [B] float32.

    Dropout only when `dropout_rng` is given.
    """
    pooled = self.backbone.pooled_hidden({k: v for k, v in params.items() if k != "head"},
                                         tokens, dropout_rng)  # [B, D]
    head = params["head"]
    return pooled @ head["kernel"][:, 0].astype(jnp.float32) + head["bias"][0]

  def rewards(self, params: Params, prompt: Array, response: Array,
              dropout_rng: Optional[Array] = None) -> Array:
    """r(x, y) for prompts [B, S] and responses [B, T] -> [B] float32."""
    tokens = join_prompt_response(prompt, response, pad_id=self.pad_id, eos_id=self.eos_id)
    return self.rewards_from_tokens(params, tokens, dropout_rng)
