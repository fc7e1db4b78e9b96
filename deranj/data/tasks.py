"""seqio tasks for deranj, registered on import.

Summarisation tasks (features `inputs`, `targets`):
  xsum            TFDS `xsum`, prepared under `xsum_data_dir.path`. If it is not, TFDS
                  builds it from xsum-extracts-from-downloads.tar.gz in the manual dir
                  (`xsum_manual_dir.path`, default `<data_dir>/downloads/manual`); that
                  also fetches XSum's split list from GitHub once (needs network).
  tldr_sft        OpenAI TL;DR posts, `tldr_sft_dir.path/{train,valid,test}.jsonl`
  embedded_news   XSum-style pairs from the embedded corpora (deranj.data.corpora)
  synthetic_summ  the seeded generator (deranj.data.synthetic), sizes in `synthetic_summ_settings`
Preference tasks (features `inputs`, `chosen`, `rejected`):
  tldr_preferences  OpenAI TL;DR comparisons, `tldr_preferences_dir.path/{split}.jsonl`
  embedded_news_preferences  the embedded_news articles: the lead sentence (chosen)
                    against a corrupted copy (rejected), as
                    `embedded_news_preferences_settings` says (corpora.news_preference_pairs)
  preference_pairs  pairs the experiments write, `preference_pairs_dir.path/{split}.jsonl`
                    (more with `register_preference_pairs(name, directory)`); pairs
                    with sampled token ids give exactly those ids (no re-tokenising)

Directories are gin bindings read when a dataset is built, not at import, e.g.
  --gin_bindings="tldr_sft_dir.path='/data/tldr'"
A split's file is `<dir>/<split>.jsonl` (validation may be `valid.jsonl`, OpenAI's name).

Preprocessing, the same for every task: inputs = "summarize: " + document/prompt
(T5's convention), tokenize with the shipped SentencePiece model, truncate to the
requested lengths leaving room for EOS, append EOS. `deranj.data.pipeline` applies
seqio's EncDecFeatureConverter for training and evaluation alike.
"""
from __future__ import annotations

import functools
import os
from typing import Callable, Optional, Sequence

import seqio
import tensorflow as tf

from deranj.data import corpora
from deranj.data import files
from deranj.data import preferences
from deranj.data import settings
from deranj.data import synthetic
from deranj.data import tldr
from deranj.data import tokenizer

PREFIX = "summarize: "
SPLITS = ("train", "validation", "test")
XSUM_TFDS_NAME = "xsum:1.1.0"
XSUM_MANUAL_FILE = "xsum-extracts-from-downloads.tar.gz"

SUMMARIZATION_FEATURES = ("inputs", "targets")
PREFERENCE_FEATURES = ("inputs", "chosen", "rejected")


# ----------------------------------------------------------------------------- settings


# The settings' gin names live in deranj.data.settings (no TensorFlow there, so a command
# line is parsed before TensorFlow loads); re-exported here.
xsum_data_dir = settings.xsum_data_dir
xsum_manual_dir = settings.xsum_manual_dir
tldr_sft_dir = settings.tldr_sft_dir
tldr_preferences_dir = settings.tldr_preferences_dir
preference_pairs_dir = settings.preference_pairs_dir
synthetic_summ_settings = settings.synthetic_summ_settings
embedded_news_preferences_settings = settings.embedded_news_preferences_settings
t5_spm_model = settings.t5_spm_model


def _binding(setting: Callable[..., object]) -> str:
  name = setting.__name__
  return f"the gin binding `{name}.path` (e.g. --gin_bindings=\"{name}.path='/data/dir'\")"


def split_file(directory: Optional[str], split: str, *, what: str, setting: str) -> str:
  """`<directory>/<split>.jsonl` (or OpenAI's `valid.jsonl`); DataError naming `setting`."""
  directory = files.require_dir(directory, what=what, setting=setting)
  names = ("validation.jsonl", "valid.jsonl") if split == "validation" else (f"{split}.jsonl",)
  for name in names:
    path = os.path.join(directory, name)
    if os.path.isfile(path):
      return path
  raise files.DataError(f"{what}: no {' or '.join(names)} for split {split!r} in {directory!r}. "
                        f"Add the file or set {setting}.")


# ----------------------------------------------------------------------------- sources


def _summary_dataset(examples: Sequence[corpora.SummaryExample]) -> tf.data.Dataset:
  return tf.data.Dataset.from_tensor_slices({
      "document": tf.constant([e.document for e in examples], tf.string),
      "summary": tf.constant([e.summary for e in examples], tf.string)})


def _pair_dataset(pairs: Sequence[preferences.PreferencePair]) -> tf.data.Dataset:
  columns = {field: tf.constant([getattr(p, field) for p in pairs], tf.string)
             for field in preferences.FIELDS}
  if pairs and pairs[0].has_ids:  # read_pairs: on every record or on none
    for field in preferences.ID_FIELDS:
      rows = [getattr(p, field) for p in pairs]
      columns[field] = tf.RaggedTensor.from_row_lengths(
          tf.constant([i for row in rows for i in row], tf.int32), [len(r) for r in rows])
  return tf.data.Dataset.from_tensor_slices(columns)


def _xsum_dataset(split: str, shuffle_files: bool = False,
                  seed: Optional[int] = None) -> tf.data.Dataset:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  setting = _binding(xsum_data_dir)
  data_dir = files.require_dir(xsum_data_dir(), what="xsum", setting=setting)
  builder = tfds.builder(XSUM_TFDS_NAME, data_dir=data_dir)
  read_config = tfds.ReadConfig(shuffle_seed=seed)
  try:
    return builder.as_dataset(split=split, shuffle_files=shuffle_files, read_config=read_config)
  except AssertionError:  # TFDS's "could not find data": not prepared yet
    pass
  # As TFDS documents: the manual download goes in <data_dir>/downloads/manual.
  manual_dir = xsum_manual_dir() or os.path.join(data_dir, "downloads", "manual")
  archive = os.path.join(manual_dir, XSUM_MANUAL_FILE)
  if not os.path.isfile(archive):
    raise files.DataError(
        f"xsum: no prepared TFDS dataset {XSUM_TFDS_NAME!r} under {data_dir!r}, and no "
        f"{archive!r} to build it from (see "
        "https://github.com/EdinburghNLP/XSum/tree/master/XSum-Dataset). Put the archive "
        f"there or set {_binding(xsum_manual_dir)}; or point {setting} at a directory "
        "where xsum is prepared.")
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder.as_dataset(split=split, shuffle_files=shuffle_files, read_config=read_config)


def _tldr_sft_dataset(split: str, shuffle_files: bool = False,
                      seed: Optional[int] = None) -> tf.data.Dataset:
  del shuffle_files, seed  # one file per split
  path = split_file(tldr_sft_dir(), split, what="tldr_sft", setting=_binding(tldr_sft_dir))
  return _summary_dataset(tldr.read_sft(path))


def _tldr_preferences_dataset(split: str, shuffle_files: bool = False,
                              seed: Optional[int] = None) -> tf.data.Dataset:
  del shuffle_files, seed
  path = split_file(tldr_preferences_dir(), split, what="tldr_preferences",
                    setting=_binding(tldr_preferences_dir))
  return _pair_dataset(tldr.read_comparisons(path))


def _preference_pairs_dataset(split: str, shuffle_files: bool = False,
                              seed: Optional[int] = None, directory: Optional[str] = None,
                              name: str = "preference_pairs") -> tf.data.Dataset:
  del shuffle_files, seed
  setting = (f"the directory passed to register_preference_pairs({name!r}, ...)" if directory
             else _binding(preference_pairs_dir))
  path = split_file(directory or preference_pairs_dir(), split, what=name, setting=setting)
  return _pair_dataset(preferences.read_pairs(path))


def _embedded_news_dataset(split: str, shuffle_files: bool = False,
                           seed: Optional[int] = None) -> tf.data.Dataset:
  del shuffle_files, seed
  return _summary_dataset(corpora.news_pairs(split))


def _embedded_news_preferences_dataset(split: str, shuffle_files: bool = False,
                                       seed: Optional[int] = None) -> tf.data.Dataset:
  del shuffle_files, seed  # the corruption's seed is a setting of the task
  corruption, corruption_seed = embedded_news_preferences_settings()
  return _pair_dataset(corpora.news_preference_pairs(split, corruption, corruption_seed))


def _synthetic_dataset(split: str, shuffle_files: bool = False,
                       seed: Optional[int] = None) -> tf.data.Dataset:
  del shuffle_files, seed  # the generator's seed is a setting of the task
  generator_seed, sizes = synthetic_summ_settings()
  return _summary_dataset(synthetic.examples(sizes[split], seed=generator_seed, split=split))


# ----------------------------------------------------------------------------- preprocessing


@seqio.map_over_dataset
def summarize_prompt(example, prefix: str = PREFIX):
  """{document, summary} -> {inputs: prefix + document, targets: summary}."""
  return {"inputs": tf.strings.join([prefix, example["document"]]),
          "targets": example["summary"]}


@seqio.map_over_dataset
def preference_prompt(example, prefix: str = PREFIX):
  """{prompt, chosen, rejected} -> {inputs: prefix + prompt, chosen, rejected}; sampled
  token ids, when the pairs have them, pass through."""
  return {"inputs": tf.strings.join([prefix, example["prompt"]]),
          "chosen": example["chosen"], "rejected": example["rejected"],
          **{f: example[f] for f in preferences.ID_FIELDS if f in example}}


@seqio.map_over_dataset
def use_sampled_ids(example):
  """Pairs with sampled token ids train on those ids exactly, in place of their texts'
  tokens (which may differ, and end with an EOS even where the sampler cut a response)."""
  if "chosen_ids" not in example:
    return example
  example = dict(example)
  for feature, field in zip(("inputs", "chosen", "rejected"), preferences.ID_FIELDS):
    example[feature] = tf.cast(example.pop(field), example[feature].dtype)
  return example


def _add_task(name: str, dataset_fn, to_features, feature_names: Sequence[str],
              vocabulary: Optional[seqio.Vocabulary], last: Sequence[Callable] = ()
              ) -> seqio.Task:
  vocabulary = vocabulary or tokenizer.get_vocabulary()
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)  # re-registration replaces (re-imports, experiments)
  return seqio.TaskRegistry.add(
      name,
      source=seqio.FunctionDataSource(dataset_fn, splits=SPLITS),
      preprocessors=[
          to_features,
          seqio.preprocessors.tokenize,
          seqio.CacheDatasetPlaceholder(),
          seqio.preprocessors.append_eos_after_trim,
          *last,
      ],
      output_features={f: seqio.Feature(vocabulary, add_eos=True) for f in feature_names},
      metric_fns=[])


def register_preference_pairs(name: str, directory: str,
                              vocabulary: Optional[seqio.Vocabulary] = None) -> seqio.Task:
  """A preference task over `<directory>/<split>.jsonl` files of PreferencePair records."""
  return _add_task(name, functools.partial(_preference_pairs_dataset, directory=directory,
                                           name=name),
                   preference_prompt, PREFERENCE_FEATURES, vocabulary, [use_sampled_ids])


def register_tasks(vocabulary: Optional[seqio.Vocabulary] = None, suffix: str = "") -> list[str]:
  """Registers deranj's tasks (names + `suffix`) with `vocabulary` (default: the shipped
  tokenizer); e.g. suffix '_t5' with T5's own SentencePiece model for a released T5."""
  summarization = {"xsum": _xsum_dataset, "tldr_sft": _tldr_sft_dataset,
                   "embedded_news": _embedded_news_dataset,
                   "synthetic_summ": _synthetic_dataset}
  preference = {"tldr_preferences": _tldr_preferences_dataset,
                "embedded_news_preferences": _embedded_news_preferences_dataset,
                "preference_pairs": _preference_pairs_dataset}
  for name, fn in summarization.items():
    _add_task(name + suffix, fn, summarize_prompt, SUMMARIZATION_FEATURES, vocabulary)
  for name, fn in preference.items():
    _add_task(name + suffix, fn, preference_prompt, PREFERENCE_FEATURES, vocabulary,
              [use_sampled_ids])
  return [n + suffix for n in (*summarization, *preference)]


TASK_NAMES = register_tasks()


def register_t5_tasks() -> list[str]:
  """With `t5_spm_model.path` bound: the tasks again under names ending in `_t5`
  (e.g. `xsum_t5`), tokenized with that model, as a released T5 checkpoint needs."""
  path = t5_spm_model()
  if not path:
    return []
  files.require_file(path, what="T5 SentencePiece model", setting="t5_spm_model.path")
  return register_tasks(seqio.SentencePieceVocabulary(path), suffix="_t5")
