"""Embedded corpora, synthetic generator, record files and the tokenizer (no TensorFlow)."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from deranj.data import corpora
from deranj.data import files
from deranj.data import preferences
from deranj.data import synthetic
from deranj.data import tldr
from deranj.data import tokenizer


# ----------------------------------------------------------------------------- corpora


def test_news_splits_are_fixed_and_disjoint():
  pairs = {s: corpora.news_pairs(s) for s in corpora.SPLITS}
  # Pinned: gensim==4.4.0's files and the sha256 split; a change here changes the data.
  assert {s: len(p) for s, p in pairs.items()} == {"train": 349, "validation": 42, "test": 41}
  sources = {s: {p.source for p in ps} for s, ps in pairs.items()}
  documents = {s: {p.document for p in ps} for s, ps in pairs.items()}
  for a, b in [("train", "validation"), ("train", "test"), ("validation", "test")]:
    assert not sources[a] & sources[b]
    assert not documents[a] & documents[b]
  assert {p.source.split(":")[0] for p in pairs["train"]} == {
      "lee_background.cor", "lee.cor", "enwiki"}
  # Whole articles (the pretraining text) follow the same split as their pairs.
  for split in corpora.SPLITS:
    article_sources = {a.source for a in corpora.articles(split)}
    assert sources[split] <= article_sources
  assert corpora.news_pairs("validation") == pairs["validation"]  # stable order


def test_pairs_take_the_lead_sentence_as_summary():
  for pair in corpora.news_pairs("validation"):
    assert pair.summary and pair.summary not in pair.document
    assert corpora.MIN_SUMMARY_WORDS <= len(pair.summary.split()) <= corpora.MAX_SUMMARY_WORDS
    assert len(pair.document.split()) >= corpora.MIN_DOCUMENT_WORDS
    assert "'''" not in pair.document and "[[" not in pair.document
  wiki = [p for p in corpora.news_pairs("train") if p.source == "enwiki:Abraham Lincoln"]
  assert len(wiki) == 1 and wiki[0].summary.startswith("Abraham Lincoln (February 12, 1809")


def test_split_sentences_respects_abbreviations():
  text = ("Mr. Smith met Dr. Jones in the U.S. capital on Monday. John F. Kennedy was "
          "mentioned. Prices rose 3.5 per cent! Was it \"fair?\" Nobody knows.")
  assert corpora.split_sentences(text) == [
      "Mr. Smith met Dr. Jones in the U.S. capital on Monday.",
      "John F. Kennedy was mentioned.", "Prices rose 3.5 per cent!", "Was it \"fair?\"",
      "Nobody knows."]


def test_split_rejects_unknown_names():
  with pytest.raises(ValueError, match="split='dev'"):
    corpora.news_pairs("dev")


# ----------------------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_per_seed_and_split():
  a = synthetic.examples(50, seed=7)
  assert a == synthetic.examples(50, seed=7)
  assert synthetic.example(31, seed=7) == a[31]  # random access agrees with the sequence
  assert a != synthetic.examples(50, seed=8)
  assert not {e.document for e in a} & {e.document for e in synthetic.examples(50, 7, "test")}


def test_synthetic_summaries_vary_in_length_and_are_grounded():
  examples = synthetic.examples(300, seed=0)
  lengths = np.array([len(e.summary.split()) for e in examples])
  assert lengths.min() <= 10 and lengths.max() >= 25 and len(set(lengths)) >= 10
  assert len({len(e.document.split()) for e in examples}) >= 30
  for e in examples:
    assert e.summary.endswith(".") and not e.summary[0].islower()
    # Every number the summary states is in the document.
    for number in re.findall(r"\d+", e.summary):
      assert number in e.document, (e.summary, e.document)


# ----------------------------------------------------------------------------- records


def test_preference_pairs_round_trip(tmp_path):
  pairs = [preferences.PreferencePair("doc one", "good", "bad"),
           preferences.PreferencePair("doc \"two\"\nline", "ünïcode", "")]
  path = str(tmp_path / "sub" / "train.jsonl")
  assert preferences.write_pairs(path, pairs) == 2
  assert preferences.read_pairs(path) == pairs
  assert [p.name for p in (tmp_path / "sub").iterdir()] == ["train.jsonl"]  # no temp left


def test_jsonl_errors_name_file_and_line(tmp_path):
  missing = tmp_path / "nope.jsonl"
  with pytest.raises(files.DataError, match=re.escape(str(missing))):
    preferences.read_pairs(str(missing))
  empty = tmp_path / "empty.jsonl"
  empty.write_text("\n  \n")
  with pytest.raises(files.DataError, match=re.escape(f"{empty}: the file is empty")):
    preferences.read_pairs(str(empty))
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"}) + "\n\n" +
                 json.dumps({"prompt": "p", "chosen": "c"}) + "\n")
  with pytest.raises(files.DataError, match=re.escape(f"{bad}:3: record has no field 'rejected'")):
    preferences.read_pairs(str(bad))
  bad.write_text("{not json\n")
  with pytest.raises(files.DataError, match=re.escape(f"{bad}:1: not valid JSON")):
    preferences.read_pairs(str(bad))
  bad.write_text(json.dumps({"prompt": 3, "chosen": "c", "rejected": "r"}) + "\n")
  with pytest.raises(files.DataError, match="'prompt' should be a str"):
    preferences.read_pairs(str(bad))


def test_tldr_prompt_and_readers(tmp_path):
  assert tldr.format_prompt("AskReddit", "A title", "The post.") == (
      "SUBREDDIT: r/AskReddit\nTITLE: A title\nPOST: The post.\nTL;DR:")
  sft = tmp_path / "train.jsonl"
  sft.write_text(json.dumps({"id": "t3_1", "subreddit": "cats", "title": "T", "post": "P",
                             "summary": " my cat is fine"}) + "\n")
  [example] = tldr.read_sft(str(sft))
  assert example.document == "SUBREDDIT: r/cats\nTITLE: T\nPOST: P\nTL;DR:"
  assert example.summary == "my cat is fine" and example.source == f"{sft}:1"

  comparisons = tmp_path / "comparisons.jsonl"
  openai = {"info": {"id": "t3_2", "subreddit": "dogs", "title": "T2", "post": "P2"},
            "summaries": [{"text": " first", "policy": "a"}, {"text": " second", "policy": "b"}],
            "choice": 1, "worker": "w"}
  flat = {"subreddit": "dogs", "title": "T3", "post": "P3", "chosen": "yes", "rejected": "no"}
  formatted = {"prompt": "SUBREDDIT: r/x\nTITLE: t\nPOST: p\nTL;DR:", "chosen": " a",
               "rejected": " b"}
  comparisons.write_text("".join(json.dumps(r) + "\n" for r in (openai, flat, formatted)))
  pairs = tldr.read_comparisons(str(comparisons))
  assert pairs[2] == preferences.PreferencePair(formatted["prompt"], "a", "b")
  assert pairs[0] == preferences.PreferencePair(
      "SUBREDDIT: r/dogs\nTITLE: T2\nPOST: P2\nTL;DR:", "second", "first")
  assert pairs[1].chosen == "yes" and pairs[1].rejected == "no"

  del openai["info"]["post"]
  comparisons.write_text(json.dumps(flat) + "\n" + json.dumps(openai) + "\n")
  message = f"{comparisons}:2: record has no field 'info.post'"
  with pytest.raises(files.DataError, match=re.escape(message)):
    tldr.read_comparisons(str(comparisons))
  sft.write_text(json.dumps({"subreddit": "cats", "title": "T", "post": "P"}) + "\n")
  with pytest.raises(files.DataError, match=re.escape(f"{sft}:1: record has no field 'summary'")):
    tldr.read_sft(str(sft))


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_follows_t5_conventions():
  sp = tokenizer.processor()
  assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)
  assert tokenizer.vocab_size() == 4096
  assert sp.id_to_piece(tokenizer.sentinel_id(0)) == "▁<extra_id_0>"
  assert tokenizer.sentinel_id(0) == 4095
  assert sp.id_to_piece(tokenizer.sentinel_id(tokenizer.NUM_SENTINELS - 1)) == "▁<extra_id_95>"
  text = "The Prime Minister said 4,000 jobs would go at <extra_id_0> the plant."
  ids = tokenizer.encode(text)
  assert 4095 in ids and 0 not in ids and 1 not in ids
  assert tokenizer.decode(ids) == text
  assert tokenizer.decode(ids + [1, 57, 0]) == text  # stops at EOS
  assert len(ids) < len(text) / 2  # a real subword vocabulary, not characters


def test_corpora_and_tokenizer_import_without_tensorflow():
  code = ("import sys; import deranj.data.corpora, deranj.data.tokenizer, deranj.data.synthetic, "
          "deranj.data.preferences, deranj.data.tldr, deranj.data.span_corruption; "
          "deranj.data.tokenizer.encode('hello'); "
          "bad = [m for m in ('tensorflow', 'seqio', 'jax', 'deranj.models') if m in sys.modules]; "
          "print(bad); sys.exit(1 if bad else 0)")
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=repo)
  assert result.returncode == 0, result.stdout + result.stderr
