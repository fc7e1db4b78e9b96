"""Import Hugging Face T5 checkpoints (safetensors only) into deranj's parameters.

Reads `config.json` plus `model.safetensors`, or shards listed in
`model.safetensors.index.json`. T5 1.0, T5 1.1 and FLAN-T5 names are handled. Weights
stored only as pickle (`pytorch_model.bin`) are refused: nothing is ever unpickled.

Two conventions for the output head exist in the wild:
  * T5 1.0: head tied to `shared`, decoder output scaled by d_model**-0.5;
  * T5 1.1 / FLAN-T5: a separate `lm_head.weight`, no scaling. Checkpoints written by
    transformers 5 drop `lm_head.weight` (they tie it) and record
    `scale_decoder_outputs: false` instead.
Tied-and-scaled maps to `tie_word_embeddings=True`; everything else maps to an untied
`logits_dense` kernel, so logits are exact in every case.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax.numpy as jnp
import numpy as np

from deranj.models import t5

_CONFIG_FIELDS = ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "num_layers",
                  "num_decoder_layers", "relative_attention_num_buckets",
                  "relative_attention_max_distance", "dropout_rate", "layer_norm_epsilon",
                  "feed_forward_proj")


class CheckpointError(ValueError):
  """A checkpoint that is missing, empty or unreadable (a Hugging Face directory here; a
  training checkpoint or INIT_CHECKPOINT in `deranj.training.checkpoints`, which
  re-exports this class); the message names the path."""


def _read_config(directory: str) -> dict[str, Any]:
  path = os.path.join(directory, "config.json")
  if not os.path.isfile(path):
    raise CheckpointError(f"{path} not found: a Hugging Face T5 directory needs config.json.")
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path} is not valid JSON: {e}") from None


def _weight_files(directory: str) -> list[str]:
  single = os.path.join(directory, "model.safetensors")
  index = os.path.join(directory, "model.safetensors.index.json")
  if os.path.isfile(single):
    return [single]
  if os.path.isfile(index):
    with open(index) as f:
      weight_map = json.load(f).get("weight_map")
    if not weight_map:
      raise CheckpointError(f"{index} has no 'weight_map'.")
    files = sorted(set(weight_map.values()))
    missing = [n for n in files if not os.path.isfile(os.path.join(directory, n))]
    if missing:
      raise CheckpointError(f"{index} names shards that are not in {directory}: {missing}")
    return [os.path.join(directory, n) for n in files]
  pickles = [n for n in os.listdir(directory) if n.endswith((".bin", ".pt", ".pth", ".ckpt"))]
  if pickles:
    raise CheckpointError(
        f"{directory} holds only pickle weights ({', '.join(sorted(pickles))}); deranj never "
        "unpickles. Convert them to safetensors first, e.g. with transformers: "
        "T5ForConditionalGeneration.from_pretrained(dir).save_pretrained(dir, "
        "safe_serialization=True).")
  raise CheckpointError(f"{directory} has no model.safetensors nor model.safetensors.index.json.")


def _read_tensors(files: list[str]) -> dict[str, np.ndarray]:
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  tensors = {}
  for path in files:
    try:
      # The flax reader keeps bfloat16, which plain numpy cannot represent.
      with safe_open(path, framework="flax") as f:
        for name in f.keys():
          tensors[name] = np.asarray(f.get_tensor(name).astype(jnp.float32))
    except Exception as e:  # safetensors raises its own error types
      raise CheckpointError(f"cannot read {path} as safetensors: {e}") from None
  return tensors


def config_from_hf(hf: dict[str, Any], *, has_lm_head: bool, **overrides) -> t5.T5Config:
  """Our T5Config from a Hugging Face config dict."""
  kwargs = {k: hf[k] for k in _CONFIG_FIELDS if hf.get(k) is not None}
  tied = hf.get("tie_word_embeddings", True)
  scaled = hf.get("scale_decoder_outputs", tied)
  kwargs["tie_word_embeddings"] = bool(scaled and not has_lm_head)
  kwargs.update(overrides)
  return t5.T5Config(**kwargs)


def load_t5(directory: str, **config_overrides) -> tuple[t5.T5Config, dict]:
  """Reads a Hugging Face T5 directory into (T5Config, params).

  `config_overrides` set T5Config fields not in the checkpoint (dtype, param_dtype,
  dropout_rate, ...).
  """
  if not os.path.isdir(directory):
    raise CheckpointError(f"{directory} is not a directory.")
  hf = _read_config(directory)
  tensors = _read_tensors(_weight_files(directory))
  has_lm_head = "lm_head.weight" in tensors
  config = config_from_hf(hf, has_lm_head=has_lm_head, **config_overrides)
  params = _convert(tensors, config, hf, directory)
  dtype = config.param_dtype
  return config, _tree_map(lambda x: jnp.asarray(x, dtype), params)


def _tree_map(fn, tree):
  return {k: _tree_map(fn, v) if isinstance(v, dict) else fn(v) for k, v in tree.items()}


def _convert(tensors: dict[str, np.ndarray], cfg: t5.T5Config, hf: dict, directory: str) -> dict:
  used = set()

  def take(name: str, shape: tuple[int, ...]) -> np.ndarray:
    if name not in tensors:
      raise CheckpointError(f"{directory}: tensor {name!r} is missing.")
    x = tensors[name]
    if x.shape != shape:
      raise CheckpointError(
          f"{directory}: {name!r} has shape {x.shape}, but config.json implies {shape}.")
    used.add(name)
    return x

  d, h, k, f = cfg.d_model, cfg.num_heads, cfg.d_kv, cfg.d_ff

  def attention(prefix: str) -> dict:
    def qkv(n):  # HF [H*K, D] -> [D, H, K]
      return {"kernel": take(f"{prefix}.{n}.weight", (h * k, d)).T.reshape(d, h, k)}
    return {"query": qkv("q"), "key": qkv("k"), "value": qkv("v"),
            "out": {"kernel": take(f"{prefix}.o.weight", (d, h * k)).T.reshape(h, k, d)}}

  def mlp(prefix: str) -> dict:
    names = ("wi_0", "wi_1") if cfg.is_gated else ("wi",)
    out = {n: {"kernel": take(f"{prefix}.{n}.weight", (f, d)).T} for n in names}
    out["wo"] = {"kernel": take(f"{prefix}.wo.weight", (d, f)).T}
    return out

  def norm(name: str) -> dict:
    return {"scale": take(name, (d,))}

  def relpos(stack: str) -> dict:
    name = f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    return {"rel_embedding": take(name, (cfg.relative_attention_num_buckets, h)).T}

  embed_name = next((n for n in ("shared.weight", "encoder.embed_tokens.weight",
                                 "decoder.embed_tokens.weight") if n in tensors), None)
  if embed_name is None:
    raise CheckpointError(f"{directory}: no 'shared.weight' embedding.")
  embedding = take(embed_name, (cfg.vocab_size, d))

  encoder = {"relpos_bias": relpos("encoder"),
             "encoder_norm": norm("encoder.final_layer_norm.weight")}
  for i in range(cfg.num_layers):
    p = f"encoder.block.{i}.layer"
    encoder[f"layers_{i}"] = {
        "pre_attention_layer_norm": norm(f"{p}.0.layer_norm.weight"),
        "attention": attention(f"{p}.0.SelfAttention"),
        "pre_mlp_layer_norm": norm(f"{p}.1.layer_norm.weight"),
        "mlp": mlp(f"{p}.1.DenseReluDense"),
    }
  decoder = {"relpos_bias": relpos("decoder"),
             "decoder_norm": norm("decoder.final_layer_norm.weight")}
  for i in range(cfg.decoder_layers):
    p = f"decoder.block.{i}.layer"
    decoder[f"layers_{i}"] = {
        "pre_self_attention_layer_norm": norm(f"{p}.0.layer_norm.weight"),
        "self_attention": attention(f"{p}.0.SelfAttention"),
        "pre_cross_attention_layer_norm": norm(f"{p}.1.layer_norm.weight"),
        "encoder_decoder_attention": attention(f"{p}.1.EncDecAttention"),
        "pre_mlp_layer_norm": norm(f"{p}.2.layer_norm.weight"),
        "mlp": mlp(f"{p}.2.DenseReluDense"),
    }
  if not cfg.tie_word_embeddings:
    head = take("lm_head.weight", (cfg.vocab_size, d)) if "lm_head.weight" in tensors else embedding
    scaled = hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True))
    decoder["logits_dense"] = {"kernel": head.T * (d**-0.5 if scaled else 1.0)}

  # Tied copies of the embedding are expected; anything else left over is a mismatch.
  tied_copies = {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "shared.weight"}
  unused = sorted(set(tensors) - used - tied_copies)
  if unused:
    raise CheckpointError(
        f"{directory}: tensors not used by a T5 of this config: {unused[:5]}"
        f"{' ...' if len(unused) > 5 else ''}")
  return {"token_embedder": {"embedding": embedding}, "encoder": encoder, "decoder": decoder}
