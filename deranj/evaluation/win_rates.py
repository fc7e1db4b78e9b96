"""Win rates, pairwise accuracy (paper eq. 14) and the statistics the figures report."""
from __future__ import annotations

import dataclasses
import functools
import statistics
from typing import Sequence, Union

import numpy as np

from deranj import dera
from deranj.data import batching


@dataclasses.dataclass(frozen=True)
class WinRate:
  """Mean outcome of N judged pairs with a confidence interval [low, high]."""
  rate: float
  low: float
  high: float
  n: int

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def _outcomes(outcomes) -> np.ndarray:
  x = np.asarray(outcomes, np.float64)
  if x.ndim != 1 or x.size == 0:
    raise ValueError(f"outcomes must be a non-empty [N] array, got shape {x.shape}.")
  if not np.all((x >= 0) & (x <= 1)):  # also refuses NaN
    raise ValueError("outcomes must lie in [0, 1] (1 win, 0.5 tie, 0 loss).")
  return x


def win_rate(outcomes, confidence: float = 0.95) -> WinRate:
  """Win rate of A and its normal-approximation (Wald) interval.

  rate = mean(outcomes), ties counting half. The interval is
  rate +- z * std / sqrt(N), with the sample std (ddof=1) of the outcomes, so ties
  shrink it as they should, and z the normal quantile at (1 + confidence) / 2;
  clipped to [0, 1]. Deterministic (no resampling). With N = 1 the std is undefined
  and the interval is [0, 1]; when all outcomes agree it collapses to the rate. For
  several samples per prompt use `clustered_win_rate`: this one treats them as
  independent.

  Args:
    outcomes: [N] outcomes for A in [0, 1].
    confidence: two-sided coverage, in (0, 1).
  """
  if not 0 < confidence < 1:
    raise ValueError(f"confidence must be in (0, 1), got {confidence}.")
  x = _outcomes(outcomes)
  n, rate = x.size, float(x.mean())
  if n == 1:
    return WinRate(rate, 0.0, 1.0, 1)
  z = statistics.NormalDist().inv_cdf((1 + confidence) / 2)
  half = z * float(x.std(ddof=1)) / np.sqrt(n)
  return WinRate(rate, float(max(0.0, rate - half)), float(min(1.0, rate + half)), int(n))


DEFAULT_RESAMPLES = 2000


def clustered_win_rate(outcomes, num_clusters: int, *, confidence: float = 0.95,
                       num_resamples: int = DEFAULT_RESAMPLES,
                       seed: Union[int, Sequence[int]] = 0) -> WinRate:
  """Win rate of A with a percentile bootstrap interval that resamples prompts.

  The N = C * K outcomes come in C equal clusters, cluster-major (K samples of each of
  C prompts). Samples of one prompt are correlated (an easy prompt is won by every
  sample), so `win_rate`'s interval, which treats all N as independent, is too narrow.
  Here each of `num_resamples` resamples draws C prompts with replacement, each with
  all its K outcomes; the interval is the (1 -+ confidence) / 2 quantiles of the
  resampled rates (numpy's default_rng(seed), so reproducible). With one cluster the
  spread is unknown and the interval is [0, 1].

  Args:
    outcomes: [C * K] outcomes for A in [0, 1], cluster-major.
    num_clusters: C.
    confidence: two-sided coverage, in (0, 1).
    num_resamples: bootstrap resamples (>= 100).
    seed: the resampling's seed (an int or a sequence of ints).
  """
  if not 0 < confidence < 1:
    raise ValueError(f"confidence must be in (0, 1), got {confidence}.")
  if num_resamples < 100:
    raise ValueError(f"num_resamples={num_resamples}: the bootstrap needs at least 100 "
                     "resamples for its quantiles.")
  x = _outcomes(outcomes)
  means = _cluster_means(x, num_clusters)
  rate = float(x.mean())
  if num_clusters == 1:
    return WinRate(rate, 0.0, 1.0, int(x.size))
  picks = np.random.default_rng(seed).integers(0, num_clusters, (num_resamples, num_clusters))
  rates = means[picks].mean(axis=1)
  low, high = np.quantile(rates, [(1 - confidence) / 2, (1 + confidence) / 2])
  return WinRate(rate, float(low), float(high), int(x.size))


def pairwise_accuracy(logp_chosen, len_chosen, logp_rejected, len_rejected) -> float:
  """Paper eq. 14: fraction of pairs with log pi(y_w|x)/|y_w| > log pi(y_l|x)/|y_l|.

  Args:
    logp_chosen, logp_rejected: [N] sequence log-probabilities.
    len_chosen, len_rejected: [N] lengths in tokens (positive).
  """
  arrays = [np.asarray(v, np.float64) for v in (logp_chosen, len_chosen, logp_rejected,
                                                len_rejected)]
  if len({a.shape for a in arrays}) != 1 or arrays[0].ndim != 1 or arrays[0].size == 0:
    raise ValueError(f"expected four non-empty [N] arrays, got shapes "
                     f"{[a.shape for a in arrays]}.")
  lp_w, n_w, lp_l, n_l = arrays
  if np.any(n_w <= 0) or np.any(n_l <= 0):
    raise ValueError("lengths must be positive (count EOS in them).")
  return float(np.mean(lp_w / n_w > lp_l / n_l))


def _pad_to(tokens: np.ndarray, width: int) -> np.ndarray:
  return np.pad(tokens, ((0, 0), (0, width - tokens.shape[1])))


def realigned_pairwise_accuracy(realigner: dera.Realigner, prompts, chosen, rejected,
                                lams: Sequence[float], batch_size: int) -> dict[float, float]:
  """Eq. 14 for the DeRa model at each lam, from `Realigner.score`.

  Chosen and rejected responses of a batch are scored in one call ([2 * batch_size]
  rows; the last batch is padded by repeating a row), so every lam and batch share one
  compilation (lam is traced). Lengths count non-PAD target tokens, EOS included, the
  tokens `score` sums over.

  Args:
    realigner: reference and aligned model(s).
    prompts: [N, S] encoder inputs, 0 = PAD.
    chosen, rejected: [N, T] preferred and dispreferred responses (tokens, EOS, PAD);
      their widths may differ.
    lams: values of lam (a float each for one aligned model).
    batch_size: pairs per call.

  Returns:
    {lam: pairwise accuracy}, keys as floats in the order given.
  """
  prompts = np.asarray(prompts, np.int32)
  chosen, rejected = np.asarray(chosen, np.int32), np.asarray(rejected, np.int32)
  n = len(prompts)
  if prompts.ndim != 2 or chosen.ndim != 2 or rejected.ndim != 2 or not (
      n == len(chosen) == len(rejected)) or n == 0:
    raise ValueError(f"expected prompts [N, S], chosen [N, T] and rejected [N, T'] with "
                     f"N > 0, got {prompts.shape}, {chosen.shape} and {rejected.shape}.")
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}.")
  width = max(chosen.shape[1], rejected.shape[1])
  chosen, rejected = _pad_to(chosen, width), _pad_to(rejected, width)
  len_chosen, len_rejected = (chosen > 0).sum(axis=1), (rejected > 0).sum(axis=1)
  def both_sides(lam, x, w, l):
    scores = realigner.score(np.concatenate([x, x]), np.concatenate([w, l]), lam)
    return scores[:batch_size], scores[batch_size:]

  result = {}
  for lam in lams:
    logp_w, logp_l = batching.map_in_fixed_batches(
        functools.partial(both_sides, float(lam)), (prompts, chosen, rejected), batch_size)
    result[float(lam)] = pairwise_accuracy(logp_w, len_chosen, logp_l, len_rejected)
  return result


def length_histogram(lengths, bins: Union[int, Sequence[float]] = 10) -> dict:
  """Histogram of lengths as JSON-friendly lists (np.histogram's bins and edges).

  Returns:
    {"counts": [num_bins] ints, "edges": [num_bins + 1] floats, "n": total}.
  """
  x = np.asarray(lengths, np.float64).ravel()
  counts, edges = np.histogram(x, bins=bins)
  return {"counts": [int(c) for c in counts], "edges": [float(e) for e in edges],
          "n": int(x.size)}


# Up to this many points the p-value is exact: all n! pairings (8! = 40320).
EXACT_SPEARMAN_MAX_N = 8


@dataclasses.dataclass(frozen=True)
class SpearmanTest:
  """Spearman's rho (average ranks for ties) and its two-sided p-value under
  independence; both NaN when either side is constant."""
  rho: float
  p_value: float
  n: int
  method: str  # "exact permutation" (n <= EXACT_SPEARMAN_MAX_N) or "t approximation"


def _rank_pearson(rx: np.ndarray, ry: np.ndarray) -> np.ndarray:
  """Pearson correlation of ranks rx [N] with each row of ry [..., N]."""
  rx, ry = rx - rx.mean(), ry - ry.mean(axis=-1, keepdims=True)
  return (ry @ rx) / np.sqrt(np.sum(rx**2) * np.sum(ry**2, axis=-1))


def spearman_test(x, y) -> SpearmanTest:
  """Spearman's rho and p-value, from scipy.stats.

  With few points (the figures' λ grids have 5 or 7) the t approximation of
  `scipy.stats.spearmanr` is poor, so up to EXACT_SPEARMAN_MAX_N points the p-value is
  exact: the share of all n! pairings of x with y whose |rho| is at least as large
  (`scipy.stats.permutation_test`; ties handled as the data has them).
  """
  import scipy.stats  # pylint: disable=g-import-not-at-top
  x, y = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
  if x.shape != y.shape or x.size < 2:
    raise ValueError(f"expected two [N] arrays with N >= 2, got {x.shape} and {y.shape}.")
  n = int(x.size)
  exact = n <= EXACT_SPEARMAN_MAX_N
  method = "exact permutation" if exact else "t approximation"
  if np.all(x == x[0]) or np.all(y == y[0]):
    return SpearmanTest(float("nan"), float("nan"), n, method)
  result = scipy.stats.spearmanr(x, y)
  rho, p_value = float(result.statistic), float(result.pvalue)
  if exact:
    rx, ry = scipy.stats.rankdata(x), scipy.stats.rankdata(y)
    perm = scipy.stats.permutation_test(
        (ry,), lambda r, axis=-1: _rank_pearson(rx, r), permutation_type="pairings",
        vectorized=True, n_resamples=np.inf, alternative="two-sided")
    p_value = float(perm.pvalue)
  return SpearmanTest(rho, p_value, n, method)


def spearman(x, y) -> float:
  """Spearman rank correlation with average ranks for ties; NaN if either is constant."""
  return spearman_test(x, y).rho


def _cluster_means(values, num_clusters: int) -> np.ndarray:
  """[C * K] cluster-major values -> [C] cluster means."""
  x = np.asarray(values, np.float64).ravel()
  if num_clusters < 1 or x.size == 0 or x.size % num_clusters:
    raise ValueError(f"{x.size} values do not split into {num_clusters} equal clusters.")
  return x.reshape(num_clusters, -1).mean(axis=1)


def clustered_mean_se(values, num_clusters: int) -> tuple[float, float]:
  """Mean of [C * K] values in C equal clusters (cluster-major, e.g. K samples per
  prompt) and its standard error from the C cluster means, std(ddof=1) / sqrt(C).

  Samples of one prompt are correlated; treating all C * K as independent would
  understate the error. NaN standard error for one cluster.
  """
  means = _cluster_means(values, num_clusters)
  se = float(means.std(ddof=1) / np.sqrt(num_clusters)) if num_clusters > 1 else float("nan")
  return float(means.mean()), se


def mean_abs_difference(x, y) -> float:
  """mean |x - y| over matching entries, e.g. DeRa vs retrained win rates per lam."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if x.shape != y.shape or x.size == 0:
    raise ValueError(f"expected two non-empty arrays of one shape, got {x.shape} and {y.shape}.")
  return float(np.mean(np.abs(x - y)))
