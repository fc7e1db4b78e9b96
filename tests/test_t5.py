"""The Flax T5: shapes, logical axes, incremental decoding, dtypes."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deranj.models import base
from deranj.models import t5
from numerics import assert_close_f32
import tiny_models

TINY = dict(vocab_size=53, d_model=16, d_kv=6, d_ff=24, num_heads=3, num_layers=2,
            num_decoder_layers=3, dropout_rate=0.0)


def _params(model, seed=0, dtype=np.float32):
  """NumPy-drawn parameters (flax's init compiles for seconds; what these tests check does
  not depend on the initialiser)."""
  return jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype),
                                tiny_models.random_params(model, seed))


@functools.partial(jax.jit, static_argnums=0)
def _logits(model, params, enc, dec):
  return model.logits(params, _batch_dict(enc, dec))


def _batch_dict(enc, dec):
  """The model batch whose teacher-forcing inputs are `dec` (0, then responses[:, :-1])."""
  return base.response_batch(enc, jnp.roll(dec, -1, axis=1))


def _batch(seed, vocab, b=3, s=9, t=7):
  rng = np.random.default_rng(seed)
  enc = rng.integers(2, vocab, (b, s))
  enc[1, 5:], enc[2, 2:] = 0, 0  # padded rows
  dec = rng.integers(2, vocab, (b, t))
  dec[:, 0] = 0  # targets shifted right
  return jnp.asarray(enc, jnp.int32), jnp.asarray(dec, jnp.int32)


@pytest.mark.parametrize("ff,tie,fuse,transpose", [
    ("relu", True, True, True), ("relu", True, True, False), ("gated-gelu", False, True, True),
    ("gated-gelu", False, False, True), ("gated-gelu", False, False, False)])
def test_incremental_decoding_matches_teacher_forcing(ff, tie, fuse, transpose):
  # fuse: each step's q|k|v and wi_0|wi_1 as one matmul (T5Config.fuse_decode_projections);
  # transpose: the steps read `step_params`, kernels [N, K] (transpose_decode_kernels).
  cfg = t5.T5Config(**TINY, feed_forward_proj=ff, tie_word_embeddings=tie,
                    fuse_decode_projections=fuse, transpose_decode_kernels=transpose)
  model = base.EncoderDecoderModel(t5.Transformer(cfg))
  params = _params(model)
  enc, dec = _batch(1, cfg.vocab_size)
  full = _logits(model, params, enc, dec)

  step = jax.jit(model.decode_step)
  cache = jax.jit(model.init_cache, static_argnums=2)(params, enc, dec.shape[1])
  stepping = model.step_params(params)
  leaves = lambda tree: {jax.tree_util.keystr(k) for k, _ in
                         jax.tree_util.tree_leaves_with_path(tree)}
  if transpose:  # no kernel of the stored layout is left in the decoder's steps
    assert not any("decoder" in k and "'kernel'" in k for k in leaves(stepping))
    assert model.step_params(stepping) is stepping  # made once, however often asked
  else:
    assert stepping is params
  steps = []
  for i in range(dec.shape[1]):
    logits, cache = step(stepping, cache, dec[:, i])
    steps.append(logits)
  incremental = jnp.stack(steps, axis=1)
  assert incremental.shape == full.shape == (3, 7, cfg.vocab_size)
  # Both sum the same terms in another order: rounding of the size of the logits.
  assert_close_f32(incremental, full, cfg.d_model, np.abs(full).max())


def test_decoder_is_causal_and_encoder_ignores_padding():
  cfg = t5.T5Config(**TINY)
  model = base.EncoderDecoderModel(t5.Transformer(cfg))
  params = _params(model)
  enc, dec = _batch(2, cfg.vocab_size)
  logits = _logits(model, params, enc, dec)
  # Changing a later decoder token leaves earlier positions untouched.
  dec2 = dec.at[:, 4].set((dec[:, 4] + 1) % cfg.vocab_size)
  logits2 = _logits(model, params, enc, dec2)
  np.testing.assert_array_equal(logits[:, :4], logits2[:, :4])
  assert not np.allclose(logits[:, 4:], logits2[:, 4:])
  # Extra PAD on the encoder side changes nothing for that row (attention over more,
  # masked, positions: rounding only).
  enc_padded = jnp.pad(enc, ((0, 0), (0, 4)))
  logits3 = _logits(model, params, enc_padded, dec)
  assert_close_f32(logits3, logits, cfg.d_model, np.abs(logits).max())


def test_params_carry_logical_axes():
  cfg = t5.T5Config(**TINY, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
  model = base.EncoderDecoderModel(t5.Transformer(cfg))
  axes = model.logical_axes()
  params = jax.eval_shape(model.init_params, jax.random.PRNGKey(0))
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
  initialised = jax.eval_shape(model.init_params, jax.random.PRNGKey(0))
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(initialised))
  params = _params(model, dtype=jnp.bfloat16)
  enc, dec = _batch(1, cfg.vocab_size)
  logits = _logits(model, params, enc, dec)
  assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))
  f32 = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), params)
  ref = _logits(base.EncoderDecoderModel(t5.Transformer(t5.T5Config(**TINY))), f32, enc, dec)
  # Same weights: bf16 activations stay close to float32.
  assert float(jnp.abs(logits - ref).max()) < 0.15 * float(jnp.abs(ref).max())


def test_dropout_needs_rng_and_changes_output():
  cfg = t5.T5Config(**{**TINY, "dropout_rate": 0.3})
  model = base.EncoderDecoderModel(t5.Transformer(cfg))
  params = _params(model)
  enc, dec = _batch(1, cfg.vocab_size)
  batch = _batch_dict(enc, dec)
  logits = jax.jit(model.logits)
  a = logits(params, batch)
  np.testing.assert_array_equal(a, logits(params, batch))
  b = logits(params, batch, dropout_rng=jax.random.PRNGKey(3))
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
@pytest.mark.parametrize("shape,rate", [((2, 3, 33, 17), 0.1), ((7,), 0.5), ((20, 50), 0.9)])
def test_dropout_is_flax_dropout_bit_for_bit(make_key, shape, rate):
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  jitted = lambda ours: jax.jit(lambda x, r: _FlaxDropout(rate, ours).apply({}, x, rngs=r))
  ours_fn, flax_fn = jitted(True), jitted(False)  # compiled once, for all seeds
  for seed in (0, 1, 12345):
    rngs = {"dropout": make_key(seed)}
    ours = ours_fn(x, rngs)
    np.testing.assert_array_equal(ours, flax_fn(x, rngs))
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
