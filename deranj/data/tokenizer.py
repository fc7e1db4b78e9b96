"""The SentencePiece model deranj ships, with T5's conventions.

`deranj/assets/spm.model` is a unigram model trained on the embedded prose by
`scripts/build_tokenizer.py`: PAD=0, EOS=1, UNK=2, no BOS, and NUM_SENTINELS pieces
`<extra_id_i>` at the top of the vocabulary (extra_id_0 is the last id), as seqio adds
them for T5. Because the sentinels live in the model file itself, plain sentencepiece
(`encode`/`decode` here, no TensorFlow) and seqio (`get_vocabulary()`, extra_ids=0)
give the same ids.
"""
from __future__ import annotations

import functools
import os
from typing import Iterable

import sentencepiece as spm

from deranj.data import files

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
NUM_SENTINELS = 96
MODEL_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "assets", "spm.model")


def model_path() -> str:
  return files.require_file(MODEL_PATH, what="tokenizer model",
                            setting="nothing: rebuild it with `python scripts/build_tokenizer.py`")


@functools.lru_cache(maxsize=None)
def processor() -> spm.SentencePieceProcessor:
  sp = spm.SentencePieceProcessor(model_file=model_path())
  if (sp.pad_id(), sp.eos_id(), sp.unk_id()) != (PAD_ID, EOS_ID, UNK_ID):
    raise files.DataError(f"{model_path()}: expected PAD/EOS/UNK ids {PAD_ID}/{EOS_ID}/"
                          f"{UNK_ID}, got {sp.pad_id()}/{sp.eos_id()}/{sp.unk_id()}.")
  return sp


def vocab_size() -> int:
  """Number of ids, sentinels included (the model's `vocab_size`)."""
  return processor().get_piece_size()


def sentinel_id(index: int) -> int:
  """Id of `<extra_id_{index}>`: counted down from the top of the vocabulary."""
  if not 0 <= index < NUM_SENTINELS:
    raise ValueError(f"sentinel index {index} outside [0, {NUM_SENTINELS}).")
  return vocab_size() - 1 - index


def encode(text: str) -> list[int]:
  """Text -> ids, without EOS."""
  return processor().encode(text)


def response_ids(ids: Iterable[int], eos_id: int = EOS_ID) -> list[int]:
  """The ids before the first EOS, PAD dropped (what seqio decodes)."""
  kept = []
  for i in ids:
    i = int(i)
    if i == eos_id:
      break
    if i != PAD_ID:
      kept.append(i)
  return kept


def decode(ids: Iterable[int]) -> str:
  """Ids -> text, stopping at the first EOS and skipping PAD (as seqio decodes)."""
  return processor().decode(response_ids(ids))


@functools.lru_cache(maxsize=None)
def get_vocabulary():
  """The shipped model as a `seqio.SentencePieceVocabulary` (imports seqio, i.e. TF)."""
  import seqio  # pylint: disable=g-import-not-at-top
  return seqio.SentencePieceVocabulary(model_path(), extra_ids=0)
