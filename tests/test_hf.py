"""Parity with transformers' PyTorch T5, and the safetensors loader's errors."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from deranj.models import base  # noqa: E402
from deranj.models import hf  # noqa: E402
from deranj.models import t5  # noqa: E402
from numerics import assert_close_f32  # noqa: E402

CONFIGS = {
    "t5_1_0": dict(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_heads=4, num_layers=2,
                   feed_forward_proj="relu", tie_word_embeddings=True),
    "t5_1_1": dict(vocab_size=96, d_model=32, d_kv=8, d_ff=40, num_heads=4, num_layers=2,
                   feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    "odd_shapes": dict(vocab_size=101, d_model=24, d_kv=5, d_ff=36, num_heads=3, num_layers=2,
                       num_decoder_layers=3, relative_attention_num_buckets=16,
                       relative_attention_max_distance=20, feed_forward_proj="gated-gelu",
                       tie_word_embeddings=False),
}


def _hf_model(kwargs, seed=0):
  torch.manual_seed(seed)
  model = transformers.T5ForConditionalGeneration(
      transformers.T5Config(dropout_rate=0.0, decoder_start_token_id=0, **kwargs)).eval()
  with torch.no_grad():  # norm scales are initialised to 1: give them values to map
    for name, p in model.named_parameters():
      if "layer_norm" in name:
        p.mul_(1.0 + 0.2 * torch.randn_like(p))
  return model


def _inputs(vocab, seed=0):
  rng = np.random.default_rng(seed)
  enc = rng.integers(2, vocab, size=(3, 31))
  enc[1, 20:] = 0
  enc[2, 6:] = 0
  dec = rng.integers(2, vocab, size=(3, 25))
  dec[:, 0] = 0
  return enc, dec


def _hf_logits(model, enc, dec):
  with torch.no_grad():
    out = model(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc != 0),
                decoder_input_ids=torch.tensor(dec))
  return out.logits.numpy()


def _assert_logits_match(ours, theirs, config):
  """Two float32 implementations of one network: they differ by rounding, which grows with
  the widest contraction (d_ff) and the size of the logits."""
  assert_close_f32(ours, theirs, config["d_ff"], np.abs(theirs).max())


def _ours(directory, enc, dec):
  config, params = hf.load_t5(directory)
  # Compiled: op by op, each small op of the network compiles on its own.
  logits = jax.jit(t5.Transformer(config).apply)({"params": params}, jnp.asarray(enc),
                                                 jnp.asarray(dec))
  return config, params, np.asarray(logits)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_transformers(name, tmp_path):
  model = _hf_model(CONFIGS[name])
  model.save_pretrained(tmp_path)
  enc, dec = _inputs(CONFIGS[name]["vocab_size"])
  config, _, ours = _ours(str(tmp_path), enc, dec)
  assert config.num_heads == CONFIGS[name]["num_heads"]
  theirs = _hf_logits(model, enc, dec)
  assert ours.shape == theirs.shape
  _assert_logits_match(ours, theirs, CONFIGS[name])


def test_sharded_checkpoint(tmp_path):
  model = _hf_model(CONFIGS["t5_1_0"], seed=1)
  model.save_pretrained(tmp_path, max_shard_size="20KB")
  assert os.path.exists(tmp_path / "model.safetensors.index.json")
  enc, dec = _inputs(64, seed=1)
  _, _, ours = _ours(str(tmp_path), enc, dec)
  _assert_logits_match(ours, _hf_logits(model, enc, dec), CONFIGS["t5_1_0"])


def test_separate_lm_head_as_in_t5_1_1_releases(tmp_path):
  """Released T5 1.1 checkpoints store lm_head.weight and `tie_word_embeddings: false`."""
  from safetensors.numpy import load_file, save_file
  model = _hf_model(CONFIGS["t5_1_1"], seed=2)
  model.save_pretrained(tmp_path)
  tensors = load_file(tmp_path / "model.safetensors")
  head = np.random.default_rng(0).normal(size=tensors["shared.weight"].shape).astype(np.float32)
  tensors["lm_head.weight"] = head
  save_file(tensors, tmp_path / "model.safetensors")
  cfg = json.loads((tmp_path / "config.json").read_text())
  cfg.pop("scale_decoder_outputs", None)
  cfg["tie_word_embeddings"] = False
  (tmp_path / "config.json").write_text(json.dumps(cfg))

  enc, dec = _inputs(96, seed=2)
  config, params, ours = _ours(str(tmp_path), enc, dec)
  assert not config.tie_word_embeddings
  np.testing.assert_array_equal(params["decoder"]["logits_dense"]["kernel"], head.T)
  # Reference: transformers' decoder states through the untied head.
  with torch.no_grad():
    out = model(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc != 0),
                decoder_input_ids=torch.tensor(dec), output_hidden_states=True)
  theirs = out.decoder_hidden_states[-1].numpy() @ head.T
  _assert_logits_match(ours, theirs, CONFIGS["t5_1_1"])


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("buckets,max_distance", [(32, 128), (16, 20), (8, 64)])
def test_relative_position_buckets_match(bidirectional, buckets, max_distance):
  from transformers.models.t5.modeling_t5 import T5Attention
  rel = np.arange(-400, 401)
  theirs = T5Attention._relative_position_bucket(
      torch.tensor(rel), bidirectional=bidirectional, num_buckets=buckets,
      max_distance=max_distance).numpy()
  ours = t5.relative_position_bucket(jnp.asarray(rel), bidirectional=bidirectional,
                                     num_buckets=buckets, max_distance=max_distance)
  np.testing.assert_array_equal(np.asarray(ours), theirs)


def test_loaded_model_scores_like_transformers(tmp_path):
  model = _hf_model(CONFIGS["t5_1_1"], seed=3)
  model.save_pretrained(tmp_path)
  config, params = hf.load_t5(str(tmp_path))
  ours = base.EncoderDecoderModel(t5.Transformer(config))
  enc = np.array([[5, 6, 7, 1, 0], [8, 1, 0, 0, 0]])
  targets = np.array([[9, 10, 1, 0], [11, 12, 13, 1]])
  batch = {"prompts": jnp.asarray(enc), "responses": jnp.asarray(targets)}
  with torch.no_grad():
    out = model(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc != 0),
                labels=torch.tensor(np.where(targets > 0, targets, -100)))
  n = (targets > 0).sum()
  # A sum of n log-probabilities (all < 0): relative rounding of n softmaxes over V.
  assert_close_f32(float(jax.jit(ours.score_batch)(params, batch).sum()), -float(out.loss) * n,
                   CONFIGS["t5_1_1"]["vocab_size"])


# --------------------------------------------------------------------------- errors


def test_pickle_only_directory_is_refused(tmp_path, monkeypatch):
  (tmp_path / "config.json").write_text(json.dumps(CONFIGS["t5_1_0"]))
  (tmp_path / "pytorch_model.bin").write_bytes(b"not to be unpickled")
  import pickle
  monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("unpickled"))
  with pytest.raises(hf.CheckpointError, match="pickle.*safetensors"):
    hf.load_t5(str(tmp_path))


def test_missing_config_and_corrupt_weights(tmp_path):
  with pytest.raises(hf.CheckpointError, match="config.json"):
    hf.load_t5(str(tmp_path))
  (tmp_path / "config.json").write_text(json.dumps(CONFIGS["t5_1_0"]))
  (tmp_path / "model.safetensors").write_bytes(b"garbage")
  with pytest.raises(hf.CheckpointError, match="model.safetensors"):
    hf.load_t5(str(tmp_path))
  with pytest.raises(hf.CheckpointError, match="not a directory"):
    hf.load_t5(str(tmp_path / "nope"))


def test_shape_mismatch_names_the_tensor(tmp_path):
  _hf_model(CONFIGS["t5_1_0"]).save_pretrained(tmp_path)
  cfg = json.loads((tmp_path / "config.json").read_text())
  cfg["d_ff"] = 50
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(hf.CheckpointError, match="DenseReluDense.wi.weight.*shape"):
    hf.load_t5(str(tmp_path))
