"""Pairwise judges: which of two responses to the same prompt is better.

The paper asks PaLM 2 to pick the better of two summaries (Sec. 5, App. D.3). Offline
we use stand-ins with the same interface: a judge maps N pairs to N outcomes for the
first response, 1.0 (it wins), 0.5 (tie) or 0.0 (it loses); the win rate is the mean.

  outcomes = judge_with_position_swap(rouge_l_judge, dera_texts, ref_texts, references,
                                      rng=np.random.default_rng(0))
  win_rates.win_rate(outcomes)
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import numpy as np

from deranj import rewards as rewards_lib
from deranj.data import batching

Params = Any


def outcomes_from_scores(scores_a, scores_b) -> np.ndarray:
  """[N], [N] scores (higher is better) -> [N] outcomes for A in {1, 0.5, 0}."""
  a, b = np.asarray(scores_a, np.float64), np.asarray(scores_b, np.float64)
  if a.shape != b.shape or a.ndim != 1:
    raise ValueError(f"scores must be two [N] arrays, got {a.shape} and {b.shape}.")
  return np.where(a > b, 1.0, np.where(a < b, 0.0, 0.5))


def rouge_l_judge(responses_a: Sequence[str], responses_b: Sequence[str],
                  references: Sequence[str]) -> np.ndarray:
  """The response with the higher ROUGE-L F1 against the reference wins: [N] outcomes.

  Same scorer settings as `deranj.text_metrics` (Porter stemming). Equal scores, e.g.
  identical responses, are ties (0.5).
  """
  from rouge_score import rouge_scorer  # pylint: disable=g-import-not-at-top
  if not len(responses_a) == len(responses_b) == len(references):
    raise ValueError(f"{len(responses_a)} responses A, {len(responses_b)} responses B and "
                     f"{len(references)} references; give one of each per pair.")
  scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
  f1 = lambda texts: [scorer.score(r, t)["rougeL"].fmeasure for t, r in zip(texts, references)]
  return outcomes_from_scores(f1(responses_a), f1(responses_b))


class RewardModelJudge:
  """The response with the higher reward r(x, y) wins.

  Rewards are computed in fixed-size batches (the last one padded by repeating a row)
  by one jitted function, so every call with the same [S] and [T] reuses one
  compilation. A reward model scores each response on its own, so it has no position
  bias; `judge_with_position_swap` still applies (`lambda a, b, x: judge(x, a, b)`).

  Args:
    model: the reward model.
    params: its parameters.
    batch_size: rows per reward-model call.
  """

  def __init__(self, model: rewards_lib.RewardModel, params: Params, *, batch_size: int = 64):
    if batch_size < 1:
      raise ValueError(f"batch_size must be positive, got {batch_size}.")
    self.model = model
    self.params = params
    self.batch_size = int(batch_size)
    self._rewards = jax.jit(model.rewards)

  def rewards(self, prompts, responses) -> np.ndarray:
    """Prompts [N, S] and responses [N, T] (tokens, EOS, PAD) -> [N] float32 rewards."""
    prompts, responses = np.asarray(prompts, np.int32), np.asarray(responses, np.int32)
    if prompts.ndim != 2 or responses.ndim != 2 or len(prompts) != len(responses):
      raise ValueError(f"expected prompts [N, S] and responses [N, T], got {prompts.shape} "
                       f"and {responses.shape}.")
    if not len(prompts):
      return np.zeros((0,), np.float32)
    return batching.map_in_fixed_batches(functools.partial(self._rewards, self.params),
                                         (prompts, responses), self.batch_size)

  def __call__(self, prompts, responses_a, responses_b) -> np.ndarray:
    """Prompts [N, S], responses [N, T] each -> [N] outcomes for A."""
    responses_a, responses_b = np.asarray(responses_a), np.asarray(responses_b)
    if responses_a.shape != responses_b.shape:
      raise ValueError(f"responses A {responses_a.shape} and B {responses_b.shape} differ.")
    # One pass over A and B together: fewer, fuller batches.
    both = self.rewards(np.concatenate([prompts, prompts]),
                        np.concatenate([responses_a, responses_b]))
    n = len(responses_a)
    return outcomes_from_scores(both[:n], both[n:])


def _pick(mask: np.ndarray, a, b):
  """Row i of b where mask[i], else of a; arrays [N, ...] or sequences of N items."""
  if isinstance(a, (np.ndarray, jax.Array)):
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
      raise ValueError(f"responses A {a.shape} and B {b.shape} differ in shape.")
    return np.where(mask.reshape((-1,) + (1,) * (a.ndim - 1)), b, a)
  return [y if m else x for m, x, y in zip(mask, a, b)]


def judge_with_position_swap(judge_fn: Callable[..., np.ndarray], responses_a, responses_b,
                             *extra, rng: np.random.Generator) -> np.ndarray:
  """Judges each pair in a random order and returns the outcomes for A (paper App. D.3).

  Each pair is shown as (A, B) or, with probability 1/2, as (B, A); the judge's
  outcome for the first position is mapped back to A's view. A judge biased towards
  one position then gives A and B that bias equally often: on average it cancels.

  Args:
    judge_fn: `judge_fn(first, second, *extra) -> [N] outcomes for first`.
    responses_a, responses_b: N responses each (sequences of strings or [N, ...] arrays).
    *extra: per-pair inputs passed through unswapped (references, prompts).
    rng: draws the N swaps.

  Returns:
    [N] outcomes for A in {1, 0.5, 0}.
  """
  n = len(responses_a)
  if len(responses_b) != n:
    raise ValueError(f"{n} responses A but {len(responses_b)} responses B.")
  swap = rng.random(n) < 0.5
  first, second = _pick(swap, responses_a, responses_b), _pick(swap, responses_b, responses_a)
  outcomes = np.asarray(judge_fn(first, second, *extra), np.float64)
  if outcomes.shape != (n,):
    raise ValueError(f"judge_fn returned shape {outcomes.shape}, expected ({n},).")
  return np.where(swap, 1.0 - outcomes, outcomes)
