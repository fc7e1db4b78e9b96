"""DeRa sampling: the mixing rule, exactness at lam in {0, 1}, frequencies, statistics."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from deranj import decoding
from deranj import dera
from deranj import profiling
from deranj.models import base
from deranj.models import t5

CFG = t5.T5Config(vocab_size=23, d_model=16, d_kv=8, d_ff=32, num_heads=2, num_layers=2,
                  dropout_rate=0.0, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
# A smaller aligned model (EFT-style pairs differ in depth and width).
CFG_SMALL = t5.T5Config(vocab_size=23, d_model=8, d_kv=4, d_ff=16, num_heads=2, num_layers=1,
                        dropout_rate=0.0)


def _model(cfg, seed):
  model = base.EncoderDecoderModel(t5.Transformer(cfg))
  params = model.init_params(jax.random.PRNGKey(seed))
  # Sharpen the output head so the two models disagree visibly.
  return model, jax.tree_util.tree_map(lambda x: x * 1.5, params)


@pytest.fixture(scope="module")
def pair():
  ref, ref_p = _model(CFG, 0)
  al, al_p = _model(CFG_SMALL, 1)
  return ref, ref_p, al, al_p


PROMPTS = jnp.array([[5, 6, 7, 8, 1], [9, 10, 1, 0, 0], [11, 1, 0, 0, 0]])


def _without_pad(logits, pad_column=False):
  """float64 logits with PAD (id 0) at -inf; `pad_column`: prepend that column instead."""
  x = np.asarray(logits, np.float64)
  if pad_column:
    return np.concatenate([np.full(x.shape[:-1] + (1,), -np.inf), x], axis=-1)
  x = x.copy()
  x[..., 0] = -np.inf
  return x


def _np_log_softmax(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def test_dera_logits_against_float64():
  rng = np.random.default_rng(0)
  ref = rng.normal(size=(4, 11)).astype(np.float32)
  al = rng.normal(size=(4, 11)).astype(np.float32)
  lam = np.array([0.0, 0.5, 1.0, 3.0], np.float32)
  out = np.asarray(decoding.dera_logits(jnp.asarray(ref), jnp.asarray(al), jnp.asarray(lam)))
  expected = lam[:, None].astype(np.float64) * al + (1 - lam[:, None].astype(np.float64)) * ref
  np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(out[0], ref[0])  # lam = 0: the reference, bit for bit
  np.testing.assert_array_equal(out[2], al[2])  # lam = 1: the aligned model
  scalar = decoding.dera_logits(jnp.asarray(ref), jnp.asarray(al), 0.25)
  np.testing.assert_allclose(scalar, 0.25 * al + 0.75 * ref, rtol=1e-6)
  # The general mixture agrees with dera_logits exactly.
  w = jnp.stack([1 - jnp.asarray(lam), jnp.asarray(lam)], axis=1)
  np.testing.assert_array_equal(decoding.mixture_logits(jnp.stack([ref, al]), w), out)


def test_filter_logits_top_k_and_top_p():
  logits = jnp.log(jnp.array([[0.5, 0.2, 0.15, 0.1, 0.05]]))
  kept = lambda x: np.asarray(x[0] > decoding.NEG_INF / 2)
  np.testing.assert_array_equal(kept(decoding.filter_logits(logits, top_k=2)),
                                [1, 1, 0, 0, 0])
  np.testing.assert_array_equal(kept(decoding.filter_logits(logits, top_p=0.8)),
                                [1, 1, 1, 0, 0])
  np.testing.assert_array_equal(kept(decoding.filter_logits(logits, top_p=0.3)),
                                [1, 0, 0, 0, 0])


def test_lam_zero_and_one_are_bit_exact(pair):
  ref, ref_p, al, al_p = pair
  _, other_al = _model(CFG_SMALL, 7)
  _, other_ref = _model(CFG, 8)
  rng = jax.random.PRNGKey(3)
  kw = dict(max_decode_len=9)
  a = dera.Realigner(ref, ref_p, al, al_p, **kw).sample(PROMPTS, 0.0, rng, num_decodes=4)
  b = dera.Realigner(ref, ref_p, al, other_al, **kw).sample(PROMPTS, 0.0, rng, num_decodes=4)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_array_equal(a.logq, b.logq)
  np.testing.assert_array_equal(a.logp_ref, b.logp_ref)
  np.testing.assert_array_equal(a.kl_ref, 0.0 * a.kl_ref)  # q is the reference itself
  # ...and equal to sampling the reference alone with the same loop.
  single = decoding.sample(ref, ref_p, PROMPTS, rng, num_decodes=4, **kw)
  np.testing.assert_array_equal(a.tokens, single.tokens)
  np.testing.assert_array_equal(a.logp_ref, single.logp[:, 0])

  c = dera.Realigner(ref, ref_p, al, al_p, **kw).sample(PROMPTS, 1.0, rng, num_decodes=4)
  d = dera.Realigner(ref, other_ref, al, al_p, **kw).sample(PROMPTS, 1.0, rng, num_decodes=4)
  np.testing.assert_array_equal(c.tokens, d.tokens)
  np.testing.assert_array_equal(c.logp_aligned, d.logp_aligned)
  assert not np.array_equal(a.tokens, c.tokens)


def test_first_token_frequencies_match_mixed_softmax(pair):
  """Chi-squared test of 20k draws against softmax(dera_logits) at step 0."""
  ref, ref_p, al, al_p = pair
  lam = 2.5
  prompt = PROMPTS[:1]
  start = {"encoder_input_tokens": prompt, "decoder_input_tokens": jnp.zeros((1, 1), jnp.int32)}
  h = decoding.dera_logits(ref.logits(ref_p, start)[0, 0], al.logits(al_p, start)[0, 0], lam)
  h = decoding.mask_pad(h, 0)  # PAD is never sampled
  probs = np.exp(_np_log_softmax(h))
  n = 20000
  out = dera.Realigner(ref, ref_p, al, al_p, max_decode_len=1).sample(
      prompt, lam, jax.random.PRNGKey(0), num_decodes=n)
  counts = np.bincount(np.asarray(out.tokens[:, 0]), minlength=CFG.vocab_size)
  keep = probs * n >= 5  # chi-squared needs enough expected counts per cell
  observed = np.append(counts[keep], counts[~keep].sum())
  expected = np.append(probs[keep], probs[~keep].sum()) * n
  assert stats.chisquare(observed, expected).pvalue > 1e-3
  # The wrong lam is rejected by the same test.
  h_wrong = decoding.mask_pad(decoding.dera_logits(
      ref.logits(ref_p, start)[0, 0], al.logits(al_p, start)[0, 0], 1.0), 0)
  p_wrong = np.exp(_np_log_softmax(h_wrong))
  expected_wrong = np.append(p_wrong[keep], p_wrong[~keep].sum()) * n
  assert stats.chisquare(observed, expected_wrong).pvalue < 1e-6


def test_per_row_lam_equals_scalar_calls(pair):
  ref, ref_p, al, al_p = pair
  realigner = dera.Realigner(ref, ref_p, al, al_p, max_decode_len=8)
  lams = np.array([0.0, 0.7, 3.0], np.float32)
  rng = jax.random.PRNGKey(5)
  rows = realigner.sample(PROMPTS, lams, rng)
  for i, lam in enumerate(lams):
    scalar = realigner.sample(PROMPTS, float(lam), rng)
    np.testing.assert_array_equal(rows.tokens[i], scalar.tokens[i])
    np.testing.assert_allclose(rows.logq[i], scalar.logq[i], rtol=0, atol=0)


def test_sweep_as_num_decodes_equals_repeated_prompts(pair):
  """lam per output row with num_decodes encodes each prompt once, same samples."""
  ref, ref_p, al, al_p = pair
  realigner = dera.Realigner(ref, ref_p, al, al_p, max_decode_len=8)
  lams = np.array([0.0, 1.0, 4.0], np.float32)
  per_row = np.tile(lams, len(PROMPTS))
  rng = jax.random.PRNGKey(4)
  sweep = realigner.sample(PROMPTS, per_row, rng, num_decodes=len(lams))
  repeated = realigner.sample(jnp.repeat(PROMPTS, len(lams), axis=0), per_row, rng)
  np.testing.assert_array_equal(sweep.tokens, repeated.tokens)
  np.testing.assert_allclose(sweep.logq, repeated.logq, atol=1e-5)
  # Per-prompt lam with num_decodes repeats each prompt's lam over its rows.
  per_prompt = realigner.sample(PROMPTS, lams, rng, num_decodes=2)
  again = realigner.sample(PROMPTS, np.repeat(lams, 2), rng, num_decodes=2)
  np.testing.assert_array_equal(per_prompt.tokens, again.tokens)


def test_lam_sweep_compiles_once(pair):
  ref, ref_p, al, al_p = pair
  realigner = dera.Realigner(ref, ref_p, al, al_p, max_decode_len=6)
  with profiling.count_compiles("_sample_logit_mixed") as compiles:
    for lam in [0.0, 0.5, 1.0, 2.0, 5.0, 10.0]:
      realigner.sample(PROMPTS, lam, jax.random.PRNGKey(0))
    realigner.sample(PROMPTS, np.array([0.1, 0.2, 0.3]), jax.random.PRNGKey(0))  # per row
  assert compiles.count == 1, compiles.functions


def test_statistics_match_teacher_forcing(pair):
  """logq, logp_ref, logp_aligned, log_weight and kl_ref against float64 NumPy."""
  ref, ref_p, al, al_p = pair
  lam = np.array([0.5, 2.0, -0.5], np.float32)
  realigner = dera.Realigner(ref, ref_p, al, al_p, max_decode_len=10)
  out = realigner.sample(PROMPTS, lam, jax.random.PRNGKey(11))
  tokens = np.asarray(out.tokens)
  batch = {"encoder_input_tokens": PROMPTS, "decoder_target_tokens": out.tokens,
           "decoder_input_tokens": base.shift_right(out.tokens)}
  # Each model as it samples alone: PAD never drawn.
  lp_ref = _np_log_softmax(_without_pad(ref.logits(ref_p, batch)))  # [B, T, V]
  lp_al = _np_log_softmax(_without_pad(al.logits(al_p, batch)))
  lam64 = lam.astype(np.float64)[:, None, None]
  geo = _without_pad((1 - lam64) * lp_ref[..., 1:] + lam64 * lp_al[..., 1:], pad_column=True)
  log_z = np.log(np.exp(geo).sum(-1))  # [B, T]
  log_q = geo - log_z[..., None]
  mask = np.arange(tokens.shape[1])[None] < np.asarray(out.lengths)[:, None]
  at = lambda lp: np.take_along_axis(lp, tokens[..., None], -1)[..., 0]
  q = np.exp(log_q[..., 1:])
  kl = (q * (log_q[..., 1:] - lp_ref[..., 1:])).sum(-1)
  np.testing.assert_allclose(out.logq, np.where(mask, at(log_q), 0).sum(-1), atol=1e-4,
                             rtol=1e-5)
  np.testing.assert_allclose(out.logp_ref, np.where(mask, at(lp_ref), 0).sum(-1), atol=1e-4,
                             rtol=1e-5)
  np.testing.assert_allclose(out.logp_aligned, np.where(mask, at(lp_al), 0).sum(-1), atol=1e-4,
                             rtol=1e-5)
  np.testing.assert_allclose(out.log_weight, (log_z * mask).sum(-1), atol=1e-4, rtol=1e-5)
  np.testing.assert_allclose(out.kl_ref, (kl * mask).sum(-1), atol=1e-4, rtol=1e-5)
  # Tokens are 0 after EOS, and lengths count up to and including EOS.
  for row, length in zip(tokens, np.asarray(out.lengths)):
    assert np.all(row[length:] == 0)
    if length < tokens.shape[1]:
      assert row[length - 1] == 1
  # No PAD mid-sequence, and score() is the distribution sampled.
  assert not np.any((tokens == 0) & mask)
  np.testing.assert_allclose(np.asarray(realigner.score(PROMPTS, out.tokens, lam)),
                             np.asarray(out.logq), atol=1e-4)


def test_score_against_float64(pair):
  ref, ref_p, al, al_p = pair
  targets = jnp.array([[3, 4, 5, 1, 0, 0], [6, 1, 0, 0, 0, 0], [7, 8, 9, 10, 11, 1]])
  lam = np.array([0.3, 1.0, 4.0], np.float32)
  batch = {"encoder_input_tokens": PROMPTS, "decoder_target_tokens": targets,
           "decoder_input_tokens": base.shift_right(targets)}
  h_ref = np.asarray(ref.logits(ref_p, batch), np.float64)
  h_al = np.asarray(al.logits(al_p, batch), np.float64)
  lam64 = lam.astype(np.float64)[:, None, None]
  h = lam64 * h_al + (1 - lam64) * h_ref
  h[..., 0] = -np.inf  # scored as sampled: PAD excluded
  lq = _np_log_softmax(h)
  t = np.asarray(targets)
  expected = np.where(t > 0, np.take_along_axis(lq, t[..., None], -1)[..., 0], 0).sum(-1)
  got = dera.Realigner(ref, ref_p, al, al_p, max_decode_len=6).score(PROMPTS, targets, lam)
  np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_greedy_follows_argmax(pair):
  ref, ref_p, al, al_p = pair
  out = dera.Realigner(ref, ref_p, al, al_p, max_decode_len=7).sample(
      PROMPTS, 1.5, jax.random.PRNGKey(0), temperature=0.0)
  batch = {"encoder_input_tokens": PROMPTS, "decoder_input_tokens": base.shift_right(out.tokens)}
  h = decoding.mask_pad(decoding.dera_logits(ref.logits(ref_p, batch), al.logits(al_p, batch),
                                             1.5), 0)
  greedy = np.asarray(jnp.argmax(h, -1))
  mask = np.arange(7)[None] < np.asarray(out.lengths)[:, None]
  np.testing.assert_array_equal(np.where(mask, greedy, 0), out.tokens)
  np.testing.assert_array_equal(out.logq, 0.0)


def test_top_k_restricts_support(pair):
  ref, ref_p, al, al_p = pair
  prompt = PROMPTS[:1]
  out = dera.Realigner(ref, ref_p, al, al_p, max_decode_len=1).sample(
      prompt, 1.0, jax.random.PRNGKey(1), top_k=3, num_decodes=500)
  start = {"encoder_input_tokens": prompt, "decoder_input_tokens": jnp.zeros((1, 1), jnp.int32)}
  h = al.logits(al_p, start)[0, 0]
  top3 = set(np.argsort(np.asarray(h))[-3:].tolist())
  assert set(np.asarray(out.tokens[:, 0]).tolist()) <= top3
  assert len(set(np.asarray(out.tokens[:, 0]).tolist())) == 3


def test_several_aligned_models(pair):
  ref, ref_p, al, al_p = pair
  al2, al2_p = _model(CFG, 4)
  rng = jax.random.PRNGKey(2)
  two = dera.Realigner(ref, ref_p, al, al_p, max_decode_len=8).sample(PROMPTS, 0.8, rng)
  multi = dera.Realigner(ref, ref_p, [al, al2], [al_p, al2_p], max_decode_len=8)
  same = multi.sample(PROMPTS, np.array([0.8, 0.0]), rng)
  np.testing.assert_array_equal(same.tokens, two.tokens)
  assert same.logp_aligned.shape == (3, 2)
  mixed = multi.sample(PROMPTS, np.array([[0.5, 0.5]] * 3), rng)
  assert mixed.tokens.shape == (3, 8)
  with pytest.raises(ValueError, match=r"shape \[2\] or \[3, 2\]"):
    multi.sample(PROMPTS, 0.5, rng)


def test_weight_combining(pair):
  ref, ref_p, al, al_p = pair
  same_shape, same_p = _model(CFG, 5)
  rng = jax.random.PRNGKey(9)
  realigner = dera.Realigner(ref, ref_p, same_shape, same_p, max_decode_len=8, combine="weights")
  at0 = realigner.sample(PROMPTS, 0.0, rng)
  np.testing.assert_array_equal(at0.tokens, decoding.sample(ref, ref_p, PROMPTS, rng,
                                                            max_decode_len=8).tokens)
  at1 = realigner.sample(PROMPTS, 1.0, rng)
  np.testing.assert_array_equal(at1.tokens, decoding.sample(same_shape, same_p, PROMPTS, rng,
                                                            max_decode_len=8).tokens)
  assert at1.logp_ref is None
  with pytest.raises(ValueError, match="identical architecture"):
    dera.Realigner(ref, ref_p, al, al_p, max_decode_len=8, combine="weights")
  with pytest.raises(ValueError, match="one lam"):
    realigner.sample(PROMPTS, np.array([0.1, 0.2, 0.3]), rng)


def test_bad_inputs(pair):
  ref, ref_p, al, al_p = pair
  other = t5.T5Config(**{**CFG.__dict__, "vocab_size": 24})
  with pytest.raises(ValueError, match="vocab_size=23.*vocab_size=24"):
    dera.Realigner(ref, ref_p, base.EncoderDecoderModel(t5.Transformer(other)), al_p,
                   max_decode_len=4)
  realigner = dera.Realigner(ref, ref_p, al, al_p, max_decode_len=4)
  with pytest.raises(ValueError, match="finite"):
    realigner.sample(PROMPTS, float("nan"), jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match=r"shape \[\] \(a scalar\) or \[3\].*got \(2,\)"):
    realigner.sample(PROMPTS, np.zeros(2), jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="top_p"):
    realigner.sample(PROMPTS, 1.0, jax.random.PRNGKey(0), top_p=0.0)
