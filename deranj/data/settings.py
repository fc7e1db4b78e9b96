"""The data settings' gin configurables (directories, generator sizes, the T5 vocabulary),
without TensorFlow: `deranj.train` parses its command line, and stops on a mistake, before
TensorFlow loads. deranj.data.tasks reads them when it builds a dataset (and re-exports
them); see its docstring for what each one means.
"""
from __future__ import annotations

from typing import Optional

import gin

# Registered under the tasks module, where they were first: full gin names are unchanged.
_MODULE = "deranj.data.tasks"


@gin.configurable(module=_MODULE)
def xsum_data_dir(path: Optional[str] = None) -> Optional[str]:
  """TFDS data directory holding (or to hold) the prepared `xsum` dataset."""
  return path


@gin.configurable(module=_MODULE)
def xsum_manual_dir(path: Optional[str] = None) -> Optional[str]:
  """Where xsum-extracts-from-downloads.tar.gz is; None: <xsum data dir>/downloads/manual,
  TFDS's default manual directory."""
  return path


@gin.configurable(module=_MODULE)
def tldr_sft_dir(path: Optional[str] = None) -> Optional[str]:
  return path


@gin.configurable(module=_MODULE)
def tldr_preferences_dir(path: Optional[str] = None) -> Optional[str]:
  return path


@gin.configurable(module=_MODULE)
def preference_pairs_dir(path: Optional[str] = None) -> Optional[str]:
  return path


@gin.configurable(module=_MODULE)
def synthetic_summ_settings(seed: int = 0, train_examples: int = 10_000,
                            eval_examples: int = 500) -> tuple[int, dict[str, int]]:
  """Seed and examples per split of the `synthetic_summ` task."""
  return seed, {"train": train_examples, "validation": eval_examples, "test": eval_examples}


@gin.configurable(module=_MODULE)
def embedded_news_preferences_settings(corruption: str = "reverse_letters",
                                       seed: int = 0) -> tuple[str, int]:
  """How the `embedded_news_preferences` task corrupts its rejected summaries:
  'reverse_letters' or 'shuffle_words' (seeded by `seed`); see
  `deranj.data.corpora.news_preference_pairs`."""
  return corruption, seed


@gin.configurable(module=_MODULE)
def t5_spm_model(path: Optional[str] = None) -> Optional[str]:
  """A released T5's SentencePiece model (its spiece.model), for the `_t5` tasks."""
  return path
