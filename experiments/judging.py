"""Figures 3 and 7's judging: win rates from the gold reward model (with the random
position swap of the paper's App. D.3) and ROUGE-L, and eq. 14 pairwise accuracy."""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import numpy as np

from deranj import rewards
from deranj.data import batching
from deranj.evaluation import judges
from deranj.evaluation import win_rates
from deranj.models import base as models_base
from experiments import stages

JUDGES = ("gold", "rouge_l")


@functools.partial(jax.jit, static_argnums=0)
def _sequence_logps(model: models_base.EncoderDecoderModel, params, prompts, responses):
  return model.sequence_logprobs(params, prompts, responses)


def model_pairwise_accuracy(model, params, pairs: dict, batch_size: int) -> float:
  """Eq. 14 of one model on held-out pairs, the same convention as
  `win_rates.realigned_pairwise_accuracy` (lengths count non-PAD tokens, EOS included)."""
  logps = {side: batching.map_in_fixed_batches(
      functools.partial(_sequence_logps, model, params),
      (pairs["prompts"], pairs[f"{side}_responses"]), batch_size)
            for side in ("chosen", "rejected")}
  return win_rates.pairwise_accuracy(
      logps["chosen"], (pairs["chosen_responses"] > 0).sum(1),
      logps["rejected"], (pairs["rejected_responses"] > 0).sum(1))


# The bootstrap's numpy stream: default_rng([seed, BOOTSTRAP, comparison]).
BOOTSTRAP = 1_000_000


class Judging:
  """Both judges on one set of held-out prompts; outcomes for the first response.

  `prompts` [P * K, S] holds K samples of each of P prompts, prompt-major; win rates
  come with 95% intervals from a bootstrap over the P prompts
  (`win_rates.clustered_win_rate`, `num_resamples` resamples).
  """

  def __init__(self, gold: judges.RewardModelJudge, prompts: np.ndarray,
               references: Sequence[str], seed: int, samples_per_prompt: int,
               num_resamples: int = win_rates.DEFAULT_RESAMPLES):
    self.gold, self.prompts, self.references = gold, prompts, list(references)
    self.seed = seed
    self.num_prompts = len(prompts) // samples_per_prompt
    self.num_resamples = num_resamples
    self._calls = 0

  def _rng(self) -> np.random.Generator:
    self._calls += 1  # fresh swaps per comparison, reproducible from the seed
    return np.random.default_rng([self.seed, self._calls])

  def _win_rate(self, outcomes: np.ndarray) -> dict:
    self._calls += 1
    return win_rates.clustered_win_rate(
        outcomes, self.num_prompts, num_resamples=self.num_resamples,
        seed=(self.seed, BOOTSTRAP, self._calls)).to_dict()

  def compare(self, tokens_a: np.ndarray, tokens_b: np.ndarray) -> dict:
    """{judge: WinRate dict} of A against B, row i of each on the same prompt."""
    gold = judges.judge_with_position_swap(lambda a, b, x: self.gold(x, a, b), tokens_a,
                                           tokens_b, self.prompts, rng=self._rng())
    rouge = judges.judge_with_position_swap(judges.rouge_l_judge, stages.decode_all(tokens_a),
                                            stages.decode_all(tokens_b), self.references,
                                            rng=self._rng())
    return {"gold": self._win_rate(gold), "rouge_l": self._win_rate(rouge)}

  def describe(self, tokens: np.ndarray) -> dict:
    lengths = np.asarray(rewards.response_lengths(tokens))
    return {"mean_gold_reward": float(self.gold.rewards(self.prompts, tokens).mean()),
            "mean_length": float(lengths.mean())}
