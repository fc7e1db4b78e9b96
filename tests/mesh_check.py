"""Runs SFT steps and DeRa sampling on 8 forced CPU devices; prints one JSON line.

The device count is fixed when JAX starts, so `tests/test_partitioning.py` runs this
in a subprocess:

    JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        python tests/mesh_check.py

Each result compares a ("data", "model") mesh with one device running the same code.
"""
import functools
import json
import os
import sys
import time

# Before JAX is imported: the flag is read once, at backend start-up.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
import optax

from deranj import dera
from deranj import partitioning
from deranj.models import base
from deranj.models import build
from deranj.training import objectives
from deranj.training import optimizers
import tiny_models  # pylint: disable=g-bad-import-order  (tests/, this script's directory)

# Sharded sizes (vocab, heads, d_ff) are divisible by model=4. One layer: sharding rules
# are per layer, and compiling a second costs seconds.
SFT_CFG = build.T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_layers=1,
                      dropout_rate=0.0, feed_forward_proj="gated-gelu",
                      tie_word_embeddings=False)
# A T5 1.0-style reference: tied embedding, so `token_embedder` serves as the softmax too.
REF_CFG = build.T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_layers=1,
                      dropout_rate=0.0)
MESHES = {"1x1": (1, 1), "8x1": (8, 1), "2x4": (2, 4)}
BATCH, SRC_LEN, TGT_LEN, STEPS = 8, 8, 8, 5
QUERY = ("decoder", "layers_0", "self_attention", "query", "kernel")


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _batch(seed: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  enc = rng.integers(2, SFT_CFG.vocab_size, (BATCH, SRC_LEN)).astype(np.int32)
  tgt = rng.integers(2, SFT_CFG.vocab_size, (BATCH, TGT_LEN)).astype(np.int32)
  # Ragged rows: PAD tails in both, so masking is exercised under sharding too.
  lengths = rng.integers(3, SRC_LEN + 1, BATCH)
  enc[np.arange(SRC_LEN)[None, :] >= lengths[:, None]] = 0
  tgt[np.arange(TGT_LEN)[None, :] >= lengths[::-1, None]] = 0
  return {"prompts": enc, "responses": tgt}


@functools.lru_cache(maxsize=None)
def _host_params(cfg: build.T5Config, seed: int):
  # Drawn once with NumPy (flax's initialisers compile for seconds); every mesh then starts
  # from the very same host values.
  return tiny_models.random_params(base.EncoderDecoderModel(build.network(cfg)), seed)


def _partitioner(name: str) -> partitioning.Partitioner:
  data, model = MESHES[name]
  devices = jax.devices()[:data * model]
  return partitioning.Partitioner(partitioning.MeshConfig(data=data, model=model),
                                  devices=devices)


def _spec(array) -> list:
  return [None if a is None else str(a) for a in array.sharding.spec]


def sft(name: str) -> dict:
  """STEPS AdamW steps on one fixed batch; losses and where things were placed."""
  part = _partitioner(name)
  model = base.EncoderDecoderModel(build.network(SFT_CFG))
  axes = model.logical_axes()
  params = part.shard_params(_host_params(SFT_CFG, 0), axes)
  batch = part.shard_batch(_batch(0))
  # The trainer's own step: SFT objective, AdamW with clipping, TrainState.
  optimizer = optimizers.make_optimizer(optax.constant_schedule(1e-2), name="adamw",
                                        weight_decay=0.01, clip_norm=1.0)
  state = objectives.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                opt_state=jax.jit(optimizer.init)(params))
  step = jax.jit(functools.partial(objectives.SFT(model).train_step, optimizer=optimizer))

  losses = []
  for i in range(STEPS):
    state, metrics = step(state, {}, batch, jax.random.PRNGKey(i))
    losses.append(float(metrics["loss"]))
  params, opt_state = state.params, state.opt_state
  query = _get(params, QUERY)
  expected = _get(part.param_shardings(axes), QUERY)
  mu = _get(opt_state[1][0].mu, QUERY)  # chain(clip, adamw)
  tokens = batch["prompts"]
  return {
      "losses": losses,
      "query_spec": _spec(query),
      "query_shape": list(query.shape),
      "query_shard_shape": list(query.addressable_shards[0].data.shape),
      "query_sharding_kept": query.sharding.is_equivalent_to(expected, query.ndim),
      "mu_sharding_like_params": mu.sharding.is_equivalent_to(expected, mu.ndim),
      "embedding_spec": _spec(params["token_embedder"]["embedding"]),
      "batch_spec": _spec(tokens),
      "batch_shard_shape": list(tokens.addressable_shards[0].data.shape),
  }


def sample(name: str) -> dict:
  """Greedy DeRa at one lam per prompt, both models sharded by the same rules."""
  part = _partitioner(name)
  ref = base.EncoderDecoderModel(build.network(REF_CFG))
  aligned = base.EncoderDecoderModel(build.network(SFT_CFG))
  ref_params = part.shard_params(_host_params(REF_CFG, 1), ref.logical_axes())
  al_params = part.shard_params(_host_params(SFT_CFG, 2), aligned.logical_axes())
  realigner = dera.Realigner(ref, ref_params, aligned, al_params, max_decode_len=10)
  prompts = part.shard_batch({"p": _batch(1)["prompts"]})["p"]
  lam = np.linspace(0.0, 1.5, BATCH).astype(np.float32)
  out = realigner.sample(prompts, lam, jax.random.PRNGKey(3), temperature=0.0)
  return {
      "tokens": np.asarray(out.tokens).tolist(),
      "logp_ref": np.asarray(out.logp_ref).tolist(),
      "logp_aligned": np.asarray(out.logp_aligned).tolist(),
      "prompt_spec": _spec(prompts),
      "ref_embedding_spec": _spec(ref_params["token_embedder"]["embedding"]),
  }


def _error(fn) -> str:
  try:
    fn()
  except partitioning.PartitioningError as e:
    return str(e)
  return ""


def errors() -> dict:
  """Messages for a batch and parameters that do not fit an 8-device mesh."""
  part = partitioning.Partitioner(partitioning.MeshConfig(data=2, model=4))
  two_heads = base.EncoderDecoderModel(build.network(
      build.T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_heads=2, num_layers=1)))
  params = jax.eval_shape(two_heads.init_params, jax.random.PRNGKey(0))  # shapes suffice
  return {
      "batch": _error(lambda: part.shard_batch({"x": np.zeros((3, 4), np.int32)})),
      "params": _error(lambda: part.shard_params(params, two_heads.logical_axes())),
      "mesh": _error(lambda: partitioning.Partitioner(partitioning.MeshConfig(data=4, model=4))),
  }


def main():
  results = {"device_count": jax.device_count(), "sft": {}, "sample": {}, "seconds": {}}
  for name in MESHES:
    start = time.time()
    results["sft"][name] = sft(name)
    results["seconds"][f"sft_{name}"] = round(time.time() - start, 2)
  for name in ("1x1", "2x4"):
    start = time.time()
    results["sample"][name] = sample(name)
    results["seconds"][f"sample_{name}"] = round(time.time() - start, 2)
  results["errors"] = errors()
  print(json.dumps(results))


if __name__ == "__main__":
  main()
