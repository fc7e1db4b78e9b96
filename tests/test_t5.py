"""The Flax T5: shapes, logical axes, incremental decoding, dtypes."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deranj.models import base
from deranj.models import t5

TINY = dict(vocab_size=53, d_model=16, d_kv=6, d_ff=24, num_heads=3, num_layers=2,
            num_decoder_layers=3, dropout_rate=0.0)


def _batch(rng, vocab, b=3, s=9, t=7):
  r1, r2 = jax.random.split(rng)
  enc = jax.random.randint(r1, (b, s), 2, vocab)
  enc = enc.at[1, 5:].set(0).at[2, 2:].set(0)  # padded rows
  targets = jax.random.randint(r2, (b, t), 2, vocab)
  return enc, base.shift_right(targets)


@pytest.mark.parametrize("ff,tie", [("relu", True), ("gated-gelu", False)])
def test_incremental_decoding_matches_teacher_forcing(ff, tie):
  cfg = t5.T5Config(**TINY, feed_forward_proj=ff, tie_word_embeddings=tie)
  model = base.EncoderDecoderModel(t5.Transformer(cfg))
  params = model.init_params(jax.random.PRNGKey(0))
  enc, dec = _batch(jax.random.PRNGKey(1), cfg.vocab_size)
  full = model.logits(params, {"encoder_input_tokens": enc, "decoder_input_tokens": dec})

  step = jax.jit(model.decode_step)
  cache = model.init_cache(params, enc, max_decode_length=dec.shape[1])
  steps = []
  for i in range(dec.shape[1]):
    logits, cache = step(params, cache, dec[:, i])
    steps.append(logits)
  incremental = jnp.stack(steps, axis=1)
  assert incremental.shape == full.shape == (3, 7, cfg.vocab_size)
  np.testing.assert_allclose(incremental, full, atol=1e-5, rtol=0)


def test_decoder_is_causal_and_encoder_ignores_padding():
  cfg = t5.T5Config(**TINY)
  model = base.EncoderDecoderModel(t5.Transformer(cfg))
  params = model.init_params(jax.random.PRNGKey(0))
  enc, dec = _batch(jax.random.PRNGKey(2), cfg.vocab_size)
  logits = model.logits(params, {"encoder_input_tokens": enc, "decoder_input_tokens": dec})
  # Changing a later decoder token leaves earlier positions untouched.
  dec2 = dec.at[:, 4].set((dec[:, 4] + 1) % cfg.vocab_size)
  logits2 = model.logits(params, {"encoder_input_tokens": enc, "decoder_input_tokens": dec2})
  np.testing.assert_array_equal(logits[:, :4], logits2[:, :4])
  assert not np.allclose(logits[:, 4:], logits2[:, 4:])
  # Extra PAD on the encoder side changes nothing for that row.
  enc_padded = jnp.pad(enc, ((0, 0), (0, 4)))
  logits3 = model.logits(params, {"encoder_input_tokens": enc_padded, "decoder_input_tokens": dec})
  np.testing.assert_allclose(logits3, logits, atol=1e-5)


def test_params_carry_logical_axes():
  cfg = t5.T5Config(**TINY, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
  model = base.EncoderDecoderModel(t5.Transformer(cfg))
  axes = model.logical_axes()
  params = model.init_params(jax.random.PRNGKey(0))
  flat_axes = jax.tree_util.tree_leaves_with_path(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  flat_params = dict(jax.tree_util.tree_leaves_with_path(params))
  assert len(flat_axes) == len(flat_params)
  for path, spec in flat_axes:
    assert len(spec) == flat_params[path].ndim, path
  assert axes["token_embedder"]["embedding"] == jax.sharding.PartitionSpec("vocab", "embed")
  assert axes["decoder"]["logits_dense"]["kernel"] == jax.sharding.PartitionSpec("embed", "vocab")
  assert axes["encoder"]["layers_0"]["attention"]["query"]["kernel"] == \
      jax.sharding.PartitionSpec("embed", "heads", "kv")
  assert axes["decoder"]["layers_0"]["mlp"]["wi_0"]["kernel"] == jax.sharding.PartitionSpec("embed", "mlp")
  assert axes["decoder"]["relpos_bias"]["rel_embedding"] == \
      jax.sharding.PartitionSpec("heads", "relpos_buckets")


def test_bfloat16_activations_and_params():
  cfg = t5.T5Config(**TINY, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  model = base.EncoderDecoderModel(t5.Transformer(cfg))
  params = model.init_params(jax.random.PRNGKey(0))
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(params))
  enc, dec = _batch(jax.random.PRNGKey(1), cfg.vocab_size)
  logits = model.logits(params, {"encoder_input_tokens": enc, "decoder_input_tokens": dec})
  assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))
  f32 = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), params)
  ref = base.EncoderDecoderModel(t5.Transformer(t5.T5Config(**TINY))).logits(
      f32, {"encoder_input_tokens": enc, "decoder_input_tokens": dec})
  # Same weights: bf16 activations stay close to float32.
  assert float(jnp.abs(logits - ref).max()) < 0.15 * float(jnp.abs(ref).max())


def test_dropout_needs_rng_and_changes_output():
  cfg = t5.T5Config(**{**TINY, "dropout_rate": 0.3})
  model = base.EncoderDecoderModel(t5.Transformer(cfg))
  params = model.init_params(jax.random.PRNGKey(0))
  enc, dec = _batch(jax.random.PRNGKey(1), cfg.vocab_size)
  batch = {"encoder_input_tokens": enc, "decoder_input_tokens": dec}
  a = model.logits(params, batch)
  np.testing.assert_array_equal(a, model.logits(params, batch))
  b = model.logits(params, batch, dropout_rng=jax.random.PRNGKey(3))
  assert not np.allclose(a, b)


class _FlaxDropout(nn.Module):
  """nn.Dropout in a module of the same shape as t5.Dropout's callers (same rng path)."""
  rate: float
  ours: bool

  @nn.compact
  def __call__(self, x):
    if self.ours:
      return t5.Dropout(self.rate)(x, deterministic=False)
    return nn.Dropout(self.rate)(x, deterministic=False)


@pytest.mark.parametrize("make_key", [jax.random.PRNGKey, jax.random.key,
                                      lambda s: jax.random.key(s, impl="rbg")])
@pytest.mark.parametrize("shape,rate", [((4, 3, 33, 17), 0.1), ((7,), 0.5), ((20, 50), 0.9)])
def test_dropout_is_flax_dropout_bit_for_bit(make_key, shape, rate):
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  for seed in (0, 1, 12345):
    rngs = {"dropout": make_key(seed)}
    ours = jax.jit(lambda x, r: _FlaxDropout(rate, True).apply({}, x, rngs=r))(x, rngs)
    flax = jax.jit(lambda x, r: _FlaxDropout(rate, False).apply({}, x, rngs=r))(x, rngs)
    np.testing.assert_array_equal(ours, flax)
  assert 0 < float(jnp.mean(ours == 0)) < 1


def test_bernoulli_is_jax_bernoulli():
  for seed in (0, 7):
    key = jax.random.PRNGKey(seed)
    for p in (0.1, 0.5, 0.999):
      np.testing.assert_array_equal(t5.bernoulli(key, p, (3, 1000)),
                                    jax.random.bernoulli(key, p, (3, 1000)))


def test_bad_feed_forward_proj():
  with pytest.raises(ValueError, match="feed_forward_proj"):
    t5.T5Config(feed_forward_proj="swish")
