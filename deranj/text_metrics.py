"""ROUGE of decoded text against references (the rouge-score package, F-measures x 100)."""
from __future__ import annotations

from typing import Sequence

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def rouge_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
  """Mean ROUGE-1/2/L F1 (x 100) over aligned prediction/reference pairs."""
  from rouge_score import rouge_scorer  # pylint: disable=g-import-not-at-top
  if len(predictions) != len(references):
    raise ValueError(f"{len(predictions)} predictions but {len(references)} references.")
  if not predictions:
    return {t: 0.0 for t in ROUGE_TYPES}
  scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
  totals = dict.fromkeys(ROUGE_TYPES, 0.0)
  for prediction, reference in zip(predictions, references):
    scores = scorer.score(reference, prediction)
    for t in ROUGE_TYPES:
      totals[t] += scores[t].fmeasure
  return {t: 100.0 * v / len(predictions) for t, v in totals.items()}
