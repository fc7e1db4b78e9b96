"""T5 encoder-decoder in Flax linen, T5X style.

Covers T5 1.0 (ReLU MLP, output head tied to the input embedding with d_model**-0.5
scaling) and T5 1.1 / FLAN-T5 (gated-GELU MLP, untied head). Relative position
biases are computed once per stack (bidirectional in the encoder, causal in the
decoder) and shared by its layers, as in T5.

Shapes use B = batch, S = encoder length, T = decoder length, D = d_model,
H = heads, K = d_kv, F = d_ff, V = vocab. Every parameter carries logical axis
names (mapped onto a device mesh by partitioning rules) through
`nn.with_logical_partitioning`.

Incremental decoding (`decode=True`) keeps, per decoder layer, a self-attention
cache `cached_key`/`cached_value` [B, H, L, K] and the cross-attention keys and values
[B, H, S, K] projected once from the encoder output; the decoder holds `cache_index`.
The first call with `decode=True` (under `mutable=['cache']`) creates the cache and
fills the cross-attention part; later calls take one token [B, 1] each.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from deranj.models.axes import EMBED, HEADS, KV, MLP, RELPOS, VOCAB  # noqa: F401

Array = jax.Array
DType = Any

NEG_INF = -1e10


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Global hyperparameters of a T5 network (field names follow Hugging Face's)."""
  vocab_size: int = 32128
  d_model: int = 512
  d_kv: int = 64
  d_ff: int = 2048
  num_heads: int = 8
  num_layers: int = 6
  num_decoder_layers: Optional[int] = None  # None: same as num_layers.
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  dropout_rate: float = 0.1
  layer_norm_epsilon: float = 1e-6
  feed_forward_proj: str = "relu"  # "relu" (T5 1.0) or "gated-gelu" (T5 1.1).
  tie_word_embeddings: bool = True
  dtype: DType = jnp.float32  # activations
  param_dtype: DType = jnp.float32
  # Decoding steps (one token against the cache) read the input projections that share
  # an input (self-attention q/k/v; the gated MLP's wi_0/wi_1) as one matmul over their
  # concatenated kernels, which XLA hoists out of the sampler's loop: one [B, D] x
  # [D, 3HK] matmul per step instead of three, each output element summed as before.
  # Teacher forcing and training keep separate matmuls; the parameters are the same
  # either way (bench_sampler's `dera_before` arm times both in one run).
  fuse_decode_projections: bool = True
  # Decoding steps read each decoder kernel transposed, [N, K] (`step_params`, made once
  # per sampler call outside its loop): XLA:CPU streams a [N, K] kernel against a few
  # rows in ~0.8 of the time of the stored [K, N] one (scripts/bench_kernel_layout.py).
  transpose_decode_kernels: bool = True

  def __post_init__(self):
    if self.feed_forward_proj not in ("relu", "gated-gelu", "gelu", "gated-relu"):
      raise ValueError(
          f"T5Config.feed_forward_proj={self.feed_forward_proj!r}: expected one of "
          "'relu', 'gated-gelu', 'gelu', 'gated-relu'.")

  @property
  def decoder_layers(self) -> int:
    return self.num_layers if self.num_decoder_layers is None else self.num_decoder_layers

  @property
  def is_gated(self) -> bool:
    return self.feed_forward_proj.startswith("gated-")

  @property
  def activation(self):
    name = self.feed_forward_proj.split("-")[-1]
    # T5 1.1 checkpoints use the tanh approximation ("gelu_new").
    return jax.nn.relu if name == "relu" else functools.partial(jax.nn.gelu, approximate=True)


def _param(module: nn.Module, name: str, init, shape, axes, config: T5Config):
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, config.param_dtype)


# ----------------------------------------------------------------------------- positions


@functools.lru_cache(maxsize=None)
def _bucket_table(num_buckets: int, max_distance: int) -> np.ndarray:
  """Bucket of each distance n in [0, max_distance], for one direction.

  Computed on the host in float32 exactly as Mesh TensorFlow and Hugging Face do, so
  bucket boundaries agree with released checkpoints bit for bit.
  """
  max_exact = num_buckets // 2
  n = np.arange(max_distance + 1)
  with np.errstate(divide="ignore"):
    large = max_exact + (
        np.log(n.astype(np.float32) / np.float32(max_exact)) /
        np.float32(np.log(max_distance / max_exact)) * np.float32(num_buckets - max_exact)
    )
  large = np.where(n < max_exact, 0, large).astype(np.int64)
  large = np.minimum(large, num_buckets - 1)
  return np.where(n < max_exact, n, large).astype(np.int32)


def relative_position_bucket(relative_position: Array, *, bidirectional: bool,
                             num_buckets: int, max_distance: int) -> Array:
  """T5's bucketing of `key_position - query_position` (int array, any shape)."""
  ret = 0
  n = relative_position
  if bidirectional:
    num_buckets //= 2
    ret = (n > 0).astype(jnp.int32) * num_buckets
    n = jnp.abs(n)
  else:
    n = -jnp.minimum(n, 0)
  table = jnp.asarray(_bucket_table(num_buckets, max_distance))
  return ret + table[jnp.minimum(n, max_distance)]


class RelativePositionBiases(nn.Module):
  """Learned per-head bias for each relative-position bucket.

  Returns [1, H, Q, K] for query positions `q_pos` [Q] and key positions `k_pos` [K].
  """
  config: T5Config
  bidirectional: bool

  @nn.compact
  def __call__(self, q_pos: Array, k_pos: Array) -> Array:
    cfg = self.config
    rel = k_pos[None, :] - q_pos[:, None]  # [Q, K]
    buckets = relative_position_bucket(
        rel, bidirectional=self.bidirectional, num_buckets=cfg.relative_attention_num_buckets,
        max_distance=cfg.relative_attention_max_distance)
    table = _param(self, "rel_embedding", nn.initializers.normal(1.0),
                   (cfg.num_heads, cfg.relative_attention_num_buckets), (HEADS, RELPOS), cfg)
    # [H, Q, K] -> [1, H, Q, K]
    return jnp.take(table, buckets, axis=1).astype(cfg.dtype)[None]


# ----------------------------------------------------------------------------- layers


def _rotate_left(x: Array, r: int) -> Array:
  return (x << np.uint32(r)) | (x >> np.uint32(32 - r))


def _threefry2x32(k0: Array, k1: Array, x0: Array, x1: Array) -> tuple[Array, Array]:
  """Threefry-2x32 (20 rounds) of uint32 counters (x0, x1) under key (k0, k1), unrolled.

  jax lowers its threefry on CPU as a 5-trip while loop, each trip a pass over the whole
  array in memory; unrolled, XLA fuses all 20 rounds into one vectorised loop (and into
  the consumer of the bits), ~15x cheaper. Same function, so the same bits.
  """
  ks = (k0, k1, k0 ^ k1 ^ np.uint32(0x1BD11BDA))
  rotations = ((13, 15, 26, 6), (17, 29, 16, 24))
  x0, x1 = x0 + ks[0], x1 + ks[1]
  for i in range(5):
    for r in rotations[i % 2]:
      x0 = x0 + x1
      x1 = x0 ^ _rotate_left(x1, r)
    x0 = x0 + ks[(i + 1) % 3]
    x1 = x1 + ks[(i + 2) % 3] + np.uint32(i + 1)
  return x0, x1


def _threefry_key_data(key: Array) -> Optional[Array]:
  """The uint32[2] data of a threefry key, or None when jax.random would draw otherwise."""
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    if str(jax.random.key_impl(key)) != "threefry2x32":
      return None
    key = jax.random.key_data(key)
  elif jax.config.jax_default_prng_impl != "threefry2x32":
    return None
  if key.shape != (2,) or not jax.config.jax_threefry_partitionable or jax.config.jax_enable_x64:
    return None
  return key


def bernoulli(key: Array, p: float, shape: tuple[int, ...]) -> Array:
  """`jax.random.bernoulli(key, p, shape)`, bit for bit, with the unrolled threefry.

  As jax (partitionable threefry): element i gets threefry(key, (0, i)), its two words
  xored; the top 23 bits make a float32 u in [0, 1); the draw is u < p. Keys of other
  PRNGs, or settings under which jax draws differently, go to jax.random itself.
  """
  data = _threefry_key_data(key)
  size = int(np.prod(shape))
  if data is None or size >= 2**32:
    return jax.random.bernoulli(key, p, shape)
  index = jax.lax.iota(jnp.uint32, size).reshape(shape)
  w0, w1 = _threefry2x32(data[0], data[1], jnp.zeros_like(index), index)
  mantissa = ((w0 ^ w1) >> np.uint32(9)) | np.uint32(0x3F800000)  # [1, 2) as float32 bits
  uniform = jax.lax.bitcast_convert_type(mantissa, jnp.float32) - np.float32(1.0)
  return uniform < np.float32(p)


class Dropout(nn.Module):
  """`nn.Dropout` (same masks, same rng stream, so same outputs) with a faster mask.

  T5-small at batch 8 x 256 draws ~85M mask elements per training step (attention
  weights and the MLP hidden layer mostly); through jax.random on CPU they cost ~30% of
  the step's CPU time, unrolled ~7%.
  """
  rate: float

  @nn.compact
  def __call__(self, x: Array, deterministic: bool) -> Array:
    if deterministic or self.rate == 0.0:
      return x
    if self.rate == 1.0:
      return jnp.zeros_like(x)
    keep_prob = 1.0 - self.rate
    keep = bernoulli(self.make_rng("dropout"), keep_prob, x.shape)
    return jax.lax.select(keep, x / keep_prob, jnp.zeros_like(x))


class LayerNorm(nn.Module):
  """T5's RMS norm: no mean subtraction, no bias, statistics in float32."""
  config: T5Config

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    x32 = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    y = (x32 * jax.lax.rsqrt(var + cfg.layer_norm_epsilon)).astype(cfg.dtype)
    scale = _param(self, "scale", nn.initializers.ones, (x.shape[-1],), (EMBED,), cfg)
    return y * scale.astype(cfg.dtype)


class Dense(nn.Module):
  """x @ kernel over the last `len(in_axes)` axes; no bias (T5 has none)."""
  features: tuple[int, ...]
  in_axes: tuple[str, ...]
  out_axes: tuple[str, ...]
  config: T5Config
  init_scale: float = 1.0

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    in_shape = x.shape[-len(self.in_axes):]
    fan_in = int(np.prod(in_shape))
    lead = x.shape[:x.ndim - len(in_shape)]
    if self.has_variable("params", STEP_KERNEL):  # `step_params` on a decoding step
      y = _dot_transposed(x.reshape(-1, fan_in), self.get_variable("params", STEP_KERNEL), cfg)
      return y.reshape(*lead, *self.features)
    init = nn.initializers.normal(self.init_scale * fan_in**-0.5)
    kernel = _param(self, "kernel", init, (*in_shape, *self.features),
                    (*self.in_axes, *self.out_axes), cfg)
    # One 2-D matmul [N, in] @ [in, out]: autodiff of the N-d dot_general makes XLA:CPU
    # transpose the activation gradient in memory for every kernel gradient.
    y = jnp.dot(x.reshape(-1, fan_in).astype(cfg.dtype),
                kernel.reshape(fan_in, -1).astype(cfg.dtype))
    return y.reshape(*lead, *self.features)


def _dot_transposed(x: Array, kernel_t: Array, cfg: T5Config) -> Array:
  """[M, K] x [N, K] -> [M, N], contracting the kernel's minor dimension."""
  return jax.lax.dot_general(x.astype(cfg.dtype), kernel_t.astype(cfg.dtype),
                             (((1,), (1,)), ((), ())))


def _fused_dense(parent: nn.Module, denses: list[Dense], x: Array) -> list[Array]:
  """[d(x) for d in denses] as one matmul; the Dense modules must share x's input axis
  and exist already (an apply on initialised parameters). With `step_params`, `parent`
  holds their kernels concatenated and transposed (FUSED_STEP_KERNEL)."""
  cfg = denses[0].config
  fan_in = x.shape[-1]
  if parent.has_variable("params", FUSED_STEP_KERNEL):
    y = _dot_transposed(x.reshape(-1, fan_in), parent.get_variable("params", FUSED_STEP_KERNEL),
                        cfg)
  else:
    kernels = [jnp.asarray(nn.unbox(d.variables["params"]["kernel"]), cfg.dtype)
               for d in denses]
    y = jnp.dot(x.reshape(-1, fan_in).astype(cfg.dtype),
                jnp.concatenate([k.reshape(fan_in, -1) for k in kernels], axis=1))
  outs, start = [], 0
  for d in denses:
    width = int(np.prod(d.features))
    outs.append(y[:, start:start + width].reshape(*x.shape[:-1], *d.features))
    start += width
  return outs


class MlpBlock(nn.Module):
  """Feed-forward block: ReLU (T5 1.0) or gated GELU (T5 1.1).

  `fused`: the gated input projections as one matmul (`_fused_dense`; DecoderLayer
  decides: decoding steps with T5Config.fuse_decode_projections).
  """
  config: T5Config

  @nn.compact
  def __call__(self, x: Array, deterministic: bool, fused: bool = False) -> Array:
    cfg = self.config
    dense = functools.partial(Dense, in_axes=(EMBED,), out_axes=(MLP,), config=cfg)
    if cfg.is_gated and fused:
      gate, linear = _fused_dense(
          self, [dense((cfg.d_ff,), name=n) for n in ("wi_0", "wi_1")], x)
      h = cfg.activation(gate) * linear
    elif cfg.is_gated:
      h = cfg.activation(dense((cfg.d_ff,), name="wi_0")(x)) * dense((cfg.d_ff,), name="wi_1")(x)
    else:
      h = cfg.activation(dense((cfg.d_ff,), name="wi")(x))
    h = Dropout(cfg.dropout_rate)(h, deterministic=deterministic)  # [B, T, F]
    return Dense((cfg.d_model,), (MLP,), (EMBED,), cfg, name="wo")(h)


class Attention(nn.Module):
  """Multi-head dot-product attention without 1/sqrt(K) scaling (T5 folds it into init).

  Modes:
    self-attention, full: `kv=None`, `bias` [B|1, H, Q, Q] holds masks and positions.
    self-attention, decode: one query [B, 1, D]; keys/values appended to the cache.
    cross-attention: `kv` [B, S, D]; in decode mode projected once into the cache.
  `fused` (self-attention decoding steps): q, k, v as one matmul (`_fused_dense`).
  """
  config: T5Config
  cross: bool = False

  def _proj(self, name: str) -> Dense:
    cfg = self.config
    return Dense((cfg.num_heads, cfg.d_kv), (EMBED,), (HEADS, KV), cfg, name=name)

  @nn.compact
  def __call__(self, x: Array, bias: Array, kv: Optional[Array] = None, *,
               decode: bool = False, decode_index: Optional[Array] = None,
               cache_length: int = 0, deterministic: bool = True, fused: bool = False
               ) -> Array:
    cfg = self.config
    # Heads-major [B, H, len, K] throughout, so cached keys/values feed the batched
    # matmuls without a transpose at every decoding step.
    if self.cross:
      query = self._heads_major(self._proj("query")(x))  # [B, H, Q, K]
      key, value = self._cross_kv(kv, decode)  # [B, H, S, K]
    else:
      if fused:
        query, key, value = (self._heads_major(y) for y in _fused_dense(
            self, [self._proj(n) for n in ("query", "key", "value")], x))
      else:
        query, key, value = (self._heads_major(self._proj(n)(x))
                             for n in ("query", "key", "value"))
      if decode:
        key, value = self._update_cache(key, value, decode_index, cache_length)

    logits = jnp.einsum("bhqk,bhsk->bhqs", query, key).astype(jnp.float32)
    logits = logits + bias.astype(jnp.float32)  # [B, H, Q, S]
    weights = jax.nn.softmax(logits, axis=-1).astype(cfg.dtype)
    weights = Dropout(cfg.dropout_rate)(weights, deterministic=deterministic)
    out = jnp.einsum("bhqs,bhsk->bqhk", weights, value)  # [B, Q, H, K]
    return Dense((cfg.d_model,), (HEADS, KV), (EMBED,), cfg, name="out")(out)

  @staticmethod
  def _heads_major(x: Array) -> Array:
    return jnp.swapaxes(x, 1, 2)  # [B, L, H, K] -> [B, H, L, K]

  def _cross_kv(self, kv: Optional[Array], decode: bool):
    if decode and self.has_variable("cache", "cross_key"):
      return self.get_variable("cache", "cross_key"), self.get_variable("cache", "cross_value")
    key = self._heads_major(self._proj("key")(kv))  # [B, H, S, K]
    value = self._heads_major(self._proj("value")(kv))
    if decode:  # cache creation: the encoder output is projected once
      self.put_variable("cache", "cross_key", key)
      self.put_variable("cache", "cross_value", value)
    return key, value

  def _update_cache(self, key: Array, value: Array, index: Optional[Array], cache_length: int):
    """Writes this step's key/value [B, H, 1, K] at `index`; returns the cache [B, H, L, K].

    On the creation call (`index` None) it makes an empty cache of `cache_length`.
    """
    b, h, _, k = key.shape
    cached_key = self.variable("cache", "cached_key", jnp.zeros, (b, h, cache_length, k), key.dtype)
    cached_value = self.variable("cache", "cached_value", jnp.zeros, (b, h, cache_length, k),
                                 value.dtype)
    if index is None:
      return key, value  # creation call: its output is discarded
    if key.shape[2] != 1:
      raise ValueError(f"decode=True takes one token per step, got length {key.shape[2]}.")
    cached_key.value = jax.lax.dynamic_update_slice_in_dim(cached_key.value, key, index, axis=2)
    cached_value.value = jax.lax.dynamic_update_slice_in_dim(cached_value.value, value, index,
                                                             axis=2)
    return cached_key.value, cached_value.value


# ----------------------------------------------------------------------------- stacks


class EncoderLayer(nn.Module):
  config: T5Config

  @nn.compact
  def __call__(self, x: Array, bias: Array, deterministic: bool) -> Array:
    cfg = self.config
    drop = functools.partial(Dropout(cfg.dropout_rate), deterministic=deterministic)
    h = LayerNorm(cfg, name="pre_attention_layer_norm")(x)
    x = x + drop(Attention(cfg, name="attention")(h, bias, deterministic=deterministic))
    h = LayerNorm(cfg, name="pre_mlp_layer_norm")(x)
    return x + drop(MlpBlock(cfg, name="mlp")(h, deterministic))


class DecoderLayer(nn.Module):
  config: T5Config

  @nn.compact
  def __call__(self, y: Array, encoded: Optional[Array], self_bias: Array, cross_bias: Array,
               deterministic: bool, decode: bool, decode_index: Optional[Array] = None,
               cache_length: int = 0) -> Array:
    cfg = self.config
    drop = functools.partial(Dropout(cfg.dropout_rate), deterministic=deterministic)
    # Fused projections on decoding steps only (not the cache's creation call).
    fused = decode and decode_index is not None and cfg.fuse_decode_projections
    h = LayerNorm(cfg, name="pre_self_attention_layer_norm")(y)
    y = y + drop(Attention(cfg, name="self_attention")(
        h, self_bias, decode=decode, decode_index=decode_index, cache_length=cache_length,
        deterministic=deterministic, fused=fused))
    h = LayerNorm(cfg, name="pre_cross_attention_layer_norm")(y)
    y = y + drop(Attention(cfg, cross=True, name="encoder_decoder_attention")(
        h, cross_bias, encoded, decode=decode, deterministic=deterministic))
    h = LayerNorm(cfg, name="pre_mlp_layer_norm")(y)
    return y + drop(MlpBlock(cfg, name="mlp")(h, deterministic, fused=fused))


def _padding_bias(encoder_input_tokens: Array, dtype=jnp.float32) -> Array:
  """[B, S] tokens -> [B, 1, 1, S] additive bias masking PAD (id 0) keys."""
  return jnp.where(encoder_input_tokens > 0, 0.0, NEG_INF).astype(dtype)[:, None, None, :]


class Encoder(nn.Module):
  config: T5Config
  embedder: nn.Embed

  @nn.compact
  def __call__(self, encoder_input_tokens: Array, deterministic: bool) -> Array:
    """[B, S] int tokens -> [B, S, D] encodings."""
    cfg = self.config
    length = encoder_input_tokens.shape[1]
    pos = jnp.arange(length)
    bias = RelativePositionBiases(cfg, bidirectional=True, name="relpos_bias")(pos, pos)
    bias = bias + _padding_bias(encoder_input_tokens)  # [B, H, S, S]
    x = self.embedder(encoder_input_tokens.astype(jnp.int32)).astype(cfg.dtype)
    x = Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
    for i in range(cfg.num_layers):
      x = EncoderLayer(cfg, name=f"layers_{i}")(x, bias, deterministic)
    x = LayerNorm(cfg, name="encoder_norm")(x)
    return Dropout(cfg.dropout_rate)(x, deterministic=deterministic)


class Decoder(nn.Module):
  config: T5Config
  embedder: nn.Embed

  @nn.compact
  def __call__(self, encoded: Optional[Array], encoder_input_tokens: Optional[Array],
               decoder_input_tokens: Array, deterministic: bool, decode: bool,
               max_decode_length: Optional[int] = None) -> Array:
    """Returns logits [B, T, V] (float32) for decoder inputs [B, T]."""
    cfg = self.config
    relpos = RelativePositionBiases(cfg, bidirectional=False, name="relpos_bias")
    index, cache_length = None, 0
    if decode:
      created = self.has_variable("cache", "cache_index")
      if not created and max_decode_length is None:
        raise ValueError("The first decode=True call creates the cache: pass max_decode_length.")
      index_var = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
      # The encoder mask is kept beside the cross-attention keys and values.
      cross_bias = self.variable("cache", "encoder_bias", _padding_bias,
                                 encoder_input_tokens).value
      key_pos = self.variable("cache", "key_positions", jnp.arange, max_decode_length).value
      if created:
        index = index_var.value
        # [1, H, 1, L]: this step's query against every cache slot, later slots masked.
        self_bias = relpos(index[None], key_pos) + jnp.where(key_pos <= index, 0.0, NEG_INF)
        index_var.value = index + 1
      else:
        cache_length = max_decode_length
        self_bias = jnp.zeros((1, cfg.num_heads, 1, 1), cfg.dtype)
    else:
      pos = jnp.arange(decoder_input_tokens.shape[1])
      causal = jnp.where(pos[None, :] <= pos[:, None], 0.0, NEG_INF)  # [T, T]
      self_bias = relpos(pos, pos) + causal
      cross_bias = _padding_bias(encoder_input_tokens)

    y = self.embedder(decoder_input_tokens.astype(jnp.int32)).astype(cfg.dtype)
    y = Dropout(cfg.dropout_rate)(y, deterministic=deterministic)
    for i in range(cfg.decoder_layers):
      y = DecoderLayer(cfg, name=f"layers_{i}")(
          y, encoded, self_bias, cross_bias, deterministic, decode, index, cache_length)
    y = LayerNorm(cfg, name="decoder_norm")(y)
    y = Dropout(cfg.dropout_rate)(y, deterministic=deterministic)  # [B, T, D]

    if cfg.tie_word_embeddings:
      logits = self.embedder.attend(y * cfg.d_model**-0.5)
    else:
      logits = Dense((cfg.vocab_size,), (EMBED,), (VOCAB,), cfg, name="logits_dense")(y)
    return logits.astype(jnp.float32)


class Transformer(nn.Module):
  """T5 encoder-decoder.

  `Transformer(config).apply({'params': p}, encoder_input_tokens, decoder_input_tokens)`
  returns logits [B, T, V]. PAD is 0 in encoder inputs; decoder inputs start with 0
  (T5's start token) and are causally masked.
  """
  config: T5Config

  def setup(self):
    cfg = self.config
    self.token_embedder = nn.Embed(
        cfg.vocab_size, cfg.d_model, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(1.0), (VOCAB, EMBED)),
        name="token_embedder")
    self.encoder = Encoder(cfg, self.token_embedder)
    self.decoder = Decoder(cfg, self.token_embedder)

  def encode(self, encoder_input_tokens: Array, *, enable_dropout: bool = False) -> Array:
    """[B, S] -> [B, S, D]."""
    return self.encoder(encoder_input_tokens, deterministic=not enable_dropout)

  def decode(self, encoded: Optional[Array], encoder_input_tokens: Optional[Array],
             decoder_input_tokens: Array, *, enable_dropout: bool = False,
             decode: bool = False, max_decode_length: Optional[int] = None) -> Array:
    """Decoder logits [B, T, V].

    `decode=True` runs one token [B, 1] against the cache (mutable=['cache']). The
    first such call creates the cache for `max_decode_length` steps and projects
    `encoded` for cross-attention; its logits are meaningless. Later calls may pass
    None for `encoded` and `encoder_input_tokens`.
    """
    return self.decoder(encoded, encoder_input_tokens, decoder_input_tokens,
                        deterministic=not enable_dropout, decode=decode,
                        max_decode_length=max_decode_length)

  def __call__(self, encoder_input_tokens: Array, decoder_input_tokens: Array, *,
               enable_dropout: bool = False) -> Array:
    encoded = self.encode(encoder_input_tokens, enable_dropout=enable_dropout)
    return self.decode(encoded, encoder_input_tokens, decoder_input_tokens,
                       enable_dropout=enable_dropout)


# ----------------------------------------------------------------------------- decoding steps

STEP_KERNEL = "kernel_t"  # a Dense's kernel [*in, *out] as [prod(out), prod(in)]
FUSED_STEP_KERNEL = "fused_kernel_t"  # q|k|v or wi_0|wi_1 transposed, stacked on axis 0


def step_params(params: Any, config: T5Config) -> Any:
  """The parameters as decoding steps read them; `params` itself when
  `config.transpose_decode_kernels` is off.

  Each decoder kernel a step uses becomes STEP_KERNEL (and, with
  fuse_decode_projections, self-attention q|k|v and the gated wi_0|wi_1 one
  FUSED_STEP_KERNEL in their parent). Make it once per sampler call, outside its loop:
  inside, XLA folds the transpose back into the dot. The cross-attention key/value
  kernels (read only when the cache is made) are left out, so the result serves
  decoding steps only, not the cache's creation or teacher forcing. Idempotent.
  """
  if not config.transpose_decode_kernels or is_step_params(params):
    return params
  d, attn = config.d_model, config.num_heads * config.d_kv
  step = step_dense

  def fused_or_not(block, names):
    if config.fuse_decode_projections:
      kernels = [step(block[n], d)[STEP_KERNEL] for n in names]
      return {FUSED_STEP_KERNEL: jnp.concatenate(kernels, axis=0)}
    return {n: step(block[n], d) for n in names}

  decoder = dict(params["decoder"])
  for i in range(config.decoder_layers):
    layer = dict(decoder[f"layers_{i}"])
    own, cross, mlp = (layer[n] for n in ("self_attention", "encoder_decoder_attention", "mlp"))
    layer["self_attention"] = {**fused_or_not(own, ("query", "key", "value")),
                               "out": step(own["out"], attn)}
    layer["encoder_decoder_attention"] = {"query": step(cross["query"], d),
                                          "out": step(cross["out"], attn)}
    gate = fused_or_not(mlp, ("wi_0", "wi_1")) if config.is_gated else {"wi": step(mlp["wi"], d)}
    layer["mlp"] = {**gate, "wo": step(mlp["wo"], config.d_ff)}
    decoder[f"layers_{i}"] = layer
  if not config.tie_word_embeddings:
    decoder["logits_dense"] = step(decoder["logits_dense"], d)
  return {**params, "decoder": decoder}


def step_dense(dense: Any, fan_in: int) -> dict:
  """A Dense's parameters with its kernel [*in, *out] (prod(in) = fan_in) as STEP_KERNEL
  [prod(out), fan_in]; its other parameters (a bias) as they are."""
  out = {k: v for k, v in dense.items() if k != "kernel"}
  out[STEP_KERNEL] = jnp.asarray(dense["kernel"]).reshape(fan_in, -1).T
  return out


def is_step_params(params: Any) -> bool:
  """Whether `params` came from `step_params` (its decoder kernels transposed)."""
  return STEP_KERNEL in params["decoder"]["layers_0"]["mlp"]["wo"]
