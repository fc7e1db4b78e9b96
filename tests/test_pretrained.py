"""The tiny pretrained T5 that deranj ships: it loads, and it learned something."""
import shutil

import jax
import numpy as np
import pytest

from deranj.data import corpora
from deranj.data import span_corruption
from deranj.data import tokenizer
from deranj.models import base
from deranj.models import build
from deranj.models import pretrained


def test_tiny_t5_loads_and_beats_a_unigram_model_on_held_out_text():
  config, params = pretrained.load_tiny_t5()
  meta = pretrained.tiny_t5_metadata()
  assert config.vocab_size == tokenizer.vocab_size()
  assert config.feed_forward_proj == "gated-gelu" and not config.tie_word_embeddings
  num_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
  assert num_params == meta["num_params"] and 1e6 < num_params < 4e6
  record = meta["pretraining"]
  assert record["validation_loss"] < record["unigram_baseline_loss"] - 0.5

  # Validation prose (never trained on), corrupted with a seed pretraining did not use.
  inputs_length = record["inputs_length"]
  tokens_length, targets_length = span_corruption.random_spans_helper(inputs_length)
  chunks = span_corruption.chunk_documents(
      [tokenizer.encode(t) for t in corpora.prose("validation")], tokens_length)
  stream = span_corruption.SpanCorruptionBatches(chunks, 32, inputs_length, targets_length,
                                                 config.vocab_size, seed=777)
  model = base.EncoderDecoderModel(build.network(config))
  batches = [stream.batch_at(i) for i in range(2)]
  loss_fn = jax.jit(model.loss_fn)
  loss = np.mean([float(loss_fn(params, b)[0]) for b in batches])
  # The unigram distribution of these very targets: a baseline fitted to the test data.
  targets = np.concatenate([b["responses"][b["loss_weights"] > 0]
                            for b in batches])
  p = np.bincount(targets) / len(targets)
  in_sample_unigram = -np.sum(p[p > 0] * np.log(p[p > 0]))
  assert loss < in_sample_unigram - 0.3, (loss, in_sample_unigram)
  assert abs(loss - record["validation_loss"]) < 0.5


def test_tiny_t5_refuses_another_tokenizer(tmp_path, monkeypatch):
  other = tmp_path / "spm.model"
  shutil.copy(tokenizer.model_path(), other)
  with open(other, "ab") as f:
    f.write(b"\0")
  monkeypatch.setattr(tokenizer, "MODEL_PATH", str(other))
  with pytest.raises(pretrained.PretrainedError, match="pretrain_tiny.sh"):
    pretrained.load_tiny_t5()
