"""Judges, win rates, pairwise accuracy (eq. 14) and the figures' statistics."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

import numerics
import tiny_models

from deranj import dera
from deranj import rewards
from deranj.evaluation import judges
from deranj.evaluation import win_rates
from deranj.models import base
from deranj.models import build

CFG = build.T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_heads=2, num_layers=1,
                  dropout_rate=0.0)


_random_params = tiny_models.random_params


def _responses(rng, n, width, min_len=1):
  """[n, width] rows: random tokens in [2, vocab), EOS, then PAD."""
  out = np.zeros((n, width), np.int32)
  for i in range(n):
    k = rng.integers(min_len, width)  # tokens before EOS
    out[i, :k] = rng.integers(2, CFG.vocab_size, k)
    out[i, k] = 1
  return out


# ----------------------------------------------------------------------------- judges

REFERENCE = "the cat sat on the mat near the door"
DOCUMENT = ("yesterday evening the small grey cat from next door walked in slowly and "
            "after a while it sat on the mat near the door")


def test_rouge_l_judge_prefers_summary_and_splits_ties():
  lead = " ".join(DOCUMENT.split()[:9])  # truncated-document baseline
  summary = "the grey cat sat on the mat by the door"
  got = judges.rouge_l_judge([summary, lead, summary, "the cat", "the cat"],
                             [lead, summary, summary, "the mat", "the cat"],
                             [REFERENCE] * 5)
  assert got.dtype == np.float64
  # "the cat" and "the mat": same LCS, same length, an exact tie.
  np.testing.assert_array_equal(got, [1.0, 0.0, 0.5, 0.5, 0.5])
  with pytest.raises(ValueError, match="one of each"):
    judges.rouge_l_judge([summary], [lead, lead], [REFERENCE])


def test_reward_model_judge_matches_rewards():
  model = base.EncoderDecoderModel(build.network(CFG))
  rm = rewards.RewardModel(model)
  params = _random_params(model, 0)
  params = {"token_embedder": params["token_embedder"], "encoder": params["encoder"],
            "head": {"kernel": np.random.default_rng(1).standard_normal((16, 1), np.float32),
                     "bias": np.zeros((1,), np.float32)}}
  rng = np.random.default_rng(2)
  n = 11  # not a multiple of the batch size: the last batch is padded
  prompts = _responses(rng, n, 6)
  a, b = _responses(rng, n, 7), _responses(rng, n, 7)
  b[:3] = a[:3]  # identical responses tie
  judge = judges.RewardModelJudge(rm, params, batch_size=8)
  got = judge(prompts, a, b)
  direct = jax.jit(rm.rewards)
  r_a = np.asarray(direct(params, jnp.asarray(prompts), jnp.asarray(a)))
  r_b = np.asarray(direct(params, jnp.asarray(prompts), jnp.asarray(b)))
  # Batches of 8 against one batch of 11: the head's dot product over d_model rounds at
  # the scale sum |pooled| * |kernel| (|pooled| <= the largest encoder output).
  pooled_bound = np.abs(np.asarray(jax.jit(lambda p, x: rm.module.apply(
      {"params": p}, x, method="encode"))(
          {k: params[k] for k in ("token_embedder", "encoder")},
          jnp.asarray(rewards.join_prompt_response(jnp.asarray(prompts), jnp.asarray(a)))))).max()
  scale = pooled_bound * np.abs(params["head"]["kernel"]).sum()
  numerics.assert_close_f32(judge.rewards(prompts, a), r_a, CFG.d_model, scale)
  expected = np.where(r_a > r_b, 1.0, np.where(r_a < r_b, 0.0, 0.5))
  np.testing.assert_array_equal(got, expected)
  assert np.all(got[:3] == 0.5) and set(got[3:]) <= {0.0, 1.0} and len(set(got[3:])) == 2
  # One compilation for every batch (A and B, full and padded).
  assert judge._rewards._cache_size() == 1
  # Swapping is harmless for a judge without position bias.
  swapped = judges.judge_with_position_swap(lambda x, y, p: judge(p, x, y), a, b, prompts,
                                            rng=np.random.default_rng(3))
  np.testing.assert_array_equal(swapped, got)


def test_position_swap_debiases_a_first_position_judge():
  n = 4000
  always_first = lambda first, second, *extra: np.ones(len(first))
  a, b = [f"a{i}" for i in range(n)], [f"b{i}" for i in range(n)]
  assert np.mean(always_first(a, b)) == 1.0  # fully biased without the swap
  got = judges.judge_with_position_swap(always_first, a, b, rng=np.random.default_rng(0))
  assert abs(got.mean() - 0.5) < 0.03
  # Arrays: row i of the pair moves together; outcomes map back to A's view.
  tokens_a, tokens_b = np.full((n, 3), 5), np.full((n, 3), 7)

  def prefers_sevens(first, second, extra):
    assert first.shape == (n, 3) and extra.shape == (n,)
    return np.where(first[:, 0] == 7, 1.0, 0.0) + 0.0 * second[:, 0]

  got = judges.judge_with_position_swap(prefers_sevens, tokens_a, tokens_b, np.arange(n),
                                        rng=np.random.default_rng(1))
  np.testing.assert_array_equal(got, np.zeros(n))
  # A judge consistent in its content gives the same outcomes with or without swaps.
  refs = [REFERENCE] * 4
  texts_a = ["the cat sat", "a door", "the cat", "mat near the door"]
  texts_b = ["a dog", "the cat sat on the mat", "the mat", "the cat sat on the mat"]
  np.testing.assert_array_equal(
      judges.judge_with_position_swap(judges.rouge_l_judge, texts_a, texts_b, refs,
                                      rng=np.random.default_rng(2)),
      judges.rouge_l_judge(texts_a, texts_b, refs))


# ----------------------------------------------------------------------------- win rates

def test_win_rate_interval_covers_narrows_and_counts_ties_half():
  rng = np.random.default_rng(1)  # a seed whose first sample is not in the 5% tails
  small = win_rates.win_rate(rng.random(400) < 0.7)
  large = win_rates.win_rate(rng.random(6400) < 0.7)
  for w in (small, large):
    assert w.low < 0.7 < w.high and w.low <= w.rate <= w.high
  assert large.high - large.low < 0.3 * (small.high - small.low)  # ~ 1/sqrt(16)
  assert large.n == 6400 and set(large.to_dict()) == {"rate", "low", "high", "n"}
  assert all(type(v) is float for v in (large.rate, large.low, large.high))
  # Coverage of the 95% interval over many samples.
  samples = rng.random((400, 300)) < 0.7
  covered = [(lambda w: w.low <= 0.7 <= w.high)(win_rates.win_rate(s)) for s in samples]
  assert 0.91 < np.mean(covered) < 0.99
  # Deterministic, ties half, clipped.
  assert win_rates.win_rate([1, 0.5, 0, 0.5]) == win_rates.win_rate([1, 0.5, 0, 0.5])
  assert win_rates.win_rate([1, 0.5, 0, 0.5]).rate == 0.5
  assert win_rates.win_rate([1, 1, 0.5, 0.5]).rate == 0.75
  w = win_rates.win_rate([1.0] * 9 + [0.0])
  assert w.high == 1.0 and w.low < 0.9
  assert win_rates.win_rate([1.0]) == win_rates.WinRate(1.0, 0.0, 1.0, 1)
  # The sample std: all ties give a zero-width interval at 0.5.
  assert win_rates.win_rate([0.5] * 10).to_dict() == {"rate": 0.5, "low": 0.5, "high": 0.5,
                                                       "n": 10}
  with pytest.raises(ValueError, match="in \\[0, 1\\]"):
    win_rates.win_rate([1.0, 2.0])
  with pytest.raises(ValueError, match="non-empty"):
    win_rates.win_rate([])


def test_clustered_interval_is_wider_when_samples_of_a_prompt_agree():
  rng = np.random.default_rng(0)
  prompts, k = 40, 8
  # Perfectly correlated: each prompt is won (or lost) by all its samples.
  correlated = np.repeat(rng.random(prompts) < 0.5, k).astype(float)
  naive, clustered = (win_rates.win_rate(correlated),
                      win_rates.clustered_win_rate(correlated, prompts, seed=1))
  width = lambda w: w.high - w.low  # noqa: E731
  assert clustered.rate == naive.rate and clustered.n == naive.n == prompts * k
  # The effective sample size is the number of prompts, so wider by about sqrt(k) = 2.8.
  assert width(clustered) > 2 * width(naive), (clustered, naive)
  # Independent samples: about the naive interval (ratio ~1, Monte-Carlo spread ~10%).
  independent = (rng.random(prompts * k) < 0.5).astype(float)
  ratio = width(win_rates.clustered_win_rate(independent, prompts, seed=1)) / width(
      win_rates.win_rate(independent))
  assert 0.75 < ratio < 1.3, ratio


def test_clustered_interval_by_hand_and_its_settings():
  # Two prompts, one always won, one always lost: a resample of two prompts has rate
  # 0, 1/2 or 1 with probabilities 1/4, 1/2, 1/4.
  outcomes = [1, 1, 1, 0, 0, 0]
  wide = win_rates.clustered_win_rate(outcomes, 2, confidence=0.95, seed=3)
  assert (wide.rate, wide.low, wide.high, wide.n) == (0.5, 0.0, 1.0, 6)
  narrow = win_rates.clustered_win_rate(outcomes, 2, confidence=0.4, seed=3)
  assert (narrow.low, narrow.high) == (0.5, 0.5)  # the 30% and 70% quantiles
  # Seeded: the same seed gives the same interval, the number of resamples is honoured.
  x = np.repeat(np.random.default_rng(2).random(10), 3)
  assert (win_rates.clustered_win_rate(x, 10, seed=(4, 1))
          == win_rates.clustered_win_rate(x, 10, seed=(4, 1)))
  assert (win_rates.clustered_win_rate(x, 10, seed=4, num_resamples=100)
          != win_rates.clustered_win_rate(x, 10, seed=4, num_resamples=5000))
  assert win_rates.clustered_win_rate([1, 0], 1) == win_rates.WinRate(0.5, 0.0, 1.0, 2)
  assert win_rates.clustered_win_rate([0.5] * 6, 3).to_dict() == {
      "rate": 0.5, "low": 0.5, "high": 0.5, "n": 6}
  with pytest.raises(ValueError, match="num_resamples=10"):
    win_rates.clustered_win_rate(x, 10, num_resamples=10)
  with pytest.raises(ValueError, match="do not split into 4 equal clusters"):
    win_rates.clustered_win_rate(x, 4)


def test_pairwise_accuracy_matches_loop_and_normalises_by_length():
  rng = np.random.default_rng(0)
  n = 50
  lp_w, lp_l = -rng.uniform(1, 30, n), -rng.uniform(1, 30, n)
  len_w, len_l = rng.integers(1, 20, n), rng.integers(1, 20, n)
  loop = np.mean([lp_w[i] / len_w[i] > lp_l[i] / len_l[i] for i in range(n)])
  assert win_rates.pairwise_accuracy(lp_w, len_w, lp_l, len_l) == loop
  # A long chosen response: lower total log-prob, higher per-token log-prob.
  assert win_rates.pairwise_accuracy([-10.0], [10], [-6.0], [3]) == 1.0
  assert win_rates.pairwise_accuracy([-10.0], [1], [-6.0], [1]) == 0.0
  assert win_rates.pairwise_accuracy([-4.0], [2], [-2.0], [1]) == 0.0  # strict >
  with pytest.raises(ValueError, match="positive"):
    win_rates.pairwise_accuracy([-1.0], [0], [-1.0], [1])


def test_realigned_pairwise_accuracy_endpoints_are_the_models_own():
  ref = base.EncoderDecoderModel(build.network(CFG))
  aligned = base.EncoderDecoderModel(build.network(CFG))
  ref_params, al_params = _random_params(ref, 0), _random_params(aligned, 1)
  realigner = dera.Realigner(ref, ref_params, aligned, al_params, max_decode_len=8)
  rng = np.random.default_rng(0)
  n = 40
  prompts = _responses(rng, n, 6)
  chosen, rejected = _responses(rng, n, 8), _responses(rng, n, 6)  # widths may differ
  size_before = dera.Realigner._score._cache_size()
  got = win_rates.realigned_pairwise_accuracy(realigner, prompts, chosen, rejected,
                                              lams=[0.0, 1.0, 2.5], batch_size=16)
  assert list(got) == [0.0, 1.0, 2.5]
  assert dera.Realigner._score._cache_size() - size_before == 1  # all lams, all batches

  score_batch = jax.jit(ref.score_batch)  # same architecture: one compilation
  padded = np.pad(rejected, ((0, 0), (0, 2)))  # PAD does not change a score

  def own(params):
    def logp(targets):
      targets = jnp.asarray(targets)
      return np.asarray(score_batch(params, {"prompts": jnp.asarray(prompts),
                                             "responses": targets}))
    return win_rates.pairwise_accuracy(logp(chosen), (chosen > 0).sum(1),
                                       logp(padded), (rejected > 0).sum(1))

  expected_ref, expected_al = own(ref_params), own(al_params)
  assert got[0.0] == expected_ref and got[1.0] == expected_al
  assert expected_ref != expected_al  # the endpoints are distinguishable

  # lam = 2.5, by hand in float64 NumPy: per-token log-softmax of -1.5 h_ref + 2.5 h_al,
  # summed over each response's non-PAD tokens, divided by its length (eq. 14).
  logits = jax.jit(ref.logits)

  def mixed_logp(targets):
    batch = base.response_batch(jnp.asarray(prompts), jnp.asarray(targets))
    h = -1.5 * np.asarray(logits(ref_params, batch), np.float64) + 2.5 * np.asarray(
        logits(al_params, batch), np.float64)
    log_p = h - h.max(-1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
    token = np.take_along_axis(log_p, targets[..., None], -1)[..., 0]
    return (token * (targets > 0)).sum(-1) / (targets > 0).sum(-1)

  expected_mid = np.mean(mixed_logp(chosen) > mixed_logp(rejected))
  assert got[2.5] == expected_mid
  assert expected_mid not in (expected_ref, expected_al)  # lam matters


# ----------------------------------------------------------------------------- statistics

def _brute_force_spearman(x, y):
  """rho from hand-rolled average ranks, and the exact two-sided p-value over all n!
  pairings, in NumPy: an implementation independent of scipy's."""
  def ranks(v):
    v = np.asarray(v, np.float64)
    return np.array([np.sum(v < a) + (np.sum(v == a) + 1) / 2 for a in v])
  rx, ry = ranks(x), ranks(y)
  rho = np.corrcoef(rx, ry)[0, 1]
  null = np.array([np.corrcoef(rx, ry[list(p)])[0, 1]
                   for p in itertools.permutations(range(len(ry)))])
  return rho, np.mean(np.abs(null) >= abs(rho) - 1e-12)


def test_spearman_rho_and_exact_p_value():
  # The README's Figure 2 case: 5 λ, rho = 1 - 6 * sum(d^2) / (n (n^2 - 1)) = 1 - 6 * 32 /
  # 120 = -0.6, and 42 of the 120 pairings reach |rho| >= 0.6: p = 0.35.
  got = win_rates.spearman_test([1, 2, 3, 4, 5], [4, 3, 5, 1, 2])
  assert (got.n, got.method) == (5, "exact permutation")
  np.testing.assert_allclose([got.rho, got.p_value], [-0.6, 0.35], rtol=1e-12)
  for x, y in [([1, 2, 3, 4, 5], [2, 3, 1, 5, 4]),
               ([0.5, 0.1, 0.9, 0.3, 0.7, 0.2, 0.8], [1, 1, 3, 2, 2, 0, 5]),  # ties
               ([3, 1, 2, 2], [1, 3, 2, 2])]:
    got = win_rates.spearman_test(x, y)
    rho, p = _brute_force_spearman(x, y)
    np.testing.assert_allclose(got.rho, rho, rtol=1e-12)
    np.testing.assert_allclose(got.p_value, p, rtol=1e-9)
    assert win_rates.spearman(x, y) == got.rho
  np.testing.assert_allclose(_brute_force_spearman([1, 2, 3, 4, 5], [4, 3, 5, 1, 2]),
                             [-0.6, 0.35], rtol=1e-12)
  # Many points: scipy's t approximation, t = rho sqrt((n - 2) / (1 - rho^2)) with n - 2
  # degrees of freedom, here recomputed by hand.
  x = np.arange(12)
  y = np.array([0, 2, 1, 4, 3, 6, 5, 8, 11, 7, 10, 9])
  got = win_rates.spearman_test(x, y)
  rho = 1 - 6 * np.sum((x - y) ** 2) / (12 * (12**2 - 1))
  t = rho * np.sqrt(10 / (1 - rho**2))
  assert got.method == "t approximation"
  np.testing.assert_allclose(got.rho, rho, rtol=1e-12)
  np.testing.assert_allclose(got.p_value, 2 * scipy.stats.t.sf(t, 10), rtol=1e-9)
  constant = win_rates.spearman_test([1, 1, 1], [1, 2, 3])
  assert np.isnan(constant.rho) and np.isnan(constant.p_value)


def test_clustered_standard_error_by_hand():
  # 3 prompts x 2 samples: per-prompt means 0.5, 1.5, 4; mean 2; deviations -1.5, -0.5, 2;
  # sample variance (2.25 + 0.25 + 4) / 2 = 3.25; standard error sqrt(3.25 / 3).
  mean, se = win_rates.clustered_mean_se([0, 1, 1, 2, 3, 5], 3)
  assert mean == 2.0
  np.testing.assert_allclose(se, np.sqrt(3.25 / 3), rtol=1e-15)
  assert np.isnan(win_rates.clustered_mean_se([1.0, 2.0], 1)[1])
  with pytest.raises(ValueError, match="5 values do not split into 2 equal clusters"):
    win_rates.clustered_mean_se(np.ones(5), 2)


def test_length_histogram_and_mean_abs_difference():
  hist = win_rates.length_histogram([1, 2, 2, 3, 10], bins=[0, 2, 4, 11])
  assert hist == {"counts": [1, 3, 1], "edges": [0.0, 2.0, 4.0, 11.0], "n": 5}
  hist = win_rates.length_histogram(np.arange(20), bins=4)
  assert hist["counts"] == [5, 5, 5, 5] and len(hist["edges"]) == 5
  assert all(type(c) is int for c in hist["counts"])
  assert win_rates.mean_abs_difference([0.5, 0.6, 0.9], [0.4, 0.6, 1.0]) == pytest.approx(0.2 / 3)
  with pytest.raises(ValueError):
    win_rates.mean_abs_difference([1.0], [1.0, 2.0])
