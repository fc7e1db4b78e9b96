"""The exact world's data: a vocabulary that is the world's ids and its seqio tasks
(deranj.exact holds the enumeration, the gold reward and the closed-form optimum).

The world's model has a vocabulary of ids only (PAD 0, EOS 1, content ids 2..V-1), so
every id the sampler can emit is in the world. Texts are the ids written out, space
separated, EOS included where a response has one: "5 2 1" is [5, 2, 1]; a response cut
at max_decode_len is "5 2 3 4" (no EOS). Features do not get an EOS appended: a task's
ids are exactly the world's, so SFT targets, DPO pairs and rollouts all hold the
sampled ids (truncated responses stay truncated, with no EOS they never had).

Tasks, registered on import (files read when a dataset is built):
  exact_world              {inputs, targets} from `<exact_world_dir.path>/{split}.jsonl`
  exact_world_preferences  {inputs, chosen, rejected} from
                           `<exact_world_dir.path>/preferences/{split}.jsonl`
Each JSON line holds those fields as id texts; `write_examples` / `write_pairs` write them.
"""
from __future__ import annotations

import os
from typing import Iterable, Optional, Sequence

import gin
import seqio
import tensorflow as tf

from deranj.data import files
from deranj.data import tasks

PAD_ID, EOS_ID = 0, 1
TASK = "exact_world"
PREFERENCE_TASK = "exact_world_preferences"
PREFERENCE_SUBDIR = "preferences"


@gin.configurable
def exact_world_dir(path: Optional[str] = None) -> Optional[str]:
  """Directory of the exact world's task files (the driver writes them)."""
  return path


@gin.configurable
def exact_world_vocab_size(size: int = 8) -> int:
  """Ids of the world's model: PAD, EOS and content ids 2..size-1."""
  return size


class WorldVocabulary(seqio.Vocabulary):
  """Space-separated ids <-> ids; no UNK, EOS written like any id (see module docstring)."""

  def __init__(self, size: Optional[int] = None):
    super().__init__(extra_ids=0)
    self._size = size

  @property
  def _base_vocab_size(self) -> int:
    return self._size or exact_world_vocab_size()

  @property
  def eos_id(self) -> int:
    return EOS_ID

  @property
  def unk_id(self) -> Optional[int]:
    return None

  def _encode(self, s: str) -> list[int]:
    ids = [int(t) for t in s.split()]
    bad = [i for i in ids if not 0 < i < self._base_vocab_size]
    if bad:
      raise ValueError(f"{s!r}: ids {bad} outside 1..{self._base_vocab_size - 1} "
                       "(exact_world_vocab_size.size).")
    return ids

  def _decode(self, ids: Iterable[int]) -> str:
    return " ".join(str(int(i)) for i in ids if int(i) != PAD_ID)

  def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
    return tf.strings.to_number(tf.strings.split(s), tf.int32)

  def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
    ids = tf.convert_to_tensor(ids)
    kept = tf.ragged.boolean_mask(tf.strings.as_string(ids), ids != PAD_ID)
    return tf.strings.reduce_join(kept, axis=-1, separator=" ")

  def __eq__(self, other) -> bool:
    return isinstance(other, WorldVocabulary) and (
        other._base_vocab_size == self._base_vocab_size)


def ids_text(ids: Iterable[int]) -> str:
  """[5, 2, 1, 0, 0] -> "5 2 1": the ids up to and including EOS, PAD dropped."""
  out = []
  for i in ids:
    i = int(i)
    if i == PAD_ID:
      continue
    out.append(str(i))
    if i == EOS_ID:
      break
  return " ".join(out)


def write_examples(directory: str, split: str, prompts, targets) -> int:
  """`<directory>/<split>.jsonl` of {inputs, targets}: one line per row of [N, S], [N, L]."""
  return files.write_jsonl(os.path.join(directory, f"{split}.jsonl"), (
      {"inputs": ids_text(p), "targets": ids_text(t)} for p, t in zip(prompts, targets)))


def write_pairs(directory: str, split: str, prompts, chosen, rejected) -> int:
  """`<directory>/preferences/<split>.jsonl` of {inputs, chosen, rejected}."""
  return files.write_jsonl(
      os.path.join(directory, PREFERENCE_SUBDIR, f"{split}.jsonl"),
      ({"inputs": ids_text(p), "chosen": ids_text(c), "rejected": ids_text(r)}
       for p, c, r in zip(prompts, chosen, rejected)))


def _dataset(fields: Sequence[str], subdir: str, split: str, shuffle_files: bool = False,
             seed: Optional[int] = None) -> tf.data.Dataset:
  del shuffle_files, seed  # one file per split
  setting = "the gin binding `exact_world_dir.path`"
  directory = files.require_dir(exact_world_dir(), what="exact world data", setting=setting)
  path = tasks.split_file(os.path.join(directory, subdir) if subdir else directory, split,
                          what="exact world data", setting=setting)
  records = [[files.get_field(rec, f, path=path, line_number=n) for f in fields]
             for n, rec in files.read_jsonl(path)]
  if not records:
    raise files.DataError(f"exact world data: {path} holds no examples.")
  return tf.data.Dataset.from_tensor_slices(
      {f: tf.constant([r[k] for r in records], tf.string) for k, f in enumerate(fields)})


def register_tasks(vocabulary: Optional[seqio.Vocabulary] = None) -> list[str]:
  """Registers (or replaces) the world's two tasks; features keep their ids as written."""
  vocabulary = vocabulary or WorldVocabulary()
  made = []
  for name, fields, subdir in ((TASK, tasks.SUMMARIZATION_FEATURES, ""),
                               (PREFERENCE_TASK, tasks.PREFERENCE_FEATURES, PREFERENCE_SUBDIR)):
    if name in seqio.TaskRegistry.names():
      seqio.TaskRegistry.remove(name)
    source = seqio.FunctionDataSource(
        lambda split, shuffle_files=False, seed=None, fields=fields, subdir=subdir: _dataset(
            fields, subdir, split, shuffle_files, seed), splits=tasks.SPLITS)
    seqio.TaskRegistry.add(
        name, source=source,
        preprocessors=[seqio.preprocessors.tokenize, seqio.CacheDatasetPlaceholder(),
                       seqio.preprocessors.append_eos_after_trim],
        output_features={f: seqio.Feature(vocabulary, add_eos=False) for f in fields},
        metric_fns=[])
    made.append(name)
  return made


TASK_NAMES = register_tasks()
