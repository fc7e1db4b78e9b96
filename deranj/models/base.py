"""The model wrappers that training, scoring and decoding meet at (T5X's models.py).

`EncoderDecoderModel` (T5) and `DecoderOnlyModel` (Llama / Mistral / Qwen) offer the same
methods in terms of (prompts, responses). A batch is a dict of arrays:
  prompts       [B, S]  int32 prompt ids, PAD = the model's `pad_id`
  responses     [B, T]  int32 response ids: tokens, EOS, then PAD = `pad_id`
  loss_weights  [B, T]  optional weight of each response token in the loss and scores;
                        defaults to responses != pad_id
What each network reads is the wrapper's business: a T5 gets the responses shifted right
as its decoder inputs (teacher forcing), a decoder-only model packs prompt and response
into one sequence.

`pad_id` is 0 for T5 (its vocabularies reserve 0 for PAD). A decoder-only model takes
it as an argument: its tokenizer's PAD id when it has one, or `NO_PAD` (-1) when every
id is a real token (Llama 3, Qwen); -1 then fills prompts and responses where they
hold no token, and the sampler may emit any id.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from deranj.models import axes
from deranj.models import decoder
from deranj.models import losses
from deranj.models import t5

Array = jax.Array
Params = Any
Cache = Any
Batch = Mapping[str, Array]


def shift_right(targets: Array, start_id: int = 0) -> Array:
  """[B, T] targets -> decoder inputs: start token, then targets[:, :-1]."""
  start = jnp.full_like(targets[:, :1], start_id)
  return jnp.concatenate([start, targets[:, :-1]], axis=1)


NO_PAD = -1  # the pad_id of a vocabulary without a PAD token: no id is reserved
EMBED = axes.EMBED  # the logical axis of hidden vectors, for heads on `hidden_states`


def loss_weights(batch: Batch, pad_id: int = 0) -> Array:
  weights = batch.get("loss_weights")
  if weights is None:
    weights = batch["responses"] != pad_id
  return weights.astype(jnp.float32)


def token_ids(tokens: Array) -> Array:
  """Ids a network can embed: NO_PAD (-1) fillers become 0 (they are masked anyway)."""
  return jnp.maximum(tokens, 0)


def response_batch(prompts: Array, responses: Array) -> dict[str, Array]:
  """(prompts [B, S], responses [B, T]) -> the batch `logits`, `loss_fn` and
  `score_batch` read."""
  return {"prompts": prompts, "responses": responses}


def samples_per_prompt(prompts: Array, responses: Array) -> int:
  """N when `responses` [B * N, ...] hold N adjacent responses per row of `prompts` [B, S]."""
  b, rows = prompts.shape[0], responses.shape[0]
  if b == 0 or rows % b:
    raise ValueError(f"{rows} responses do not split evenly over {b} prompts.")
  return rows // b


def masked_log_likelihood(logits: Array, targets: Array, weights: Optional[Array] = None,
                          pad_id: int = 0) -> Array:
  """log softmax(logits)[targets] [B, T], times `weights` (default: targets != pad_id)."""
  if weights is None:
    weights = (targets != pad_id).astype(jnp.float32)
  return losses.token_log_likelihood(logits, token_ids(targets)) * weights


class EncoderDecoderModel:
  """Loss, scores and a decoding cache around a `t5.Transformer`; the module is wrapped,
  never subclassed."""

  pad_id = 0  # T5 vocabularies reserve id 0 for PAD

  def __init__(self, module: t5.Transformer, *, z_loss: float = 0.0,
               label_smoothing: float = 0.0):
    self.module = module
    self.z_loss = z_loss
    self.label_smoothing = label_smoothing

  @property
  def config(self) -> t5.T5Config:
    return self.module.config

  @property
  def hidden_size(self) -> int:
    """D of `hidden_states` and `pooled_hidden`."""
    return self.config.d_model

  # --------------------------------------------------------------------------- params

  def _init_variables(self, rng: Array):
    tokens = jnp.ones((1, 2), jnp.int32)  # parameter shapes do not depend on lengths
    return self.module.init(rng, tokens, tokens)

  def init_params(self, rng: Array) -> Params:
    """Random parameters (plain arrays; logical axes come from `logical_axes`)."""
    return nn.unbox(self._init_variables(rng)["params"])

  def logical_axes(self) -> Any:
    """A pytree like the params whose leaves are PartitionSpecs of logical axis names."""
    variables = jax.eval_shape(self._init_variables, jax.random.PRNGKey(0))
    return nn.get_partition_spec(variables)["params"]

  def param_shapes(self) -> Any:
    """The parameter tree with each leaf's shape as a tuple (no arrays are made)."""
    abstract = jax.eval_shape(self.init_params, jax.random.PRNGKey(0))
    return jax.tree_util.tree_map(lambda x: tuple(x.shape), abstract)

  # --------------------------------------------------------------------------- training

  def logits(self, params: Params, batch: Batch, dropout_rng: Optional[Array] = None) -> Array:
    """Teacher-forced logits [B, T, V]; dropout only when `dropout_rng` is given.

    `prompts` may hold each prompt once, [B / N, S], for N adjacent responses per prompt
    (`samples_per_prompt`): the encoder then runs once per prompt, not once per response
    (policy gradient's N samples share their prompt's encoding).
    """
    rngs = None if dropout_rng is None else {"dropout": dropout_rng}
    # Teacher forcing: the decoder reads the responses shifted right (T5X's
    # decoder_input_tokens, as seqio's unpacked EncDecFeatureConverter makes them).
    prompts, inputs = batch["prompts"], shift_right(batch["responses"])
    n = samples_per_prompt(prompts, inputs)
    dropout = dropout_rng is not None
    if n == 1:
      return self.module.apply({"params": params}, prompts, inputs, enable_dropout=dropout,
                               rngs=rngs)

    def shared_encoding(module: t5.Transformer, prompts, inputs):
      encoded = module.encode(prompts, enable_dropout=dropout)
      return module.decode(jnp.repeat(encoded, n, axis=0), jnp.repeat(prompts, n, axis=0),
                           inputs, enable_dropout=dropout)
    return self.module.apply({"params": params}, prompts, inputs, method=shared_encoding,
                             rngs=rngs)

  def loss_fn(self, params: Params, batch: Batch,
              dropout_rng: Optional[Array] = None) -> tuple[Array, dict[str, Array]]:
    """Mean token cross-entropy over weighted (non-PAD) target tokens, and metrics."""
    logits = self.logits(params, batch, dropout_rng)
    targets = token_ids(batch["responses"])
    weights = loss_weights(batch, self.pad_id)
    token_loss, z_term = losses.cross_entropy_with_logits(
        logits, targets, z_loss=self.z_loss, label_smoothing=self.label_smoothing)
    num_tokens = jnp.maximum(weights.sum(), 1.0)
    loss = jnp.sum(token_loss * weights) / num_tokens
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    metrics = {
        "loss": loss,
        "z_loss": jnp.sum(z_term * weights) / num_tokens,
        "accuracy": jnp.sum(correct * weights) / num_tokens,
        "num_tokens": weights.sum(),
    }
    return loss, metrics

  # --------------------------------------------------------------------------- scoring

  def token_logprobs(self, params: Params, prompts: Array, responses: Array, *,
                     dropout_rng: Optional[Array] = None) -> tuple[Array, Array]:
    """Teacher-forced log pi(y_t | x, y_<t) of each response token.

    Args:
      params: the model's params.
      prompts: [B, S] prompt ids, 0 = PAD; or [B / N, S], each prompt once for its N
        adjacent responses (encoded once).
      responses: [B, T] response ids (tokens, EOS, then PAD = 0).
      dropout_rng: dropout only when given.

    Returns:
      (log-probabilities [B, T] float32, 0 on PAD; logits [B, T, V]).
    """
    return self._token_logprobs(params, response_batch(prompts, responses), dropout_rng)

  def sequence_logprobs(self, params: Params, prompts: Array, responses: Array, *,
                        dropout_rng: Optional[Array] = None) -> Array:
    """log pi(y | x): the sum of `token_logprobs` over each response, PAD masked: [B]."""
    logp, _ = self.token_logprobs(params, prompts, responses, dropout_rng=dropout_rng)
    return jnp.sum(logp, axis=-1)

  def score_batch(self, params: Params, batch: Batch) -> Array:
    """`sequence_logprobs` of a batch (prompts, responses, optional loss_weights): [B]."""
    logp, _ = self._token_logprobs(params, batch)
    return jnp.sum(logp, axis=-1)

  def _token_logprobs(self, params: Params, batch: Batch,
                      dropout_rng: Optional[Array] = None) -> tuple[Array, Array]:
    logits = self.logits(params, batch, dropout_rng)
    return masked_log_likelihood(logits, batch["responses"],
                                 loss_weights(batch, self.pad_id)), logits

  # --------------------------------------------------------------------------- hidden

  def hidden_states(self, params: Params, prompts: Array, responses: Array) -> Array:
    """The decoder's final (normed) hidden states [B, T, D] that predict each response
    token: position t has read the prompt and responses[:, :t] (for value heads)."""
    _, state = self.module.apply(
        {"params": params}, prompts, shift_right(responses),
        capture_intermediates=_is_decoder_norm, mutable=["intermediates"])
    (hidden,) = state["intermediates"]["decoder"]["decoder_norm"]["__call__"]
    return hidden

  # What `pooled_hidden` reads: the encoder (the decoder is not needed).
  POOLING_KEYS = ("token_embedder", "encoder")
  pooling = "mean"

  def pooling_params(self, params: Params) -> Params:
    """The part of `params` (or of a tree like it) that `pooled_hidden` reads."""
    return {k: params[k] for k in self.POOLING_KEYS}

  def pooled_hidden(self, params: Params, tokens: Array,
                    dropout_rng: Optional[Array] = None) -> Array:
    """One [D] vector per sequence [B, L] (prompt and response joined, PAD = pad_id), for
    a reward head: the encoder's final output mean-pooled over non-PAD positions. The
    encoder is bidirectional, so every position has seen the whole sequence; the mean
    uses them all and does not depend on padding. `params`: `pooling_params`."""
    rngs = None if dropout_rng is None else {"dropout": dropout_rng}
    encoded = self.module.apply({"params": self.pooling_params(params)}, tokens,
                                enable_dropout=dropout_rng is not None, rngs=rngs,
                                method=t5.Transformer.encode)  # [B, L, D]
    weights = (tokens != self.pad_id).astype(jnp.float32)[..., None]  # [B, L, 1]
    return (jnp.sum(encoded.astype(jnp.float32) * weights, axis=1)
            / jnp.maximum(jnp.sum(weights, axis=1), 1.0))  # [B, D]

  # --------------------------------------------------------------------------- decoding

  def encode(self, params: Params, prompts: Array) -> Array:
    return self.module.apply({"params": params}, prompts,
                             method=t5.Transformer.encode)

  def init_cache(self, params: Params, prompts: Array, max_decode_length: int,
                 num_decodes: int = 1) -> Cache:
    """Runs the encoder once and returns a decoding cache for `max_decode_length` steps.

    The cache holds, per decoder layer, the empty self-attention keys/values and the
    cross-attention keys/values of the encoder output. With `num_decodes` = N it serves
    B * N rows, each prompt's N rows adjacent (row b * N + n).
    """
    encoded = self.encode(params, prompts)
    start = jnp.zeros((prompts.shape[0], 1), jnp.int32)
    _, variables = self.module.apply(
        {"params": params}, encoded, prompts, start, decode=True,
        max_decode_length=max_decode_length, mutable=["cache"], method=t5.Transformer.decode)
    cache = variables["cache"]
    if num_decodes > 1:
      # Batched leaves have rank >= 2 (keys, values, encoder mask); the step index and
      # key positions are shared. Repeating after projection encodes each prompt once.
      cache = jax.tree_util.tree_map(
          lambda x: jnp.repeat(x, num_decodes, axis=0) if x.ndim >= 2 else x, cache)
    return cache

  def step_params(self, params: Params) -> Params:
    """`params` as `decode_step` reads them best (`t5.step_params`); the sampler makes
    them once per call, outside its loop."""
    return t5.step_params(params, self.config)

  def decode_step(self, params: Params, cache: Cache, tokens: Array) -> tuple[Array, Cache]:
    """One token per row [B] -> (next-token logits [B, V], updated cache); `params` raw
    or `step_params`."""
    logits, variables = self.module.apply(
        {"params": params, "cache": cache}, None, None, tokens[:, None], decode=True,
        mutable=["cache"], method=t5.Transformer.decode)
    return logits[:, 0], variables["cache"]


def _is_decoder_norm(module, method_name) -> bool:
  return module.name == "decoder_norm" and method_name == "__call__"


# ----------------------------------------------------------------------------- decoder-only


def prompt_mask(prompts: Array, pad_id: int = 0) -> Array:
  """[B, S] left-padded prompts -> [B, S] bool, False on each row's leading PADs."""
  return jnp.cumsum(prompts != pad_id, axis=1) > 0


def left_pad(prompts: Array, pad_id: int = 0) -> Array:
  """Right-padded prompts [B, S] (trailing `pad_id`s are PAD) -> the same rows left-padded;
  left-padded rows are returned as they are."""
  prompts = jnp.asarray(prompts)
  length = prompts.shape[1]
  last = jnp.max(jnp.where(prompts != pad_id, jnp.arange(length), -1), axis=1)  # -1: all PAD
  shift = length - 1 - last
  index = (jnp.arange(length)[None, :] - shift[:, None]) % length
  return jnp.take_along_axis(prompts, index, axis=1)


class DecoderOnlyModel:
  """`EncoderDecoderModel`'s methods around a `decoder.Transformer`: T5X's DecoderOnlyModel,
  prompt and response packed into one sequence, the loss and scores on the response only.

  Padding: `pad_id` fills prompts and responses where they hold no token: NO_PAD (-1,
  the default) for vocabularies in which every id is a token (0 is an ordinary token of
  Llama 3's and Qwen's), or the tokenizer's PAD id when it has one (deranj's
  SentencePiece vocabulary: 0). Prompts [B, S] may be left- or right-padded (they are
  left-padded here, `left_pad`); only a row's leading or trailing pads are padding, and
  every row needs a real prompt token (e.g. BOS). Responses [B, T] are as for
  `EncoderDecoderModel`: tokens, EOS, then pads, every pad masked (the sampler never
  emits `pad_id`).

  Batches are `EncoderDecoderModel`'s dicts (`prompts`, `responses`, optional
  `loss_weights`), so trainers and `Realigner.score` take either model. The network reads
  prompt + response[:-1]; the logit at the last prompt token predicts response token 0.
  These architectures have no dropout: `dropout_rng` is accepted and unused.

  Decoding: `init_cache` prefills all prompt tokens but the last and keeps that one;
  the first `decode_step` feeds it in place of the token it is given (the sampler's
  start token), so its logits predict the first response token and the sampler's loop is
  the same for both families.
  """

  def __init__(self, module: decoder.Transformer, *, pad_id: int = NO_PAD,
               z_loss: float = 0.0, label_smoothing: float = 0.0):
    if not NO_PAD <= pad_id < module.config.vocab_size:
      raise ValueError(f"DecoderOnlyModel: pad_id={pad_id} must be an id of the vocabulary "
                       f"(0..{module.config.vocab_size - 1}) or {NO_PAD} (no PAD token).")
    self.module = module
    self.pad_id = int(pad_id)
    self.z_loss = z_loss
    self.label_smoothing = label_smoothing

  def _init_variables(self, rng: Array):
    return self.module.init(rng, jnp.ones((1, 2), jnp.int32))

  def _prompts(self, prompts: Array) -> tuple[Array, Array]:
    """Prompts [B, S] -> (left-padded embeddable ids, mask of real tokens), both [B, S]."""
    prompts = jnp.asarray(prompts, jnp.int32)
    _check_prompts(prompts)
    prompts = left_pad(prompts, self.pad_id)
    return token_ids(prompts), prompt_mask(prompts, self.pad_id)

  # The same code as the encoder-decoder's: it reaches the network only through
  # `_init_variables` and `logits`.
  config = EncoderDecoderModel.config
  init_params = EncoderDecoderModel.init_params
  logical_axes = EncoderDecoderModel.logical_axes
  param_shapes = EncoderDecoderModel.param_shapes
  loss_fn = EncoderDecoderModel.loss_fn
  token_logprobs = EncoderDecoderModel.token_logprobs
  sequence_logprobs = EncoderDecoderModel.sequence_logprobs
  score_batch = EncoderDecoderModel.score_batch
  _token_logprobs = EncoderDecoderModel._token_logprobs

  @property
  def hidden_size(self) -> int:
    """D of `hidden_states` and `pooled_hidden`."""
    return self.config.hidden_size

  def _packed(self, params: Params, prompts: Array, responses: Array, hidden: bool) -> Array:
    """The network on prompt + responses[:, :-1]: its outputs at the T positions that
    predict the response tokens. `prompts` may hold each prompt once for N adjacent
    responses (`samples_per_prompt`)."""
    prompts = jnp.repeat(jnp.asarray(prompts, jnp.int32), samples_per_prompt(prompts, responses),
                         axis=0)
    prompts, mask = self._prompts(prompts)
    responses = jnp.asarray(responses, jnp.int32)[:, :-1]
    tokens = jnp.concatenate([prompts, token_ids(responses)], axis=1)  # [B, S + T - 1]
    mask = jnp.concatenate([mask, responses != self.pad_id], axis=1)
    return self.module.apply({"params": params}, tokens, mask,
                             num_logits=responses.shape[1] + 1, hidden=hidden)

  def logits(self, params: Params, batch: Batch, dropout_rng: Optional[Array] = None) -> Array:
    """Teacher-forced logits [B, T, V] of the responses given the prompts."""
    del dropout_rng  # no dropout in these architectures
    return self._packed(params, batch["prompts"], batch["responses"], hidden=False)

  def hidden_states(self, params: Params, prompts: Array, responses: Array) -> Array:
    """The final (normed) hidden states [B, T, D] that predict each response token:
    position t has read the prompt and responses[:, :t] (for value heads)."""
    return self._packed(params, prompts, responses, hidden=True)

  pooling = "last"

  def pooling_params(self, params: Params) -> Params:
    """The part of `params` (or of a tree like it) that `pooled_hidden` reads: all but
    an untied output head."""
    return {k: v for k, v in params.items() if k != "lm_head"}

  def pooled_hidden(self, params: Params, tokens: Array,
                    dropout_rng: Optional[Array] = None) -> Array:
    """One [D] vector per right-padded sequence [B, L] (prompt and response joined, PAD =
    pad_id), for a reward head: the final hidden state at each row's last token, the
    only position that has read the whole sequence (as transformers' sequence
    classifiers). `params`: `pooling_params`."""
    del dropout_rng  # no dropout in these architectures
    tokens = jnp.asarray(tokens, jnp.int32)
    mask = tokens != self.pad_id
    hidden = self.module.apply({"params": params}, token_ids(tokens), mask, hidden=True)
    last = jnp.max(jnp.where(mask, jnp.arange(tokens.shape[1]), 0), axis=1)  # [B]
    return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0].astype(jnp.float32)

  def init_cache(self, params: Params, prompts: Array, max_decode_length: int,
                 num_decodes: int = 1) -> Cache:
    """Prefills prompts [B, S] once; a cache for `max_decode_length` steps.

    With `num_decodes` = N it serves B * N rows, each prompt's N rows adjacent.
    """
    prompts, mask = self._prompts(prompts)
    _, variables = self.module.apply(
        {"params": params}, prompts[:, :-1], mask[:, :-1], decode=True,
        max_decode_length=prompts.shape[1] - 1 + max_decode_length, num_logits=0,
        mutable=["cache"])
    cache = {"layers": variables["cache"], "pending": prompts[:, -1],
             "started": jnp.zeros((), bool)}
    if num_decodes > 1:  # every batched leaf has rank >= 1; the slot index is shared
      cache = jax.tree_util.tree_map(
          lambda x: jnp.repeat(x, num_decodes, axis=0) if x.ndim else x, cache)
    return cache

  def step_params(self, params: Params) -> Params:
    """`params` as `decode_step` reads them best (`decoder.step_params`); the sampler
    makes them once per call, outside its loop."""
    return decoder.step_params(params, self.config)

  def decode_step(self, params: Params, cache: Cache, tokens: Array) -> tuple[Array, Cache]:
    """One token per row [B] -> (next-token logits [B, V], updated cache); the first call
    feeds the last prompt token instead."""
    tokens = jnp.where(cache["started"], token_ids(tokens), cache["pending"])
    logits, variables = self.module.apply(
        {"params": params, "cache": cache["layers"]}, tokens[:, None], decode=True,
        mutable=["cache"])
    cache = {"layers": variables["cache"], "pending": cache["pending"],
             "started": jnp.ones((), bool)}
    return logits[:, 0], cache


Model = Any  # EncoderDecoderModel or DecoderOnlyModel


def as_model(model: Any) -> Model:
  """A model wrapper, or a bare `t5.Transformer` / `decoder.Transformer` wrapped."""
  if isinstance(model, (EncoderDecoderModel, DecoderOnlyModel)):
    return model
  if isinstance(model, t5.Transformer):
    return EncoderDecoderModel(model)
  if isinstance(model, decoder.Transformer):
    return DecoderOnlyModel(model)
  raise TypeError(f"expected a deranj model (EncoderDecoderModel, DecoderOnlyModel, "
                  f"t5.Transformer or decoder.Transformer), got {type(model).__name__}.")


def _check_prompts(prompts: Array):
  if prompts.ndim != 2 or prompts.shape[1] < 1:
    raise ValueError(f"a decoder-only model needs prompts [batch, length >= 1], got shape "
                     f"{prompts.shape}.")
