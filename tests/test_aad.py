"""Alignment-aware decoding (AAD): the selection rule, its tempered variant, per-row alpha.

Rule properties run on `TableModels` (random logits looked up by step and last token, model
0 the reference, model 1 the aligned model), checked step by step against float64 NumPy. A
tiny T5 pair checks what only real models can: cached decoding, one compilation per sweep.
"""
import functools

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
from test_decoding import TableModels, _check_eos_layout, _np_log_softmax
import tiny_models

MARGIN = 1e-4  # float32 rounding of log-probabilities (~1e-6 here) stays far below this


def _aad_steps(logits, alpha):
  """Float64 per step from each model's logits [2, B, T, V] and alpha [B]:
  (V_alpha [B, T, V], log-ratio restricted to V_alpha (-inf outside), the distance of
  each token's log p_al - max log p_al from log alpha (NaN at PAD and at the aligned
  argmax, which is always in V_alpha), models' log-probs [2, B, T, V]).
  PAD (id 0) is outside every distribution."""
  x = np.array(logits, np.float64)
  x[..., 0] = -np.inf
  lp = _np_log_softmax(x)
  with np.errstate(invalid="ignore"):
    gap = lp[1] - lp[1].max(-1, keepdims=True) - np.log(np.asarray(alpha, np.float64))[
        :, None, None]
    keep = gap >= 0
    ratio = np.where(keep, lp[1] - lp[0], -np.inf)
  gap[~np.isfinite(gap) | (lp[1] == lp[1].max(-1, keepdims=True))] = np.nan
  return keep, ratio, gap, lp


def _live(out):
  return np.arange(out.tokens.shape[1])[None] < np.asarray(out.lengths)[:, None]


def _at(x, tokens):
  return np.take_along_axis(x, np.asarray(tokens)[..., None], -1)[..., 0]


def _check_greedy_aad(out, logits, alpha):
  """Every emitted token lies in V_alpha and is the argmax of the log-ratio there."""
  keep, ratio, gap, lp = _aad_steps(logits, alpha)
  mask = _live(out)
  # No token sits at the float32 edge of V_alpha, and no two candidates (near-)tie.
  assert np.nanmin(np.abs(gap[mask])) > MARGIN
  top2 = np.sort(ratio, -1)[..., -2:]
  assert np.all((top2[..., 1] - top2[..., 0])[mask] > MARGIN)
  tokens = np.asarray(out.tokens)
  assert np.all(_at(keep, tokens)[mask])
  np.testing.assert_array_equal(np.where(mask, ratio.argmax(-1), 0), tokens)
  np.testing.assert_array_equal(out.logq, 0.0)  # greedy
  assert out.log_weight is None
  # A point mass at y has KL -log p_ref(y) to the reference; logp is each model's own.
  logp = np.stack([np.where(mask, _at(m, tokens), 0).sum(-1) for m in lp], -1)
  scale = np.abs(logp).sum(-1) + mask.sum(-1) * np.log(lp.shape[-1])
  got = out.logp if hasattr(out, "logp") else np.stack([out.logp_ref, out.logp_aligned], -1)
  assert_close_f32(got, logp, lp.shape[-1], scale[:, None])
  assert_close_f32(out.kl_ref, -logp[:, 0], lp.shape[-1], scale)


# ----------------------------------------------------------------------------- the rule


def test_aad_select_against_float64():
  rng = np.random.default_rng(0)
  ref = (2 * rng.standard_normal((64, 13))).astype(np.float32)
  al = (2 * rng.standard_normal((64, 13))).astype(np.float32)
  al[:, 0] = 10.0  # PAD would dominate the aligned model: it is never a candidate
  alpha = np.tile(np.array([0.05, 0.1, 0.3, 1.0], np.float32), 16)
  got = np.asarray(decoding.aad_select(jnp.asarray(ref), jnp.asarray(al), jnp.asarray(alpha)))
  keep, ratio, gap, lp = _aad_steps(np.stack([ref, al])[:, :, None], alpha)
  assert np.nanmin(np.abs(gap)) > MARGIN
  np.testing.assert_array_equal(got, ratio[:, 0].argmax(-1))
  assert np.all(_at(keep[:, 0], got)) and not np.any(got == 0)
  # The filter matters: the unrestricted argmax of the log-ratio is often elsewhere.
  with np.errstate(invalid="ignore"):
    free = np.where(np.arange(13) > 0, lp[1, :, 0] - lp[0, :, 0], -np.inf)
  assert np.mean(free.argmax(-1) != got) > 0.2
  # A scalar alpha is the same as that alpha on every row.
  scalar = decoding.aad_select(jnp.asarray(ref), jnp.asarray(al), 0.3)
  np.testing.assert_array_equal(scalar[2::4], got[2::4])


def test_ties_go_to_the_higher_aligned_probability():
  keep = jnp.array([[True, True, True, False], [True, True, True, True]])
  ratio = jnp.array([[0.5, 2.0, 2.0, 9.0], [1.0, 1.0, 1.0, 0.0]])
  aligned_logp = jnp.log(jnp.array([[0.1, 0.2, 0.3, 0.4], [0.4, 0.1, 0.3, 0.2]]))
  np.testing.assert_array_equal(decoding._aad_argmax(keep, ratio, aligned_logp), [2, 0])


# ----------------------------------------------------------------------------- the loop


class RowTables:
  """Like `TableModels`, with a table per row ([M, B, T, V, V]): greedy rows then take
  different paths (with one table for all rows they could differ only by alpha)."""

  def __init__(self, rows, steps, vocab, seed):
    rng = np.random.default_rng(seed)
    self.table = (2 * rng.standard_normal((2, rows, steps, vocab, vocab))).astype(np.float32)
    self.steps = steps

  def sample(self, alpha, **settings):
    config = decoding.SamplingConfig(self.steps, **settings)
    return _row_table_sample(jnp.asarray(self.table), jnp.asarray(alpha, jnp.float32),
                             jax.random.PRNGKey(0), config=config)

  def step_logits(self, tokens):
    """[2, B, T, V] float64: what each model returned at each step of `tokens` [B, T]."""
    tokens = np.asarray(tokens)
    prev = np.concatenate([np.zeros_like(tokens[:, :1]), tokens[:, :-1]], axis=1)
    rows = np.arange(len(tokens))[:, None]
    return self.table[:, rows, np.arange(self.steps)[None], prev].astype(np.float64)


@functools.partial(jax.jit, static_argnames="config")
def _row_table_sample(table, alpha, rng, config):
  def tokens_to_logits(tokens, step):  # the "cache" is the step
    return table[:, jnp.arange(tokens.shape[0]), step, tokens], step + 1

  return decoding.mixture_sample(tokens_to_logits, jnp.zeros((), jnp.int32), alpha, rng,
                                 config, decoding.AAD)


@pytest.fixture(scope="module")
def models():
  return TableModels(num_models=2, steps=6, vocab=11, seed=7)


def test_greedy_aad_tokens_maximise_the_ratio_in_v_alpha():
  tables = RowTables(rows=64, steps=6, vocab=11, seed=8)
  alpha = np.geomspace(0.01, 0.9, 64).astype(np.float32)
  out = tables.sample(alpha, temperature=0.0)
  _check_eos_layout(out.tokens, out.lengths)
  _check_greedy_aad(out, tables.step_logits(out.tokens), alpha)
  assert np.mean(np.asarray(out.lengths)) > 2  # several steps checked per row


def test_alpha_one_is_greedy_aligned_and_tiny_alpha_the_free_ratio(models):
  rows = 16
  greedy_aligned = models.sample(np.tile([[0.0, 1.0]], (rows, 1)), jax.random.PRNGKey(0),
                                 temperature=0.0)
  at_one = models.sample(np.ones(rows), jax.random.PRNGKey(1), rule=decoding.AAD,
                         temperature=0.0)
  np.testing.assert_array_equal(at_one.tokens, greedy_aligned.tokens)
  np.testing.assert_array_equal(at_one.logp, greedy_aligned.logp)

  tiny = models.sample(np.full(rows, 1e-30), jax.random.PRNGKey(1), rule=decoding.AAD,
                       temperature=0.0)
  keep, ratio, _, lp = _aad_steps(models.step_logits(tiny.tokens), np.full(rows, 1e-30))
  mask = _live(tiny)
  assert np.all(keep[..., 1:])  # every id but PAD is a candidate
  np.testing.assert_array_equal(np.where(mask, ratio.argmax(-1), 0), tiny.tokens)
  assert not np.array_equal(tiny.tokens, at_one.tokens)


def _np_tempered(logits, tokens, lengths, alpha, tau):
  """Float64 per sequence: (log q, KL(q || p_ref), a rounding scale) of the tempered rule
  along `tokens`, q_t = softmax(ratio / tau) over V_alpha."""
  keep, ratio, _, lp = _aad_steps(logits, alpha)
  log_q = _np_log_softmax(ratio / tau)
  mask = np.arange(tokens.shape[1])[None] < np.asarray(lengths)[:, None]
  with np.errstate(invalid="ignore"):
    kl = np.where(keep, np.exp(log_q) * (log_q - lp[0]), 0).sum(-1)
  finite = np.where(np.isfinite(lp), np.abs(lp), 0).max(-1)  # [2, B, T]
  scale = (np.where(mask, finite.sum(0) * (1 + 1 / tau), 0)).sum(-1)
  return (np.where(mask, _at(log_q, tokens), 0).sum(-1), np.where(mask, kl, 0).sum(-1),
          scale, keep)


def test_tempered_aad_logq_and_support(models):
  alpha = np.repeat(np.array([0.05, 0.2, 0.6], np.float32), 40)
  tau = 0.7
  out = models.sample(alpha, jax.random.PRNGKey(2), rule=decoding.AAD, temperature=tau)
  _check_eos_layout(out.tokens, out.lengths)
  logits = models.step_logits(out.tokens)
  logq, kl, scale, keep = _np_tempered(logits, np.asarray(out.tokens), out.lengths, alpha, tau)
  mask = _live(out)
  assert np.all(_at(keep, out.tokens)[mask])
  assert_close_f32(out.logq, logq, 2 * models.vocab, scale)
  assert_close_f32(out.kl_ref, kl, 2 * models.vocab, scale)
  assert out.log_weight is None
  assert np.all(np.asarray(out.logq) < 0)  # sampled, not greedy


def test_tempered_aad_sequence_frequencies():
  """Chi-squared test of 20k whole sequences against the enumerated tempered rule."""
  models = TableModels(num_models=2, steps=3, vocab=5, seed=5, spread=1.0)
  seqs = models.outcomes()
  index = {s: i for i, s in enumerate(seqs)}
  alpha, tau, n = 0.2, 0.8, 20000

  def probs(tau):
    targets = np.array([list(s) + [0] * (models.steps - len(s)) for s in seqs])
    alphas = np.full(len(seqs), alpha)
    return np.exp(_np_tempered(models.step_logits(targets), targets, [len(s) for s in seqs],
                               alphas, tau)[0])

  out = models.sample(np.full(n, alpha), jax.random.PRNGKey(0), rule=decoding.AAD,
                      temperature=tau)
  counts = np.zeros(len(seqs))
  for row, length in zip(np.asarray(out.tokens), np.asarray(out.lengths)):
    counts[index[tuple(row[:length].tolist())]] += 1
  expected = probs(tau)
  np.testing.assert_allclose(expected.sum(), 1.0, rtol=len(seqs) * 1e-12)
  assert np.all(counts[expected == 0] == 0)  # nothing outside V_alpha is ever drawn
  assert np.sum(expected == 0) > len(seqs) / 4  # and V_alpha does exclude tokens
  # Chi-squared needs enough expected counts per cell: the rare outcomes form one cell.
  rare = (expected > 0) & (expected * n < 5)
  cells = lambda x: np.append(x[expected * n >= 5], x[rare].sum() if rare.any() else [])
  assert stats.chisquare(cells(counts), cells(expected) * n).pvalue > 1e-3
  wrong = probs(1.3)  # another temperature is rejected by the same test
  assert stats.chisquare(cells(counts), cells(wrong) / cells(wrong).sum() * n).pvalue < 1e-6


# ----------------------------------------------------------------------------- real T5s

CFG = build.T5Config(vocab_size=23, d_model=8, d_kv=4, d_ff=16, num_heads=2, num_layers=1,
                  dropout_rate=0.0)
MAX_LEN = 6
PROMPTS = jnp.array([[5, 6, 7, 8, 1], [9, 10, 1, 0, 0], [11, 1, 0, 0, 0]])


@pytest.fixture(scope="module")
def pair():
  model = base.EncoderDecoderModel(build.network(CFG))  # one object: one compile each
  sharpen = lambda p: jax.tree_util.tree_map(lambda x: jnp.asarray(x * 2.0), p)
  return (model, sharpen(tiny_models.random_params(model, 0)), model,
          sharpen(tiny_models.random_params(model, 1)))


@functools.partial(jax.jit, static_argnums=0)
def _logits(model, params, prompts, tokens):
  return model.logits(params, base.response_batch(prompts, tokens))


def test_alpha_sweep_compiles_once_and_rows_match_scalar_calls(pair):
  realigner = dera.Realigner(*pair, max_decode_len=MAX_LEN)  # its own: nothing compiled yet
  alphas = np.array([1e-3, 0.05, 0.2, 1.0], np.float32)
  n = len(alphas)
  with profiling.count_compiles("_sample_logit_mixed") as compiles:
    sweep = realigner.sample(PROMPTS, rule="aad", alpha=np.tile(alphas, len(PROMPTS)),
                             temperature=0.0, num_decodes=n)
    for j, alpha in enumerate(alphas):
      scalar = realigner.sample(PROMPTS, rule="aad", alpha=float(alpha), temperature=0.0,
                                num_decodes=n)
      # One compiled program, the rows given the same inputs: equal bit for bit.
      np.testing.assert_array_equal(sweep.tokens[j::n], scalar.tokens[j::n])
      np.testing.assert_array_equal(sweep.logp_aligned[j::n], scalar.logp_aligned[j::n])
    per_prompt = realigner.sample(PROMPTS, rule="aad", alpha=np.array([0.1, 0.5, 0.9]),
                                  temperature=0.0, num_decodes=n)
  assert compiles.count == 1, compiles.functions
  assert per_prompt.log_weight is None and sweep.log_weight is None
  # The cached decoding follows the rule on the models' teacher-forced logits.
  prompts = jnp.repeat(PROMPTS, n, axis=0)
  logits = np.stack([np.asarray(_logits(m, p, prompts, sweep.tokens), np.float64)
                     for m, p in zip(realigner.models, realigner.params)])
  _check_greedy_aad(sweep, logits, np.tile(alphas, len(PROMPTS)))
  assert len({tuple(r) for r in np.asarray(sweep.tokens).tolist()}) > len(PROMPTS)


def test_bad_rule_arguments(pair):
  realigner = dera.Realigner(*pair, max_decode_len=MAX_LEN)
  key = jax.random.PRNGKey(0)
  for alpha in (0.0, -0.1, 1.5, float("nan"), np.array([0.1, 2.0, 0.3])):
    with pytest.raises(ValueError, match=r"^alpha must be in \(0, 1\]") as e:
      realigner.sample(PROMPTS, rule="aad", alpha=alpha, temperature=0.0)
    assert "\n" not in str(e.value)
  with pytest.raises(ValueError, match=r"alpha must have shape \[\] \(a scalar\) or \[3\]"):
    realigner.sample(PROMPTS, rule="aad", alpha=np.full(2, 0.1), temperature=0.0)
  with pytest.raises(ValueError, match="^rule must be one of 'dera', 'aad', got 'dpo'"):
    realigner.sample(PROMPTS, 1.0, key, rule="dpo")
  with pytest.raises(ValueError, match="lam does not apply to rule='aad'"):
    realigner.sample(PROMPTS, 1.0, key, rule="aad")
  with pytest.raises(ValueError, match="alpha applies to rule='aad'"):
    realigner.sample(PROMPTS, 1.0, key, alpha=0.1)
  with pytest.raises(ValueError, match="lam is required for rule='dera'"):
    realigner.sample(PROMPTS, rng=key)
  with pytest.raises(ValueError, match="rng is required unless temperature=0"):
    realigner.sample(PROMPTS, rule="aad")
  model, ref_p, _, al_p = pair
  multi = dera.Realigner(model, ref_p, [model, model], [al_p, ref_p], max_decode_len=MAX_LEN)
  with pytest.raises(ValueError, match="rule='aad' needs exactly one aligned model"):
    multi.sample(PROMPTS, rule="aad", temperature=0.0)
  assert dera.parse_alphas("0.05,0.1,1") == [0.05, 0.1, 1.0]
  for text in ("0,0.1", "0.1,1.5", "nan"):
    with pytest.raises(ValueError, match=r"^--alpha="):
      dera.parse_alphas(text)
