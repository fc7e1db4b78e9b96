"""Llama-architecture decoder-only transformer in Flax linen (Llama, Mistral, Qwen2, Qwen3).

Pre-norm blocks of RMSNorm, rotary position embeddings (RoPE), grouped-query attention
and a SwiGLU MLP; optional q/k/v biases (Qwen2), q/k RMS norms per head (Qwen3) and a
sliding attention window (Mistral); the output head tied to the embedding or not.

Shapes use B = batch, L = length, D = hidden_size, H = query heads, G = key/value heads,
K = head_dim (independent of D / H), F = intermediate_size, V = vocab. Parameters carry
the logical axis names of `t5` (key/value heads use HEADS, like query heads).

Padding is given by an attention mask, never by a token id (0 is an ordinary token in
these vocabularies). The position of a token is the number of real tokens before it in
its row, so left- and right-padded rows give the same logits at their real tokens.

Incremental decoding (`decode=True`, under `mutable=['cache']`): the first call creates
a cache of `max_decode_length` slots and writes its tokens (a prompt prefill, usually
left-padded, so every row's next token goes in the same slot); each later call appends
its tokens (usually one [B, 1]) at `cache_index`. The cache holds, per layer,
`cached_key` / `cached_value` [B, G, max_decode_length, K], and at the top
`cache_index` [], `key_mask` [B, max_decode_length] (slots written with real tokens)
and `key_positions` [B, max_decode_length]. Writing past the last slot is not checked.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from deranj.models import t5
from deranj.models.axes import EMBED, HEADS, KV, MLP, VOCAB
from deranj.models.t5 import NEG_INF

Array = jax.Array
DType = Any


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Frequency scaling of RoPE: "linear" (all divided by `factor`) or "llama3" (Llama 3.1:
  long wavelengths divided by `factor`, short ones kept, a smooth ramp between)."""
  kind: str
  factor: float
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192

  def __post_init__(self):
    if self.kind not in ("linear", "llama3"):
      raise ValueError(f"RopeScaling.kind={self.kind!r}: expected 'linear' or 'llama3'.")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Global hyperparameters of a decoder-only network (Hugging Face's names, shortened)."""
  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_layers: int = 32
  num_heads: int = 32
  num_kv_heads: int = 32
  head_dim: int = 128
  rope_theta: float = 10000.0
  rope_scaling: Optional[RopeScaling] = None
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = False
  attention_bias: bool = False  # biases on the q/k/v projections (Qwen2)
  qk_norm: bool = False  # RMS norm of each query/key head before RoPE (Qwen3)
  sliding_window: Optional[int] = None  # a key is seen by queries < this many positions on
  max_position_embeddings: int = 4096
  dtype: DType = jnp.float32  # activations
  param_dtype: DType = jnp.float32

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"DecoderConfig: num_heads={self.num_heads} is not a multiple of "
                       f"num_kv_heads={self.num_kv_heads}.")
    if self.head_dim % 2:
      raise ValueError(f"DecoderConfig: head_dim={self.head_dim} must be even (RoPE).")


def rope_frequencies(config: DecoderConfig) -> np.ndarray:
  """The K/2 inverse frequencies of RoPE, as float32 (computed on the host in float64)."""
  dim = config.head_dim
  inv_freq = 1.0 / config.rope_theta**(np.arange(0, dim, 2, dtype=np.float64) / dim)
  scaling = config.rope_scaling
  if scaling is not None and scaling.kind == "linear":
    inv_freq = inv_freq / scaling.factor
  elif scaling is not None:  # llama3
    old = scaling.original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    low_wavelen, high_wavelen = old / scaling.low_freq_factor, old / scaling.high_freq_factor
    scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    ramp = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    inv_freq = np.where((wavelen >= high_wavelen) & (wavelen <= low_wavelen), ramp, scaled)
  return inv_freq.astype(np.float32)


def apply_rope(x: Array, positions: Array, inv_freq: np.ndarray) -> Array:
  """Rotates [B, L, N, K] by [B, L] positions (Hugging Face's half-split pairing)."""
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, L, K/2]
  cos, sin = jnp.cos(angles)[:, :, None], jnp.sin(angles)[:, :, None]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def positions_from_mask(attention_mask: Array, offset: Optional[Array] = None) -> Array:
  """[B, L] mask -> [B, L] int32: real tokens before each position (+ `offset` [B])."""
  mask = attention_mask.astype(jnp.int32)
  before = jnp.cumsum(mask, axis=1) - mask
  return before if offset is None else before + offset[:, None]


def attention_bias(query_slots: Array, query_positions: Array, key_mask: Array,
                   key_positions: Array, sliding_window: Optional[int]) -> Array:
  """Additive bias [B, 1, Q, S]: a query sees real keys in slots up to its own (and,
  with a sliding window, fewer than `sliding_window` positions back).

  Args:
    query_slots: [Q] slot of each query (its index in the key sequence).
    query_positions: [B, Q].
    key_mask: [B, S], True for real tokens.
    key_positions: [B, S].
    sliding_window: None or the window.
  """
  slots = jnp.arange(key_mask.shape[1])
  allowed = key_mask[:, None, :] & (slots[None, None, :] <= query_slots[None, :, None])
  if sliding_window is not None:
    allowed &= query_positions[:, :, None] - key_positions[:, None, :] < sliding_window
  return jnp.where(allowed, 0.0, NEG_INF).astype(jnp.float32)[:, None]


# ----------------------------------------------------------------------------- layers


class RMSNorm(nn.Module):
  """x / rms(x) * scale over the last axis, statistics in float32."""
  config: DecoderConfig
  axis_name: str = EMBED

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    x32 = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    y = (x32 * jax.lax.rsqrt(var + cfg.rms_norm_eps)).astype(cfg.dtype)
    scale = t5._param(self, "scale", nn.initializers.ones, (x.shape[-1],), (self.axis_name,),
                      cfg)
    return y * scale.astype(cfg.dtype)


class Dense(t5.Dense):
  """`t5.Dense` with an optional bias over the output axes."""
  use_bias: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    y = super().__call__(x)
    if not self.use_bias:
      return y
    bias = t5._param(self, "bias", nn.initializers.zeros, self.features, self.out_axes,
                     self.config)
    return y + bias.astype(self.config.dtype)


class Mlp(nn.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""
  config: DecoderConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    f = (cfg.intermediate_size,)
    gate = Dense(f, (EMBED,), (MLP,), cfg, name="gate")(x)
    up = Dense(f, (EMBED,), (MLP,), cfg, name="up")(x)
    return Dense((cfg.hidden_size,), (MLP,), (EMBED,), cfg, name="down")(jax.nn.silu(gate) * up)


class Attention(nn.Module):
  """Grouped-query attention with RoPE: query head h reads key/value head h // (H / G)."""
  config: DecoderConfig

  def _proj(self, heads: int, name: str) -> Dense:
    cfg = self.config
    return Dense((heads, cfg.head_dim), (EMBED,), (HEADS, KV), cfg,
                 use_bias=cfg.attention_bias, name=name)

  @nn.compact
  def __call__(self, x: Array, positions: Array, bias: Array, *, decode: bool = False,
               cache_index: Optional[Array] = None, cache_length: int = 0) -> Array:
    """[B, L, D] -> [B, L, D]; `bias` [B, 1, L, S] covers the keys attended to (the L
    fresh ones, or the S cache slots in decode mode)."""
    cfg = self.config
    query = self._proj(cfg.num_heads, "query")(x)  # [B, L, H, K]
    key = self._proj(cfg.num_kv_heads, "key")(x)  # [B, L, G, K]
    value = self._proj(cfg.num_kv_heads, "value")(x)
    if cfg.qk_norm:
      query = RMSNorm(cfg, KV, name="query_norm")(query)
      key = RMSNorm(cfg, KV, name="key_norm")(key)
    inv_freq = rope_frequencies(cfg)
    query, key = apply_rope(query, positions, inv_freq), apply_rope(key, positions, inv_freq)
    # Heads-major [B, G, len, K], as the cache stores them.
    key, value = jnp.swapaxes(key, 1, 2), jnp.swapaxes(value, 1, 2)
    if decode:
      key, value = self._update_cache(key, value, cache_index, cache_length)

    b, length = x.shape[:2]
    groups = cfg.num_heads // cfg.num_kv_heads
    query = query.reshape(b, length, cfg.num_kv_heads, groups, cfg.head_dim)
    logits = jnp.einsum("bqhgk,bhsk->bhgqs", query, key).astype(jnp.float32)
    logits = logits * cfg.head_dim**-0.5 + bias[:, :, None]  # [B, G, H/G, L, S]
    weights = jax.nn.softmax(logits, axis=-1).astype(cfg.dtype)
    out = jnp.einsum("bhgqs,bhsk->bqhgk", weights, value)
    out = out.reshape(b, length, cfg.num_heads, cfg.head_dim)
    return Dense((cfg.hidden_size,), (HEADS, KV), (EMBED,), cfg, name="out")(out)

  def _update_cache(self, key: Array, value: Array, index: Array, cache_length: int):
    """Writes [B, G, L, K] at slot `index`; returns the whole cache [B, G, S, K]."""
    b, g, _, k = key.shape
    shape = (b, g, cache_length, k)
    cached_key = self.variable("cache", "cached_key", jnp.zeros, shape, key.dtype)
    cached_value = self.variable("cache", "cached_value", jnp.zeros, shape, value.dtype)
    cached_key.value = jax.lax.dynamic_update_slice_in_dim(cached_key.value, key, index, axis=2)
    cached_value.value = jax.lax.dynamic_update_slice_in_dim(cached_value.value, value, index,
                                                             axis=2)
    return cached_key.value, cached_value.value


class Layer(nn.Module):
  config: DecoderConfig

  @nn.compact
  def __call__(self, x: Array, positions: Array, bias: Array, decode: bool,
               cache_index: Optional[Array], cache_length: int) -> Array:
    cfg = self.config
    h = RMSNorm(cfg, name="pre_attention_norm")(x)
    x = x + Attention(cfg, name="attention")(h, positions, bias, decode=decode,
                                             cache_index=cache_index, cache_length=cache_length)
    h = RMSNorm(cfg, name="pre_mlp_norm")(x)
    return x + Mlp(cfg, name="mlp")(h)


class Transformer(nn.Module):
  """Decoder-only language model.

  `Transformer(config).apply({'params': p}, tokens)` returns logits [B, L, V] (float32)
  for tokens [B, L], unpadded or padded as `attention_mask` [B, L] (1 = real token) says.
  The logit at a padding position is meaningless.
  """
  config: DecoderConfig

  @nn.compact
  def __call__(self, tokens: Array, attention_mask: Optional[Array] = None, *,
               decode: bool = False, max_decode_length: Optional[int] = None,
               num_logits: Optional[int] = None, hidden: bool = False) -> Array:
    """Logits [B, num_logits, V] at the last `num_logits` positions (default: all L).

    Args:
      tokens: [B, L] int ids.
      attention_mask: [B, L], nonzero for real tokens; default all real.
      decode: run against the cache (mutable=['cache']): the first call creates it with
        `max_decode_length` slots and writes `tokens` from slot 0 (a prefill); later
        calls append theirs after the last written slot.
      max_decode_length: slots of the cache, on the creating call.
      num_logits: how many trailing positions get logits; 0 skips the output head (a
        prefill whose logits are not needed).
      hidden: return the final (normed) hidden states [B, num_logits, D] that the output
        head would read, instead of logits (for value and reward heads).
    """
    cfg = self.config
    b, length = tokens.shape
    mask = (jnp.ones((b, length), bool) if attention_mask is None
            else jnp.asarray(attention_mask) != 0)
    if decode:
      created = self.has_variable("cache", "cache_index")
      if not created and max_decode_length is None:
        raise ValueError("The first decode=True call creates the cache: pass max_decode_length.")
      cache_length = 0 if created else max_decode_length
      index_var = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
      key_mask = self.variable("cache", "key_mask", jnp.zeros, (b, cache_length), bool)
      key_pos = self.variable("cache", "key_positions", jnp.zeros, (b, cache_length), jnp.int32)
      index = index_var.value
      positions = positions_from_mask(mask, jnp.sum(key_mask.value, axis=1, dtype=jnp.int32))
      key_mask.value = jax.lax.dynamic_update_slice_in_dim(key_mask.value, mask, index, axis=1)
      key_pos.value = jax.lax.dynamic_update_slice_in_dim(key_pos.value, positions, index, axis=1)
      index_var.value = index + length
      bias = attention_bias(index + jnp.arange(length), positions, key_mask.value, key_pos.value,
                            cfg.sliding_window)
    else:
      index, cache_length = None, 0
      positions = positions_from_mask(mask)
      bias = attention_bias(jnp.arange(length), positions, mask, positions, cfg.sliding_window)

    # A tied head reads the embedding too: rows of norm ~1 keep a random model's logits
    # (hidden states of norm ~sqrt(D) after the final norm) near unit scale.
    init_std = cfg.hidden_size**-0.5 if cfg.tie_word_embeddings else 1.0
    embedder = nn.Embed(
        cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(init_std),
                                                    (VOCAB, EMBED)),
        name="token_embedder")
    x = embedder(tokens.astype(jnp.int32)).astype(cfg.dtype)
    for i in range(cfg.num_layers):
      x = Layer(cfg, name=f"layers_{i}")(x, positions, bias, decode, index, cache_length)
    x = RMSNorm(cfg, name="final_norm")(x)  # [B, L, D]

    keep = length if num_logits is None else num_logits
    x = x[:, length - keep:]
    if hidden:
      return x
    if cfg.tie_word_embeddings:
      logits = embedder.attend(x)
    else:
      logits = Dense((cfg.vocab_size,), (EMBED,), (VOCAB,), cfg, name="lm_head")(x)
    return logits.astype(jnp.float32)


def step_params(params: Any, config: DecoderConfig) -> Any:
  """The parameters as decoding steps read them (as `t5.step_params`): each layer's and
  the untied head's kernels transposed to `t5.STEP_KERNEL` [N, K], made once per sampler
  call outside its loop. Serves decoding steps only (`init_cache` reads `params`).
  Idempotent."""
  if is_step_params(params):
    return params
  d, attn = config.hidden_size, config.num_heads * config.head_dim
  out = dict(params)
  for i in range(config.num_layers):
    layer = dict(params[f"layers_{i}"])
    a, m = layer["attention"], layer["mlp"]
    layer["attention"] = {**a, **{n: t5.step_dense(a[n], d) for n in ("query", "key", "value")},
                          "out": t5.step_dense(a["out"], attn)}
    layer["mlp"] = {"gate": t5.step_dense(m["gate"], d), "up": t5.step_dense(m["up"], d),
                    "down": t5.step_dense(m["down"], config.intermediate_size)}
    out[f"layers_{i}"] = layer
  if not config.tie_word_embeddings:
    out["lm_head"] = t5.step_dense(params["lm_head"], d)
  return out


def is_step_params(params: Any) -> bool:
  """Whether `params` came from `step_params`."""
  return t5.STEP_KERNEL in params["layers_0"]["mlp"]["down"]
