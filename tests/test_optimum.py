"""deranj.evaluation.optimum: self-normalised importance sampling of pi*(beta) against a
direct float64 computation, a closed-form optimum, its ESS and its errors."""
import numpy as np
import pytest

from deranj.evaluation import optimum


def _direct(rewards, f, beta, n):
  """Per prompt w = exp(r / beta) / sum exp(r / beta), no log space (moderate beta)."""
  r, f = rewards.reshape(-1, n), f.reshape(-1, n)
  w = np.exp(r / beta)
  w /= w.sum(1, keepdims=True)
  return np.mean((w * f).sum(1)), 1.0 / (w ** 2).sum(1)


def test_matches_a_direct_float64_computation():
  rng = np.random.default_rng(0)
  p, n, beta = 3, 50, 0.7
  rewards, lengths = rng.normal(size=p * n), rng.integers(1, 40, size=p * n).astype(float)
  got = optimum.expectations(rewards, {"reward": rewards, "length": lengths}, beta, n)
  for name, f in (("reward", rewards), ("length", lengths)):
    want, ess = _direct(rewards, f, beta, n)
    np.testing.assert_allclose(got.values[name], want, rtol=1e-12)
  np.testing.assert_allclose([got.ess_mean, got.ess_min], [ess.mean(), ess.min()], rtol=1e-12)
  assert 1 <= got.ess_min < got.ess_mean < n  # unequal weights: fewer effective samples
  assert (got.num_prompts, got.samples_per_prompt, got.left_out, got.reason) == (p, n, False,
                                                                                None)
  # A larger beta is closer to pi_sft: more effective samples, a lower expected reward.
  wide = optimum.expectations(rewards, {"reward": rewards}, 10 * beta, n)
  assert wide.ess_min > got.ess_min and wide.values["reward"] < got.values["reward"]


def test_converges_to_the_closed_form_optimum_of_a_discrete_model():
  # Two prompts, pi_sft over 4 responses each; pi*(beta) = p exp(r / beta) / Z exactly.
  p = np.array([[0.4, 0.3, 0.2, 0.1], [0.7, 0.1, 0.1, 0.1]])
  r = np.array([[0.0, 0.5, 1.0, 2.0], [-1.0, 0.0, 0.3, 1.5]])
  beta, n = 0.5, 40_000
  q = p * np.exp(r / beta)
  q /= q.sum(1, keepdims=True)
  rng = np.random.default_rng(1)
  draws = np.stack([rng.choice(4, size=n, p=row) for row in p])  # [2, n] response ids
  rewards = np.take_along_axis(r, draws, 1).reshape(-1)
  is_best = (draws == 3).astype(float).reshape(-1)
  got = optimum.expectations(rewards, {"reward": rewards, "best": is_best}, beta, n)
  for name, f in (("reward", r), ("best", np.eye(4)[3][None].repeat(2, 0))):
    mu = (q * f).sum(1)
    # Delta-method variance of the self-normalised estimate, per prompt.
    var = ((q / p) ** 2 * p * (f - mu[:, None]) ** 2).sum(1) / n
    sd = np.sqrt(var.sum()) / 2  # of the mean over the two prompts
    assert abs(got.values[name] - mu.mean()) < 4 * sd, (name, got.values[name], mu.mean(), sd)
  # The ESS of exact weights: N / E_p[(q / p)^2] per prompt.
  want_ess = n / ((q / p) ** 2 * p).sum(1)
  np.testing.assert_allclose(got.ess_min, want_ess.min(), rtol=0.05)


def test_constant_reward_has_ess_n_and_the_plain_mean():
  n = 16
  lengths = np.arange(2 * n, dtype=float)
  got = optimum.expectations(np.full(2 * n, 3.0), {"length": lengths}, 0.01, n)
  assert got.ess_mean == pytest.approx(n, rel=1e-12) and got.ess_min == pytest.approx(n, rel=1e-12)
  np.testing.assert_allclose(got.values["length"], lengths.mean(), rtol=1e-12)


def test_small_beta_is_finite_and_picks_the_best_sample():
  rewards = np.array([0.1, 0.9, 0.5, -2.0, -1.0, -3.0])
  f = np.array([10.0, 20.0, 30.0, 40.0, 50.0, 60.0])
  got = optimum.expectations(rewards, {"f": f}, 1e-6, 3, min_ess=1.0)
  np.testing.assert_allclose(got.values["f"], (20.0 + 50.0) / 2, rtol=1e-12)
  assert got.ess_min == pytest.approx(1.0, rel=1e-9) and not got.left_out


def test_a_point_below_min_ess_is_left_out_with_a_reason():
  rewards = np.concatenate([np.zeros(20), np.r_[5.0, np.zeros(19)]])
  got = optimum.expectations(rewards, {"r": rewards}, 0.5, 20)
  assert got.left_out and got.values == {"r": None}
  assert got.ess_min < optimum.MIN_ESS <= got.ess_mean
  assert got.reason.startswith("ESS ") and "on 1 of 2 prompts (20 SFT samples each)" in got.reason
  assert got.to_dict()["values"] == {"r": None}


@pytest.mark.parametrize("beta", [0, -1.0, float("nan"), float("inf"), "x", None])
def test_bad_beta_is_a_one_line_error(beta):
  with pytest.raises(ValueError, match="^optimum: beta must be") as e:
    optimum.expectations(np.zeros(4), {}, beta, 2)
  assert "\n" not in str(e.value)


def test_bad_shapes_and_values_are_one_line_errors():
  with pytest.raises(ValueError, match=r"rewards must be a non-empty \[P \* N\] array with N = "
                     "samples_per_prompt = 3"):
    optimum.expectations(np.zeros(4), {}, 1.0, 3)
  with pytest.raises(ValueError, match=r"values\['f'\] has 2 rows, rewards 4"):
    optimum.expectations(np.zeros(4), {"f": np.zeros(2)}, 1.0, 2)
  with pytest.raises(ValueError, match="rewards has 1 non-finite values"):
    optimum.expectations(np.array([0.0, np.nan]), {}, 1.0, 2)


def test_win_rate_against_the_other_samples_by_brute_force():
  rng = np.random.default_rng(2)
  n = 7
  scores = rng.integers(0, 4, size=3 * n).astype(float)  # ties on purpose
  got = optimum.win_rate_against_samples(scores, n)
  s = scores.reshape(3, n)
  want = [np.mean([1.0 if s[p, i] > s[p, j] else 0.5 if s[p, i] == s[p, j] else 0.0
                   for j in range(n) if j != i]) for p in range(3) for i in range(n)]
  np.testing.assert_allclose(got, want, rtol=1e-12)
  # Under pi_sft itself (equal weights) the win rate against pi_sft is exactly 1/2.
  flat = optimum.expectations(np.zeros(3 * n), {"win": got}, 1.0, n, min_ess=1)
  np.testing.assert_allclose(flat.values["win"], 0.5, rtol=1e-12)
  with pytest.raises(ValueError, match="needs N >= 2"):
    optimum.win_rate_against_samples(np.zeros(3), 1)
