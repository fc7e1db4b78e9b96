"""seqio tasks on small files in the real formats, and the deterministic pipeline."""
import json
import re

import gin
import numpy as np
import pytest
import seqio
import tensorflow_datasets as tfds

from deranj.data import files
from deranj.data import pipeline
from deranj.data import preferences
from deranj.data import tasks
from deranj.data import tokenizer

LENGTHS = {"inputs": 64, "targets": 16}
EOS = tokenizer.EOS_ID


@pytest.fixture
def bind():
  """Sets gin bindings for one test."""

  def _bind(name, value):
    with gin.unlock_config():
      gin.bind_parameter(name, value)

  yield _bind
  gin.clear_config()


def _write_jsonl(path, records):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return path


def _tldr_post(i, words=5):
  return {"id": f"t3_{i}", "subreddit": "relationships", "title": f"Title {i}",
          "post": " ".join(["word"] * words) + f" number {i}.", "summary": f" summary {i}"}


def _check_sequences(split, target_features):
  """Every sequence ends in EOS right before its padding and fits its length."""
  names = [("prompts", LENGTHS["inputs"])]
  names += [(f"{p}responses", LENGTHS["targets"]) for p in target_features]
  for name, length in names:
    tokens = split.features[name]
    assert tokens.shape == (len(split), length) and tokens.dtype == np.int32
    lengths = (tokens > 0).sum(axis=1)
    assert (lengths > 1).all()
    assert (tokens[np.arange(len(tokens)), lengths - 1] == EOS).all(), name
    assert ((tokens == EOS).sum(axis=1) == 1).all()  # one EOS, then only PAD
    for row, n in zip(tokens, lengths):
      assert (row[n:] == 0).all()


def test_registered_names():
  for name in ("xsum", "tldr_sft", "tldr_preferences", "embedded_news", "synthetic_summ",
               "preference_pairs"):
    assert name in seqio.TaskRegistry.names()
  assert set(tasks.TASK_NAMES) <= set(seqio.TaskRegistry.names())


def test_embedded_news_features():
  split = pipeline.load("embedded_news", "validation", LENGTHS)
  assert len(split) == 42
  assert set(split.features) == {"prompts", "responses", "loss_weights"}
  _check_sequences(split, [""])
  f = split.features
  np.testing.assert_array_equal(f["loss_weights"], f["responses"] > 0)
  assert all(t.startswith("summarize: ") for t in split.texts["inputs"])
  # Long documents are truncated (EOS kept); the text keeps the untruncated reference.
  assert (f["prompts"][:, -1] == EOS).any()
  first = tokenizer.encode(split.texts["targets"][0])
  n = min(len(first), LENGTHS["targets"] - 1)
  np.testing.assert_array_equal(f["responses"][0, :n], first[:n])


def test_synthetic_summ_sizes_and_lengths(bind):
  bind("synthetic_summ_settings.eval_examples", 30)
  split = pipeline.load("synthetic_summ", "test", {"inputs": 256, "targets": 64})
  assert len(split) == 30
  target_lengths = (split.features["responses"] > 0).sum(axis=1)
  assert target_lengths.max() < 64 and len(set(target_lengths)) >= 8  # untruncated, varied


def test_tldr_sft_task(tmp_path, bind):
  _write_jsonl(tmp_path / "train.jsonl", [_tldr_post(i, words=3 + 40 * i) for i in range(3)])
  _write_jsonl(tmp_path / "valid.jsonl", [_tldr_post(9)])  # OpenAI's name for validation
  bind("tldr_sft_dir.path", str(tmp_path))
  split = pipeline.load("tldr_sft", "train", LENGTHS)
  assert split.texts["inputs"][0] == (
      "summarize: SUBREDDIT: r/relationships\nTITLE: Title 0\nPOST: word word word number 0."
      "\nTL;DR:")
  assert split.texts["targets"] == ["summary 0", "summary 1", "summary 2"]
  _check_sequences(split, [""])
  assert split.features["prompts"][2, -1] == EOS  # 83-word post truncated
  assert len(pipeline.load("tldr_sft", "validation", LENGTHS)) == 1


def test_tldr_preferences_task(tmp_path, bind):
  openai = {"info": {"id": "t3_1", "subreddit": "pets", "title": "T", "post": "A post."},
            "summaries": [{"text": " the worse one"}, {"text": " the better one"}], "choice": 1}
  flat = {"subreddit": "pets", "title": "T2", "post": "Another.", "chosen": "yes",
          "rejected": "no"}
  _write_jsonl(tmp_path / "train.jsonl", [openai, flat])
  bind("tldr_preferences_dir.path", str(tmp_path))
  split = pipeline.load("tldr_preferences", "train", LENGTHS)
  assert split.texts["chosen"] == ["the better one", "yes"]
  assert split.texts["rejected"] == ["the worse one", "no"]
  _check_sequences(split, ["chosen_", "rejected_"])
  chosen, rejected = pipeline.preference_halves(split.features)
  assert set(chosen) == set(rejected) == {"prompts", *pipeline.RESPONSE_FEATURES}
  assert tokenizer.decode(chosen["responses"][0]) == "the better one"
  assert tokenizer.decode(rejected["responses"][0]) == "the worse one"


def test_preference_pairs_written_by_experiments(tmp_path, bind):
  pairs = [preferences.PreferencePair(f"document {i}", f"good {i}", f"bad {i}") for i in range(5)]
  preferences.write_pairs(str(tmp_path / "validation.jsonl"), pairs)
  bind("preference_pairs_dir.path", str(tmp_path))
  split = pipeline.load("preference_pairs", "validation", LENGTHS)
  assert split.texts["inputs"] == [f"summarize: document {i}" for i in range(5)]
  _check_sequences(split, ["chosen_", "rejected_"])
  tasks.register_preference_pairs("judge_pairs_test", str(tmp_path))
  other = pipeline.load("judge_pairs_test", "validation", LENGTHS, max_examples=2)
  assert other.texts["chosen"] == ["good 0", "good 1"]


def test_xsum_on_mock_data(tmp_path, bind):
  bind("xsum_data_dir.path", str(tmp_path))
  with tfds.testing.mock_data(num_examples=6):
    split = pipeline.load("xsum", "train", LENGTHS)
  assert len(split) == 6
  _check_sequences(split, [""])
  assert all(t.startswith("summarize: ") for t in split.texts["inputs"])


def test_missing_data_names_path_and_binding(tmp_path, bind):
  with pytest.raises(files.DataError, match=re.escape("tldr_sft_dir.path")):
    pipeline.load("tldr_sft", "train", LENGTHS)  # nothing configured
  missing = tmp_path / "not_there"
  bind("tldr_sft_dir.path", str(missing))
  with pytest.raises(files.DataError, match=re.escape(f"{str(missing)!r} does not exist")):
    pipeline.load("tldr_sft", "train", LENGTHS)
  bind("tldr_sft_dir.path", str(tmp_path))
  with pytest.raises(files.DataError, match=r"no test\.jsonl.*tldr_sft_dir\.path"):
    pipeline.load("tldr_sft", "test", LENGTHS)
  bind("xsum_data_dir.path", str(missing))
  with pytest.raises(files.DataError, match=re.escape("xsum_data_dir.path")):
    pipeline.load("xsum", "train", LENGTHS)
  bind("xsum_data_dir.path", str(tmp_path))  # exists, but xsum is not prepared there
  manual = tmp_path / "downloads" / "manual" / tasks.XSUM_MANUAL_FILE
  with pytest.raises(files.DataError, match=re.escape(str(manual))):
    pipeline.load("xsum", "validation", LENGTHS)


def test_bad_files_name_file_and_line(tmp_path, bind):
  bind("tldr_sft_dir.path", str(tmp_path))
  empty = tmp_path / "train.jsonl"
  empty.write_text("")
  with pytest.raises(files.DataError, match=re.escape(f"{empty}: the file is empty")):
    pipeline.load("tldr_sft", "train", LENGTHS)
  record = _tldr_post(2)
  del record["title"]
  _write_jsonl(empty, [_tldr_post(1), record])
  with pytest.raises(files.DataError, match=re.escape(f"{empty}:2: record has no field 'title'")):
    pipeline.load("tldr_sft", "train", LENGTHS)


# ----------------------------------------------------------------------------- batches


def _toy_features(n=10):
  rows = np.arange(n, dtype=np.int32)[:, None]
  return {"prompts": np.repeat(rows, 3, axis=1), "responses": rows + 100}


def test_resumed_stream_sees_the_same_batches():
  features = _toy_features()
  uninterrupted = pipeline.BatchStream(features, batch_size=4, seed=3).iterate()
  expected = [next(uninterrupted) for _ in range(12)]
  resumed = pipeline.BatchStream(features, batch_size=4, seed=3).iterate(start_step=7)
  for step in range(7, 12):
    got = next(resumed)
    for key in features:
      np.testing.assert_array_equal(got[key], expected[step][key])
  other_seed = pipeline.BatchStream(features, batch_size=4, seed=4)
  assert not all(np.array_equal(other_seed.batch_at(s)["responses"],
                                expected[s]["responses"]) for s in range(3))


def test_stream_visits_every_example_once_per_epoch():
  stream = pipeline.BatchStream(_toy_features(10), batch_size=4, seed=0)
  rows = np.concatenate([stream.indices_at(s) for s in range(5)])  # 20 positions = 2 epochs
  assert sorted(rows[:10]) == list(range(10)) and sorted(rows[10:]) == list(range(10))
  assert list(rows[:10]) != list(rows[10:])  # a new order each epoch
  batch = stream.batch_at(1)
  np.testing.assert_array_equal(batch["responses"][:, 0],
                                batch["prompts"][:, 0] + 100)  # rows stay aligned


def test_eval_batches_cover_in_order():
  batches = list(pipeline.eval_batches(_toy_features(10), 4))
  assert [len(b["prompts"]) for b in batches] == [4, 4, 2]
  np.testing.assert_array_equal(np.concatenate([b["prompts"][:, 0] for b in batches]),
                                np.arange(10))


def test_stream_on_a_real_task_is_reproducible():
  split = pipeline.load("embedded_news", "test", LENGTHS)
  again = pipeline.load("embedded_news", "test", LENGTHS, keep_texts=False)
  assert not again.texts and len(split.texts["targets"]) == len(again) == 41
  for key in split.features:
    np.testing.assert_array_equal(split.features[key], again.features[key])
  a = pipeline.BatchStream(split.features, 8, seed=1).batch_at(11)
  b = pipeline.BatchStream(again.features, 8, seed=1).batch_at(11)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
