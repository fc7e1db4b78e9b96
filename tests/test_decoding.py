"""DeRa sampling: the mixing rule, exactness at lam in {0, 1}, frequencies, statistics.

The sampler loop's own properties (frequencies, statistics, filtering, greedy) run on
`TableModels`, random logits looked up by step and last token: cheap to decode and to
enumerate exactly. Real T5s check what only they can: caches, bit-exactness at lam in
{0, 1}, agreement with teacher forcing, one compilation per sweep.
"""
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from deranj import decoding
from deranj import dera
from deranj import profiling
from deranj.models import base
from deranj.models import build
from numerics import assert_close_f32
import tiny_models

CFG = build.T5Config(vocab_size=23, d_model=16, d_kv=8, d_ff=32, num_heads=2, num_layers=2,
                  dropout_rate=0.0, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
# A smaller aligned model (EFT-style pairs differ in depth and width).
CFG_SMALL = build.T5Config(vocab_size=23, d_model=8, d_kv=4, d_ff=16, num_heads=2, num_layers=1,
                        dropout_rate=0.0)
MAX_LEN = 8  # one length for the shared Realigner, so its sampler compiles once


def _model(cfg, seed):
  model = base.EncoderDecoderModel(build.network(cfg))
  # Sharpen the weights so the two models disagree visibly.
  params = tiny_models.random_params(model, seed)
  return model, jax.tree_util.tree_map(lambda x: jnp.asarray(x * 1.5), params)


@pytest.fixture(scope="module")
def pair():
  ref, ref_p = _model(CFG, 0)
  al, al_p = _model(CFG_SMALL, 1)
  return ref, ref_p, al, al_p


@pytest.fixture(scope="module")
def realigner(pair):
  return dera.Realigner(*pair, max_decode_len=MAX_LEN)


PROMPTS = jnp.array([[5, 6, 7, 8, 1], [9, 10, 1, 0, 0], [11, 1, 0, 0, 0]])


def _np_log_softmax(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _np_mixture_stats(logits, weights, tokens, lengths):
  """Float64 statistics of sampled `tokens` [B, T] from the mixture with `weights` [B, M],
  given each model's logits at each step [M, B, T, V] (`decoding.MixtureSamples` fields).
  PAD (id 0) is never sampled: every distribution is over ids 1..V-1."""
  lp = _np_log_softmax(np.asarray(logits)[..., 1:])  # [M, B, T, V - 1]
  geo = np.einsum("bm,mbtv->btv", np.asarray(weights, np.float64), lp)
  log_z = np.log(np.exp(geo).sum(-1))  # [B, T]
  log_q = geo - log_z[..., None]
  kl = (np.exp(log_q) * (log_q - lp[0])).sum(-1)
  mask = np.arange(tokens.shape[1])[None] < np.asarray(lengths)[:, None]
  index = np.maximum(np.asarray(tokens) - 1, 0)[..., None]  # id -> column without PAD
  at = lambda x: np.take_along_axis(x, index, -1)[..., 0]
  total = lambda x: (x * mask).sum(-1)
  return {"logq": total(at(log_q)), "logp": np.stack([total(at(x)) for x in lp], -1),
          "log_weight": total(log_z), "kl_ref": total(kl)}


def _logit_scale(logits, weights, lengths):
  """Per sequence, the magnitude of the logits its statistics are computed from:
  sum over emitted steps of sum_m (|w_m| + 1) max_v |h_m| (the mixture, and each model's
  own log-softmax). Rounding errors scale with this, not with the (cancelling) result."""
  per_step = np.abs(np.asarray(logits, np.float64)).max(-1)  # [M, B, T]
  w = np.abs(np.asarray(weights, np.float64)).T[..., None] + 1  # [M, B, 1]
  mask = np.arange(per_step.shape[-1])[None] < np.asarray(lengths)[:, None]
  return ((w * per_step).sum(0) * mask).sum(-1)


def _assert_stats(out, expected, scale, vocab):
  """The sampler's float32 statistics against `_np_mixture_stats`: each step's
  log-normaliser sums `vocab` terms of size up to `scale`."""
  for key in ("logq", "log_weight", "kl_ref"):
    assert_close_f32(getattr(out, key), expected[key], vocab, scale, err_msg=key)
  assert_close_f32(out.logp, expected["logp"], vocab, scale[:, None], err_msg="logp")


def _check_eos_layout(tokens, lengths, eos=1):
  """0 after EOS; lengths count up to and including EOS."""
  for row, length in zip(np.asarray(tokens), np.asarray(lengths)):
    assert 1 <= length and np.all(row[length:] == 0)
    assert not np.any(row[:length - 1] == eos)  # EOS, if any, is the last token emitted
    if length < len(row):
      assert row[length - 1] == eos


# ----------------------------------------------------------------------------- table models


class TableModels:
  """M models whose logits after token y at step t are `table[m, t, y]` ([M, T, V, V])."""

  def __init__(self, num_models, steps, vocab, seed, spread=2.0):
    rng = np.random.default_rng(seed)
    shape = (num_models, steps, vocab, vocab)
    self.table = (spread * rng.standard_normal(shape)).astype(np.float32)
    self.steps, self.vocab = steps, vocab

  def sample(self, weights, rng, rule=decoding.MIXTURE, **settings) -> decoding.MixtureSamples:
    """`weights` are the rule's per-row parameters (alpha [B] for `decoding.AAD`)."""
    config = decoding.SamplingConfig(self.steps, **settings)
    return _table_sample(jnp.asarray(self.table), jnp.asarray(weights, jnp.float32), rng,
                         config=config, rule=rule)

  def step_logits(self, tokens):
    """[M, B, T, V] float64: what each model returned at each step of `tokens` [B, T]."""
    tokens = np.asarray(tokens)
    prev = np.concatenate([np.zeros_like(tokens[:, :1]), tokens[:, :-1]], axis=1)
    return self.table[:, np.arange(self.steps)[None], prev].astype(np.float64)

  def log_q_of(self, weights, seqs):
    """Float64 log q of each whole sequence in `seqs` (one row of weights [M])."""
    targets = np.array([list(s) + [0] * (self.steps - len(s)) for s in seqs])
    rows = np.broadcast_to(np.asarray(weights, np.float64), (len(seqs), len(weights)))
    return _np_mixture_stats(self.step_logits(targets), rows, targets,
                             [len(s) for s in seqs])["logq"]

  def outcomes(self, eos=1):
    """Every sequence the sampler can emit: EOS-terminated, or cut at `steps`."""
    body = [v for v in range(1, self.vocab) if v != eos]  # PAD is never sampled
    seqs = [p + (eos,) for n in range(self.steps) for p in itertools.product(body, repeat=n)]
    return seqs + list(itertools.product(body, repeat=self.steps))


@functools.partial(jax.jit, static_argnames=("config", "rule"))
def _table_sample(table, weights, rng, config, rule):
  def tokens_to_logits(tokens, step):  # the "cache" is the step
    return table[:, step, tokens], step + 1

  return decoding.mixture_sample(tokens_to_logits, jnp.zeros((), jnp.int32), weights, rng,
                                 config, rule)


def _weights(lam_rows):
  """[B, 1 + K] mixing weights from lam [B, K]: the reference gets 1 - sum(lam)."""
  lam = np.asarray(lam_rows, np.float32)
  return np.concatenate([1 - lam.sum(1, keepdims=True), lam], axis=1)


# ----------------------------------------------------------------------------- mixing rule


def test_dera_logits_against_float64():
  rng = np.random.default_rng(0)
  ref = rng.normal(size=(4, 11)).astype(np.float32)
  al = rng.normal(size=(4, 11)).astype(np.float32)
  lam = np.array([0.0, 0.5, 1.0, 3.0], np.float32)
  out = np.asarray(decoding.dera_logits(jnp.asarray(ref), jnp.asarray(al), jnp.asarray(lam)))
  lam64 = lam[:, None].astype(np.float64)
  expected = lam64 * al + (1 - lam64) * ref
  assert_close_f32(out, expected, 2, np.abs(lam64 * al) + np.abs((1 - lam64) * ref))
  np.testing.assert_array_equal(out[0], ref[0])  # lam = 0: the reference, bit for bit
  np.testing.assert_array_equal(out[2], al[2])  # lam = 1: the aligned model
  scalar = decoding.dera_logits(jnp.asarray(ref), jnp.asarray(al), 0.25)
  assert_close_f32(scalar, 0.25 * al.astype(np.float64) + 0.75 * ref, 2,
                   0.25 * np.abs(al) + 0.75 * np.abs(ref))
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


# ----------------------------------------------------------------------------- sampler loop


def test_statistics_against_float64_three_models():
  """logq, logp, log_weight and kl_ref of the mixture of a reference and two aligned
  models, per-row weights (some negative), against float64 NumPy."""
  models = TableModels(num_models=3, steps=6, vocab=9, seed=0)
  lam = np.array([[0.0, 0.0], [1.0, 0.0], [0.5, 0.5], [2.0, -0.5], [-0.5, 1.5],
                  [3.0, 1.0]] * 8)
  weights = _weights(lam)
  out = models.sample(weights, jax.random.PRNGKey(0))
  _check_eos_layout(out.tokens, out.lengths)
  assert 1 < len(set(np.asarray(out.lengths).tolist()))  # some rows stop early
  logits = models.step_logits(out.tokens)
  expected = _np_mixture_stats(logits, weights, out.tokens, out.lengths)
  _assert_stats(out, expected, _logit_scale(logits, weights, out.lengths), models.vocab)
  # lam = 0 samples the reference itself: q = p_ref, so KL 0 and logq = logp_ref.
  assert_close_f32(out.kl_ref[::6], 0.0, models.vocab,
                   _logit_scale(logits, weights, out.lengths)[::6])
  assert_close_f32(out.logq[::6], out.logp[::6, 0], 2 * models.vocab,
                   _logit_scale(logits, weights, out.lengths)[::6])
  assert np.asarray(out.kl_ref)[2::6].min() > 0.1  # the mixtures differ from the reference


def test_sequence_frequencies_match_mixed_softmax():
  """Chi-squared test of 20k whole sequences against the enumerated q of eq. 9."""
  models = TableModels(num_models=2, steps=3, vocab=4, seed=1, spread=1.0)
  seqs = models.outcomes()
  index = {s: i for i, s in enumerate(seqs)}
  lam, n = 2.5, 20000
  out = models.sample(np.tile(_weights([[lam]]), (n, 1)), jax.random.PRNGKey(0))
  counts = np.zeros(len(seqs))
  for row, length in zip(np.asarray(out.tokens), np.asarray(out.lengths)):
    counts[index[tuple(row[:length].tolist())]] += 1
  probs = np.exp(models.log_q_of(_weights([[lam]])[0], seqs))
  np.testing.assert_allclose(probs.sum(), 1.0, rtol=len(seqs) * 1e-12)  # every outcome
  keep = probs * n >= 5  # chi-squared needs enough expected counts per cell
  observed = np.append(counts[keep], counts[~keep].sum())
  expected = np.append(probs[keep], probs[~keep].sum()) * n
  assert stats.chisquare(observed, expected).pvalue > 1e-3
  # The wrong lam is rejected by the same test.
  wrong = np.exp(models.log_q_of(_weights([[2.0]])[0], seqs))
  expected_wrong = np.append(wrong[keep], wrong[~keep].sum()) * n
  assert stats.chisquare(observed, expected_wrong).pvalue < 1e-6


@pytest.mark.parametrize("settings", [dict(top_k=3), dict(top_p=0.6, temperature=0.7),
                                      dict(top_k=4, top_p=0.8, temperature=1.5)])
def test_filtering_restricts_support_and_logq(settings):
  """Sampled tokens lie in the kept set of the tempered mixture; logq is their log-prob
  under the renormalised kept set (float64)."""
  models = TableModels(num_models=2, steps=5, vocab=11, seed=2)
  weights = _weights(np.repeat([[0.0], [0.8], [2.0]], 200, axis=0))
  out = models.sample(weights, jax.random.PRNGKey(3), **settings)
  _check_eos_layout(out.tokens, out.lengths)
  tokens = np.asarray(out.tokens)
  mixed = np.einsum("bm,mbtv->btv", weights.astype(np.float64), models.step_logits(tokens))
  scaled = mixed / settings.get("temperature", 1.0)
  scaled[..., 0] = -np.inf  # PAD is never sampled
  mask = np.arange(models.steps)[None] < np.asarray(out.lengths)[:, None]
  kept = np.ones(scaled.shape, bool)
  if "top_k" in settings:  # first top-k, then the nucleus of what it kept
    kept &= scaled >= np.sort(scaled, -1)[..., -settings["top_k"]][..., None]
  if "top_p" in settings:
    order = np.argsort(-scaled, -1)
    p_sorted = np.exp(_np_log_softmax(np.take_along_axis(np.where(kept, scaled, -np.inf),
                                                         order, -1)))
    before = np.cumsum(p_sorted, -1) - p_sorted  # mass strictly above each token
    # No token's mass sits at the float32 rounding edge of top_p (else the sets may differ).
    assert np.abs(before - settings["top_p"])[mask].min() > 1e-5
    in_nucleus = np.zeros_like(kept)
    np.put_along_axis(in_nucleus, order, before < settings["top_p"], -1)
    kept &= in_nucleus
  at = lambda x: np.take_along_axis(x, tokens[..., None], -1)[..., 0]
  assert np.all(at(kept)[mask])
  assert np.any(kept.sum(-1)[mask] < models.vocab - 1)  # the filter did remove tokens
  log_q = _np_log_softmax(np.where(kept, scaled, -np.inf))
  expected = (np.where(mask, at(log_q), 0)).sum(-1)
  scale = _logit_scale(models.step_logits(tokens), weights, out.lengths)
  assert_close_f32(out.logq, expected, 2 * models.vocab, scale / settings.get("temperature", 1))


def test_greedy_follows_argmax():
  models = TableModels(num_models=2, steps=6, vocab=9, seed=4)
  weights = _weights([[-1.0], [0.0], [0.7], [1.5], [4.0]])
  out = models.sample(weights, jax.random.PRNGKey(0), temperature=0.0)
  _check_eos_layout(out.tokens, out.lengths)
  mixed = np.einsum("bm,mbtv->btv", weights, models.step_logits(out.tokens))
  mixed[..., 0] = -np.inf  # PAD is never emitted, greedy included
  mask = np.arange(models.steps)[None] < np.asarray(out.lengths)[:, None]
  np.testing.assert_array_equal(np.where(mask, mixed.argmax(-1), 0), out.tokens)
  np.testing.assert_array_equal(out.logq, np.zeros(len(weights)))
  assert len({tuple(r) for r in np.asarray(out.tokens).tolist()}) > 1


# ----------------------------------------------------------------------------- real T5s


@functools.partial(jax.jit, static_argnums=0)
def _logits(model, params, prompts, tokens):
  batch = base.response_batch(prompts, tokens)
  return model.logits(params, batch)


def _teacher_forced(models, params, prompts, tokens):
  """[M, B, T, V] float64 logits of each model on `tokens`, teacher forced."""
  return np.stack([np.asarray(_logits(m, p, jnp.asarray(prompts), jnp.asarray(tokens)),
                              np.float64) for m, p in zip(models, params)])


def test_lam_zero_and_one_are_bit_exact(pair, realigner):
  """lam = 0 samples the reference alone and lam = 1 the aligned model alone, bit for bit
  (the same loop with one model), whatever the other model is."""
  ref, ref_p, al, al_p = pair
  rng = jax.random.PRNGKey(3)
  a = realigner.sample(PROMPTS, 0.0, rng)
  alone = decoding.sample(ref, ref_p, PROMPTS, rng, max_decode_len=MAX_LEN)
  np.testing.assert_array_equal(a.tokens, alone.tokens)
  np.testing.assert_array_equal(a.logq, alone.logq)
  np.testing.assert_array_equal(a.logp_ref, alone.logp[:, 0])
  # q is the reference itself: KL 0 up to rounding (and finite).
  logits = _teacher_forced(realigner.models, realigner.params, PROMPTS, a.tokens)
  weights = np.tile([1.0, 0.0], (len(PROMPTS), 1))
  assert_close_f32(a.kl_ref, 0.0, CFG.vocab_size, _logit_scale(logits, weights, a.lengths))

  c = realigner.sample(PROMPTS, 1.0, rng)
  alone = decoding.sample(al, al_p, PROMPTS, rng, max_decode_len=MAX_LEN)
  np.testing.assert_array_equal(c.tokens, alone.tokens)
  np.testing.assert_array_equal(c.logq, alone.logq)
  np.testing.assert_array_equal(c.logp_aligned, alone.logp[:, 0])
  assert not np.array_equal(a.tokens, c.tokens)


def test_per_row_lam_equals_scalar_calls(realigner):
  lams = np.array([0.0, 0.7, 3.0], np.float32)
  rng = jax.random.PRNGKey(5)
  rows = realigner.sample(PROMPTS, lams, rng)
  for i, lam in enumerate(lams):
    scalar = realigner.sample(PROMPTS, float(lam), rng)
    # One compiled program, row i given the same inputs: equal bit for bit.
    np.testing.assert_array_equal(rows.tokens[i], scalar.tokens[i])
    np.testing.assert_array_equal(rows.logq[i], scalar.logq[i])


def test_sweep_as_num_decodes_equals_repeated_prompts(realigner):
  """lam per output row with num_decodes encodes each prompt once, same samples."""
  lams = np.array([0.0, 1.0, 4.0], np.float32)
  n = len(lams)
  per_row = np.tile(lams, len(PROMPTS))
  rng = jax.random.PRNGKey(4)
  sweep = realigner.sample(PROMPTS, per_row, rng, num_decodes=n)
  repeated_prompts = jnp.repeat(PROMPTS, n, axis=0)
  repeated = realigner.sample(repeated_prompts, per_row, rng)
  np.testing.assert_array_equal(sweep.tokens, repeated.tokens)
  # The encoder ran on another batch shape: equal up to rounding.
  logits = _teacher_forced(realigner.models, realigner.params, repeated_prompts, sweep.tokens)
  scale = _logit_scale(logits, _weights(per_row[:, None]), sweep.lengths)
  assert_close_f32(sweep.logq, repeated.logq, CFG.vocab_size, scale)
  # Per-prompt lam with num_decodes repeats each prompt's lam over its rows.
  per_prompt = realigner.sample(PROMPTS, lams, rng, num_decodes=n)
  again = realigner.sample(PROMPTS, np.repeat(lams, n), rng, num_decodes=n)
  np.testing.assert_array_equal(per_prompt.tokens, again.tokens)
  assert not np.array_equal(per_prompt.tokens, sweep.tokens)


def test_lam_sweep_compiles_once(pair):
  realigner = dera.Realigner(*pair, max_decode_len=MAX_LEN)  # its own: nothing compiled yet
  with profiling.count_compiles("_sample_logit_mixed") as compiles:
    for lam in [0.0, 0.5, 1.0, 2.0, 5.0, 10.0]:
      realigner.sample(PROMPTS, lam, jax.random.PRNGKey(0))
    realigner.sample(PROMPTS, np.array([0.1, 0.2, 0.3]), jax.random.PRNGKey(0))  # per row
  assert compiles.count == 1, compiles.functions


def test_statistics_match_teacher_forcing(realigner):
  """The real models' cached decoding gives the statistics of their teacher-forced logits."""
  lam = np.array([0.5, 2.0, -0.5], np.float32)
  out = realigner.sample(PROMPTS, lam, jax.random.PRNGKey(11))
  _check_eos_layout(out.tokens, out.lengths)
  logits = _teacher_forced(realigner.models, realigner.params, PROMPTS, out.tokens)
  weights = _weights(lam[:, None])
  expected = _np_mixture_stats(logits, weights, out.tokens, out.lengths)
  scale = _logit_scale(logits, weights, out.lengths)
  for key in ("logq", "log_weight", "kl_ref"):
    assert_close_f32(getattr(out, key), expected[key], CFG.vocab_size, scale, err_msg=key)
  assert_close_f32(out.logp_ref, expected["logp"][:, 0], CFG.vocab_size, scale)
  assert_close_f32(out.logp_aligned, expected["logp"][:, 1], CFG.vocab_size, scale)
  # score() teacher-forces what was sampled (PAD is never sampled, so no holes).
  assert_close_f32(realigner.score(PROMPTS, out.tokens, lam), out.logq, 2 * CFG.vocab_size,
                   scale)


def test_score_against_float64(realigner):
  targets = jnp.array([[3, 4, 5, 1, 0, 0, 0, 0], [6, 1, 0, 0, 0, 0, 0, 0],
                       [7, 8, 9, 10, 11, 12, 13, 1]])
  lam = np.array([0.3, 1.0, 4.0], np.float32)
  logits = _teacher_forced(realigner.models, realigner.params, PROMPTS, targets)
  weights = _weights(lam[:, None])
  lengths = np.asarray(targets > 0).sum(-1)
  expected = _np_mixture_stats(logits, weights, np.asarray(targets), lengths)["logq"]
  got = realigner.score(PROMPTS, targets, lam)
  # A sum of ~ -100 nats: an absolute 1e-5 is one float32 ulp, not a tolerance.
  assert_close_f32(got, expected, CFG.vocab_size, _logit_scale(logits, weights, lengths))


def test_several_aligned_models(pair, realigner):
  """Two aligned models: lam [K] or [B, K]; statistics of the 3-model mixture in float64."""
  ref, ref_p, al, al_p = pair
  _, al2_p = _model(CFG, 4)  # the reference's architecture (same model object: one compile)
  rng = jax.random.PRNGKey(2)
  two = realigner.sample(PROMPTS, 0.8, rng)
  multi = dera.Realigner(ref, ref_p, [al, ref], [al_p, al2_p], max_decode_len=MAX_LEN)
  same = multi.sample(PROMPTS, np.array([0.8, 0.0]), rng)
  np.testing.assert_array_equal(same.tokens, two.tokens)
  assert same.logp_aligned.shape == (3, 2)
  lam = np.array([[0.5, 0.5], [1.5, -0.5], [0.3, 1.2]], np.float32)
  mixed = multi.sample(PROMPTS, lam, rng)
  _check_eos_layout(mixed.tokens, mixed.lengths)
  logits = _teacher_forced(multi.models, multi.params, PROMPTS, mixed.tokens)
  weights = _weights(lam)
  expected = _np_mixture_stats(logits, weights, mixed.tokens, mixed.lengths)
  scale = _logit_scale(logits, weights, mixed.lengths)
  for key in ("logq", "log_weight", "kl_ref"):
    assert_close_f32(getattr(mixed, key), expected[key], CFG.vocab_size, scale, err_msg=key)
  assert_close_f32(mixed.logp_ref, expected["logp"][:, 0], CFG.vocab_size, scale)
  assert_close_f32(mixed.logp_aligned, expected["logp"][:, 1:], CFG.vocab_size, scale[:, None])
  with pytest.raises(ValueError, match=r"shape \[2\] or \[3, 2\]"):
    multi.sample(PROMPTS, 0.5, rng)


def test_eft_weights_give_proxy_tuning_exactly(pair):
  """EFT / proxy tuning through the K-model mixture: reference = small SFT model, aligned
  = [small aligned, large base], lam = (1, 1) -> weights (-1, 1, 1), so each token's
  distribution is p_large * p_small_aligned / p_small_ref, normalised (float64)."""
  large, large_p, small, small_al_p = pair
  _, small_ref_p = _model(CFG_SMALL, 6)
  eft = dera.Realigner(small, small_ref_p, [small, large], [small_al_p, large_p],
                       max_decode_len=MAX_LEN)
  lam = np.array([1.0, 1.0], np.float32)
  np.testing.assert_array_equal(eft._mix_weights(lam, 3), np.tile([-1.0, 1.0, 1.0], (3, 1)))
  targets = jnp.array([[3, 4, 5, 1, 0, 0, 0, 0], [6, 9, 2, 14, 1, 0, 0, 0],
                       [7, 8, 9, 10, 11, 12, 13, 1]])
  logits = _teacher_forced(eft.models, eft.params, PROMPTS, targets)  # ref, aligned, large
  lp = _np_log_softmax(logits[..., 1:])  # each model's own log-probabilities, PAD excluded
  tuned = _np_log_softmax(lp[2] + lp[1] - lp[0])
  lengths = np.asarray(targets > 0).sum(-1)
  mask = np.arange(targets.shape[1])[None] < lengths[:, None]
  index = np.maximum(np.asarray(targets) - 1, 0)[..., None]  # id -> column without PAD
  expected = (np.take_along_axis(tuned, index, -1)[..., 0] * mask).sum(-1)
  scale = _logit_scale(logits, _weights([[1.0, 1.0]] * 3), lengths)
  assert_close_f32(eft.score(PROMPTS, targets, lam), expected, CFG.vocab_size, scale)
  # Not the large model alone, nor the small aligned one.
  for m in (1, 2):
    alone = (np.take_along_axis(lp[m], index, -1)[..., 0] * mask).sum(-1)
    assert np.all(np.abs(alone - expected) > 0.1)


def test_weight_combining(pair):
  ref, ref_p, al, al_p = pair
  _, same_p = _model(CFG, 5)
  rng = jax.random.PRNGKey(9)
  realigner = dera.Realigner(ref, ref_p, ref, same_p, max_decode_len=MAX_LEN,
                             combine="weights")
  at0 = realigner.sample(PROMPTS, 0.0, rng)
  np.testing.assert_array_equal(at0.tokens, decoding.sample(ref, ref_p, PROMPTS, rng,
                                                            max_decode_len=MAX_LEN).tokens)
  at1 = realigner.sample(PROMPTS, 1.0, rng)
  np.testing.assert_array_equal(at1.tokens, decoding.sample(ref, same_p, PROMPTS, rng,
                                                            max_decode_len=MAX_LEN).tokens)
  assert not np.array_equal(at0.tokens, at1.tokens)
  assert at1.logp_ref is None
  with pytest.raises(ValueError, match="identical architecture"):
    dera.Realigner(ref, ref_p, al, al_p, max_decode_len=MAX_LEN, combine="weights")
  with pytest.raises(ValueError, match="one lam"):
    realigner.sample(PROMPTS, np.array([0.1, 0.2, 0.3]), rng)


def test_bad_inputs(pair, realigner):
  ref, ref_p, al, al_p = pair
  other = build.T5Config(**{**CFG.__dict__, "vocab_size": 24})
  with pytest.raises(ValueError, match="vocab_size=23.*vocab_size=24"):
    dera.Realigner(ref, ref_p, base.EncoderDecoderModel(build.network(other)), al_p,
                   max_decode_len=4)
  with pytest.raises(ValueError, match="finite"):
    realigner.sample(PROMPTS, float("nan"), jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match=r"shape \[\] \(a scalar\) or \[3\].*got \(2,\)"):
    realigner.sample(PROMPTS, np.zeros(2), jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="top_p"):
    realigner.sample(PROMPTS, 1.0, jax.random.PRNGKey(0), top_p=0.0)
