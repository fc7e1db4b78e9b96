"""Expectations under the KL-regularised optimum, from samples of the reference model.

For a reward r and strength beta > 0, the policy maximising E[r] - beta * KL(pi || pi_sft)
is pi*(beta)(y|x) = pi_sft(y|x) exp(r(x, y) / beta) / Z(x). With samples y_1..y_N of
pi_sft(.|x), self-normalised importance sampling estimates any expectation under it:

    E_{pi*(beta)}[f] ~= sum_i w_i f(y_i),   w_i = exp(r_i / beta) / sum_j exp(r_j / beta).

Per prompt, in float64 and log space (beta -> 0 does not overflow), then averaged over
prompts. The weights' effective sample size (ESS = 1 / sum_i w_i^2, N for equal weights,
1 when one sample holds all the weight) says how many samples the estimate really rests
on; a point whose smallest per-prompt ESS is below MIN_ESS is left out. ESS measures
weight degeneracy among the drawn samples only: where pi*(beta) puts its mass on responses
pi_sft never produced in N draws, the estimate is wrong whatever its ESS.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Optional

import numpy as np

MIN_ESS = 10.0  # per prompt; fewer effective samples and a point is left out


def check_beta(beta) -> float:
  """beta as a float; a one-line ValueError unless it is finite and > 0."""
  try:
    value = float(beta)
  except (TypeError, ValueError):
    raise ValueError(f"optimum: beta must be a number > 0, got {beta!r}.") from None
  if not (math.isfinite(value) and value > 0):
    raise ValueError(f"optimum: beta must be finite and > 0, got {beta!r}.")
  return value


def _by_prompt(x, samples_per_prompt: int, what: str) -> np.ndarray:
  x = np.asarray(x, np.float64)
  if x.ndim != 1 or samples_per_prompt < 1 or x.size == 0 or x.size % samples_per_prompt:
    raise ValueError(f"optimum: {what} must be a non-empty [P * N] array with N = "
                     f"samples_per_prompt = {samples_per_prompt} samples per prompt, got "
                     f"shape {x.shape}.")
  if not np.all(np.isfinite(x)):
    raise ValueError(f"optimum: {what} has {int((~np.isfinite(x)).sum())} non-finite values.")
  return x.reshape(-1, samples_per_prompt)


def _logsumexp(x: np.ndarray) -> np.ndarray:
  top = x.max(axis=1, keepdims=True)
  return (top + np.log(np.exp(x - top).sum(axis=1, keepdims=True)))[:, 0]


def log_weights(rewards, beta, samples_per_prompt: int) -> np.ndarray:
  """[P, N] self-normalised log-weights log w_i of pi*(beta) over each prompt's samples.

  `rewards`: [P * N] r(x, y_i), rows prompt-major (sample i of prompt p at p * N + i).
  """
  beta = check_beta(beta)
  z = _by_prompt(rewards, samples_per_prompt, "rewards") / beta
  return z - _logsumexp(z)[:, None]


def effective_sample_sizes(log_w: np.ndarray) -> np.ndarray:
  """[P] ESS = 1 / sum_i w_i^2 of normalised log-weights [P, N]."""
  return np.exp(-_logsumexp(2.0 * log_w))


@dataclasses.dataclass(frozen=True)
class Estimate:
  """E_{pi*(beta)}[f] for named f, averaged over prompts, with the weights' ESS."""
  beta: float
  values: dict[str, Optional[float]]  # None when left out
  ess_mean: float
  ess_min: float
  num_prompts: int
  samples_per_prompt: int
  left_out: bool
  reason: Optional[str]  # why the point is left out

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def expectations(rewards, values: Mapping[str, object], beta, samples_per_prompt: int,
                 min_ess: float = MIN_ESS) -> Estimate:
  """E_{pi*(beta)}[f] for each f in `values`, from N samples of pi_sft per prompt.

  Args:
    rewards: [P * N] rewards r(x, y_i) of pi_sft's samples, prompt-major.
    values: {name: [P * N] f(x, y_i)} on the same rows (e.g. a reward, a length).
    beta: the optimum's KL strength (> 0).
    samples_per_prompt: N.
    min_ess: the point is left out (values None) when a prompt's ESS is below it.

  Returns:
    The mean over prompts of each prompt's self-normalised estimate, with the ESS
    of the weights (mean and smallest over prompts).
  """
  beta = check_beta(beta)
  log_w = log_weights(rewards, beta, samples_per_prompt)
  ess = effective_sample_sizes(log_w)
  w = np.exp(log_w)
  means = {}
  for name, f in values.items():
    f = _by_prompt(f, samples_per_prompt, f"values[{name!r}]")
    if f.shape != w.shape:
      raise ValueError(f"optimum: values[{name!r}] has {f.size} rows, rewards {w.size}.")
    means[name] = float(np.mean(np.sum(w * f, axis=1)))
  ess_min = float(ess.min())
  left_out = ess_min < min_ess
  reason = None
  if left_out:
    reason = (f"ESS {ess_min:.3g} < {min_ess:g} on {int((ess < min_ess).sum())} of "
              f"{len(ess)} prompts ({samples_per_prompt} SFT samples each)")
    means = {name: None for name in means}
  return Estimate(beta, means, float(ess.mean()), ess_min, int(len(ess)),
                  int(samples_per_prompt), bool(left_out), reason)


def win_rate_against_samples(scores, samples_per_prompt: int) -> np.ndarray:
  """[P * N] f(y_i) = the share of the prompt's other samples y_j that y_i beats by score
  (ties count half): E_{pi*}[f] is pi*'s win rate against pi_sft under a judge that
  prefers the higher score, with the prompt's other pi_sft samples as opponents."""
  s = _by_prompt(scores, samples_per_prompt, "scores")
  if samples_per_prompt < 2:
    raise ValueError("optimum: a win rate against the other samples needs N >= 2 samples "
                     "per prompt.")
  rows = []
  for prompt in s:  # ranks: O(N log N) per prompt, not an [N, N] table
    ordered = np.sort(prompt)
    below = np.searchsorted(ordered, prompt, side="left")
    equal = np.searchsorted(ordered, prompt, side="right") - below  # itself included
    rows.append((below + 0.5 * (equal - 1)) / (samples_per_prompt - 1))
  return np.concatenate(rows)
