"""Mesh and logical-axis rules: placement, agreement with one device, error messages.

Multi-device checks run `tests/mesh_check.py` once in a subprocess with 8 forced CPU
devices (the count is fixed when JAX starts), started in the background at collection
(the `mesh_results` fixture, conftest.py); the rest runs here on one device.
"""
import gin
import jax
import numpy as np
import pytest

from deranj import partitioning
from deranj.models import base
from deranj.models import build

P = jax.sharding.PartitionSpec
CFG = build.T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_layers=1,
                  dropout_rate=0.0, feed_forward_proj="gated-gelu", tie_word_embeddings=False)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12))


def _padded(spec, ndim):
  return spec + [None] * (ndim - len(spec))


# ----------------------------------------------------------------------------- 8 devices


@pytest.mark.parametrize("mesh", ["8x1", "2x4"])
def test_sft_losses_match_one_device(mesh_results, mesh):
  one = mesh_results["sft"]["1x1"]["losses"]
  many = mesh_results["sft"][mesh]["losses"]
  assert len(many) == 5 and one[-1] < one[0]  # it trains
  assert _rel(many, one) <= 1e-5, (many, one)


def test_params_batch_and_optimizer_state_are_sharded(mesh_results):
  out = mesh_results["sft"]["2x4"]
  assert _padded(out["query_spec"], 3) == [None, "model", None]  # [embed, heads, kv]
  assert out["query_shard_shape"] == [32, 1, 8] and out["query_shape"] == [32, 4, 8]
  assert _padded(out["embedding_spec"], 2) == ["model", None]  # [vocab, embed]
  assert out["query_sharding_kept"] and out["mu_sharding_like_params"]
  assert out["batch_spec"] == ["data"] and out["batch_shard_shape"] == [4, 8]
  # Pure data parallelism: parameters replicated, batch in 8 pieces.
  dp = mesh_results["sft"]["8x1"]
  assert dp["query_shard_shape"] == dp["query_shape"]
  assert dp["batch_shard_shape"] == [1, 8]


def test_dera_greedy_matches_one_device(mesh_results):
  one, many = mesh_results["sample"]["1x1"], mesh_results["sample"]["2x4"]
  assert many["prompt_spec"] == ["data"]
  assert _padded(many["ref_embedding_spec"], 2) == ["model", None]
  np.testing.assert_array_equal(many["tokens"], one["tokens"])
  for key in ("logp_ref", "logp_aligned"):
    assert _rel(many[key], one[key]) <= 1e-5, key


def test_errors_on_eight_devices(mesh_results):
  errors = mesh_results["errors"]
  assert "batch size 3" in errors["batch"] and "data-axis size 2" in errors["batch"]
  assert "MeshConfig.data" in errors["batch"]
  assert "'heads'" in errors["params"] and "MeshConfig.model" in errors["params"]
  assert "attention/key/kernel" in errors["params"]
  assert "16 devices, but there are 8" in errors["mesh"]


# ----------------------------------------------------------------------------- 1 device


def test_rules_map_t5_logical_axes():
  specs = partitioning.Partitioner().param_specs(
      base.EncoderDecoderModel(build.network(CFG)).logical_axes())
  layer = specs["decoder"]["layers_0"]
  assert specs["token_embedder"]["embedding"] == P("model", None)
  assert specs["decoder"]["logits_dense"]["kernel"] == P(None, "model")
  assert layer["self_attention"]["query"]["kernel"] == P(None, "model", None)
  assert layer["self_attention"]["out"]["kernel"] == P("model", None, None)
  assert layer["mlp"]["wi_0"]["kernel"] == P(None, "model")
  assert layer["mlp"]["wo"]["kernel"] == P("model", None)
  assert layer["pre_mlp_layer_norm"]["scale"] == P(None)
  assert specs["decoder"]["relpos_bias"]["rel_embedding"] == P("model", None)
  assert dict(partitioning.DEFAULT_RULES)["batch"] == "data"


def test_one_device_mesh():
  part = partitioning.Partitioner()
  assert dict(part.mesh.shape) == {"data": 1, "model": 1}
  model = base.EncoderDecoderModel(build.network(CFG))
  # Host arrays of the right shapes: placement needs no initialiser (slow to compile).
  shapes = jax.eval_shape(model.init_params, jax.random.PRNGKey(0))
  params = part.shard_params(jax.tree_util.tree_map(lambda s: np.ones(s.shape, s.dtype), shapes),
                             model.logical_axes())
  emb = params["token_embedder"]["embedding"]
  assert emb.sharding.spec == P("model", None) and emb.addressable_shards[0].data.shape == (
      128, 32)
  batch = part.shard_batch({"x": np.ones((3, 5), np.int32)})
  assert batch["x"].sharding == part.batch_sharding() and batch["x"].shape == (3, 5)
  assert part.replicated.spec == P()


def test_mesh_shape_and_errors():
  assert partitioning.MeshConfig(model=2).mesh_shape(8) == (4, 2)
  assert partitioning.MeshConfig(data=2, model=4).mesh_shape(8) == (2, 4)
  assert issubclass(partitioning.PartitioningError, ValueError)
  with pytest.raises(partitioning.PartitioningError, match=r"MeshConfig.model=3 does not divide"):
    partitioning.MeshConfig(model=3).mesh_shape(8)
  with pytest.raises(partitioning.PartitioningError, match=r"data=2 x model=1 = 2 devices"):
    partitioning.Partitioner(partitioning.MeshConfig(data=2))
  with pytest.raises(partitioning.PartitioningError, match=r"MeshConfig.data=0"):
    partitioning.MeshConfig(data=0).mesh_shape(8)
  with pytest.raises(partitioning.PartitioningError, match=r"MeshConfig.model=0"):
    partitioning.MeshConfig(model=0).mesh_shape(8)


def test_unknown_logical_axis_and_scalar_batch():
  part = partitioning.Partitioner()
  with pytest.raises(partitioning.PartitioningError, match=r"a/b.*'hiddn'.*no rule"):
    part.param_shardings({"a": {"b": P("embed", "hiddn")}})
  with pytest.raises(partitioning.PartitioningError, match=r"leading batch dimension"):
    part.shard_batch({"step": np.int32(3)})


def test_gin_bindings_reach_default_config():
  try:
    with gin.unlock_config():
      gin.bind_parameter("MeshConfig.model", 1)
      gin.bind_parameter("MeshConfig.data", 1)
    assert partitioning.Partitioner().config == partitioning.MeshConfig(data=1, model=1)
    with gin.unlock_config():
      gin.bind_parameter("MeshConfig.data", 2)
    with pytest.raises(partitioning.PartitioningError, match="MeshConfig.data"):
      partitioning.Partitioner()
  finally:
    gin.clear_config()
