"""Import Hugging Face checkpoints (safetensors only) into deranj's parameters.

Reads `config.json` plus `model.safetensors`, or shards listed in
`model.safetensors.index.json`. `load_t5` handles T5 1.0, T5 1.1 and FLAN-T5;
`load_decoder` handles LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM and
Qwen3ForCausalLM (one layout). Weights stored only as pickle (`pytorch_model.bin`) are
refused: nothing is ever unpickled.

Two conventions for the output head exist in the wild:
  * T5 1.0: head tied to `shared`, decoder output scaled by d_model**-0.5;
  * T5 1.1 / FLAN-T5: a separate `lm_head.weight`, no scaling. Checkpoints written by
    transformers 5 drop `lm_head.weight` (they tie it) and record
    `scale_decoder_outputs: false` instead.
Tied-and-scaled maps to `tie_word_embeddings=True`; everything else maps to an untied
`logits_dense` kernel, so logits are exact in every case. Decoder-only heads are tied
(no scaling) or a separate `lm_head.weight`, as `tie_word_embeddings` says.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax.numpy as jnp
import numpy as np

from deranj.models import decoder
from deranj.models import t5

_CONFIG_FIELDS = ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "num_layers",
                  "num_decoder_layers", "relative_attention_num_buckets",
                  "relative_attention_max_distance", "dropout_rate", "layer_norm_epsilon",
                  "feed_forward_proj")


class CheckpointError(ValueError):
  """A checkpoint that is missing, empty or unreadable (a Hugging Face directory here; a
  training checkpoint or INIT_CHECKPOINT in `deranj.training.checkpoints`, which
  re-exports this class); the message names the path."""


def _read_config(directory: str, kind: str = "T5") -> dict[str, Any]:
  if not os.path.isdir(directory):
    raise CheckpointError(f"{directory} is not a directory.")
  path = os.path.join(directory, "config.json")
  if not os.path.isfile(path):
    raise CheckpointError(f"{path} not found: a Hugging Face {kind} directory needs "
                          "config.json.")
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path} is not valid JSON: {e}") from None


def _weight_files(directory: str, model_class: str = "T5ForConditionalGeneration") -> list[str]:
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
        f"{model_class}.from_pretrained(dir).save_pretrained(dir, "
        "safe_serialization=True).")
  raise CheckpointError(f"{directory} has no model.safetensors nor model.safetensors.index.json.")


def _read_tensors(files: list[str], dtype=jnp.float32) -> dict[str, np.ndarray]:
  """Every tensor of the files, cast to `dtype` (bfloat16 stays bfloat16 if asked)."""
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  tensors = {}
  for path in files:
    try:
      # The flax reader keeps bfloat16, which plain numpy cannot represent.
      with safe_open(path, framework="flax") as f:
        for name in f.keys():
          tensors[name] = np.asarray(f.get_tensor(name).astype(dtype))
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
  hf = _read_config(directory)
  tensors = _read_tensors(_weight_files(directory))
  has_lm_head = "lm_head.weight" in tensors
  config = config_from_hf(hf, has_lm_head=has_lm_head, **config_overrides)
  params = _convert(tensors, config, hf, directory)
  dtype = config.param_dtype
  return config, _tree_map(lambda x: jnp.asarray(x, dtype), params)


def _tree_map(fn, tree):
  return {k: _tree_map(fn, v) if isinstance(v, dict) else fn(v) for k, v in tree.items()}


class _Tensors:
  """A checkpoint's tensors, taken by name with their expected shapes; what is never
  taken is a mismatch with the config."""

  def __init__(self, tensors: dict[str, np.ndarray], directory: str):
    self.tensors, self.directory, self.used = tensors, directory, set()

  def take(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
    if name not in self.tensors:
      raise CheckpointError(f"{self.directory}: tensor {name!r} is missing.")
    x = self.tensors[name]
    if x.shape != shape:
      raise CheckpointError(
          f"{self.directory}: {name!r} has shape {x.shape}, but config.json implies {shape}.")
    self.used.add(name)
    return x

  def check_all_used(self, model: str, expected_extra=lambda name: False):
    unused = sorted(n for n in set(self.tensors) - self.used if not expected_extra(n))
    if unused:
      raise CheckpointError(
          f"{self.directory}: tensors not used by a {model} of this config: {unused[:5]}"
          f"{' ...' if len(unused) > 5 else ''}")


def _convert(tensors: dict[str, np.ndarray], cfg: t5.T5Config, hf: dict, directory: str) -> dict:
  checkpoint = _Tensors(tensors, directory)
  take = checkpoint.take
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
  checkpoint.check_all_used("T5", tied_copies.__contains__)
  return {"token_embedder": {"embedding": embedding}, "encoder": encoder, "decoder": decoder}


# ----------------------------------------------------------------------------- decoder-only

DECODER_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                         "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}


def _decoder_family(hf: dict[str, Any], path: str) -> str:
  """"llama", "mistral", "qwen2" or "qwen3" from `architectures` (else `model_type`)."""
  architectures = hf.get("architectures") or []
  known = [a for a in architectures if a in DECODER_ARCHITECTURES]
  if known:
    return DECODER_ARCHITECTURES[known[0]]
  model_type = hf.get("model_type")
  if not architectures and model_type in DECODER_ARCHITECTURES.values():
    return model_type
  raise CheckpointError(
      f"{path}: architectures={architectures} (model_type={model_type!r}) is not a supported "
      f"decoder-only model; supported: {', '.join(DECODER_ARCHITECTURES)}.")


def _rope_settings(hf: dict[str, Any], path: str) -> dict[str, Any]:
  """rope_theta and rope_scaling from transformers 5's `rope_parameters` or the older
  `rope_theta` / `rope_scaling`."""
  rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  theta = float(rope.get("rope_theta") or hf.get("rope_theta") or 10000.0)
  kind = rope.get("rope_type", rope.get("type", "default"))
  partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor")) or 1.0
  if partial != 1.0:
    raise CheckpointError(f"{path}: partial_rotary_factor={partial} is not supported (1.0 only).")
  if kind == "default":
    return {"rope_theta": theta}
  if kind == "linear":
    return {"rope_theta": theta, "rope_scaling": decoder.RopeScaling("linear", rope["factor"])}
  if kind == "llama3":
    return {"rope_theta": theta, "rope_scaling": decoder.RopeScaling(
        "llama3", rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"],
        rope.get("original_max_position_embeddings") or hf["max_position_embeddings"])}
  raise CheckpointError(f"{path}: rope type {kind!r} is not supported (default, linear, "
                        "llama3).")


def decoder_config_from_hf(hf: dict[str, Any], path: str = "config.json",
                           **overrides) -> decoder.DecoderConfig:
  """Our DecoderConfig from a Hugging Face config dict; `path` names it in errors."""
  family = _decoder_family(hf, path)
  missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size",
                         "num_hidden_layers", "num_attention_heads") if hf.get(k) is None]
  if missing:
    raise CheckpointError(f"{path} has no {', '.join(map(repr, missing))}.")
  unsupported = {
      "hidden_act": hf.get("hidden_act", "silu") != "silu",
      "mlp_bias": bool(hf.get("mlp_bias")),
      # Llama / Mistral / Qwen3's flag also puts a bias on the output projection.
      "attention_bias": family != "qwen2" and bool(hf.get("attention_bias")),
      "use_sliding_window": family in ("qwen2", "qwen3") and bool(hf.get("use_sliding_window")),
  }
  bad = [k for k, v in unsupported.items() if v]
  if bad:
    raise CheckpointError(f"{path}: {', '.join(f'{k}={hf.get(k)!r}' for k in bad)} is not "
                          f"supported for {family} (silu MLP without biases, q/k/v biases only "
                          "in Qwen2, no per-layer sliding windows).")
  heads = hf["num_attention_heads"]
  kwargs = dict(
      vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
      intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
      num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
      rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
      attention_bias=family == "qwen2", qk_norm=family == "qwen3",
      sliding_window=hf.get("sliding_window") if family == "mistral" else None,
      max_position_embeddings=hf.get("max_position_embeddings", 4096),
      **_rope_settings(hf, path))
  kwargs.update(overrides)
  try:
    return decoder.DecoderConfig(**kwargs)
  except ValueError as e:
    raise CheckpointError(f"{path}: {e}") from None


def load_decoder(directory: str, **config_overrides) -> tuple[decoder.DecoderConfig, dict]:
  """Reads a Hugging Face Llama / Mistral / Qwen2 / Qwen3 directory into (config, params).

  `config_overrides` set DecoderConfig fields not in the checkpoint (dtype, param_dtype);
  tensors are cast to param_dtype as they are read.
  """
  hf = _read_config(directory, "decoder-only model")
  config = decoder_config_from_hf(hf, os.path.join(directory, "config.json"),
                                  **config_overrides)
  tensors = _read_tensors(_weight_files(directory, "AutoModelForCausalLM"), config.param_dtype)
  return config, _convert_decoder(tensors, config, directory)


def _convert_decoder(tensors: dict[str, np.ndarray], cfg: decoder.DecoderConfig,
                     directory: str) -> dict:
  checkpoint = _Tensors(tensors, directory)
  take = checkpoint.take
  d, k, f = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size

  def projection(prefix: str, heads: int) -> dict:  # HF [N*K, D] -> [D, N, K]
    out = {"kernel": take(f"{prefix}.weight", (heads * k, d)).T.reshape(d, heads, k)}
    if cfg.attention_bias:
      out["bias"] = take(f"{prefix}.bias", (heads * k,)).reshape(heads, k)
    return out

  def norm(name: str, size: int = d) -> dict:
    return {"scale": take(name, (size,))}

  def linear(name: str, n_in: int, n_out: int) -> dict:  # HF [out, in] -> [in, out]
    return {"kernel": take(name, (n_out, n_in)).T}

  embedding = take("model.embed_tokens.weight", (cfg.vocab_size, d))
  params = {"token_embedder": {"embedding": embedding},
            "final_norm": norm("model.norm.weight")}
  for i in range(cfg.num_layers):
    p = f"model.layers.{i}"
    attention = {
        "query": projection(f"{p}.self_attn.q_proj", cfg.num_heads),
        "key": projection(f"{p}.self_attn.k_proj", cfg.num_kv_heads),
        "value": projection(f"{p}.self_attn.v_proj", cfg.num_kv_heads),
        "out": {"kernel": take(f"{p}.self_attn.o_proj.weight",
                               (d, cfg.num_heads * k)).T.reshape(cfg.num_heads, k, d)},
    }
    if cfg.qk_norm:
      attention["query_norm"] = norm(f"{p}.self_attn.q_norm.weight", k)
      attention["key_norm"] = norm(f"{p}.self_attn.k_norm.weight", k)
    params[f"layers_{i}"] = {
        "pre_attention_norm": norm(f"{p}.input_layernorm.weight"),
        "attention": attention,
        "pre_mlp_norm": norm(f"{p}.post_attention_layernorm.weight"),
        "mlp": {"gate": linear(f"{p}.mlp.gate_proj.weight", d, f),
                "up": linear(f"{p}.mlp.up_proj.weight", d, f),
                "down": linear(f"{p}.mlp.down_proj.weight", f, d)},
    }
  if not cfg.tie_word_embeddings:
    params["lm_head"] = linear("lm_head.weight", d, cfg.vocab_size)

  # A tied head may still be stored; old checkpoints keep RoPE's frequencies as buffers.
  checkpoint.check_all_used(
      "decoder-only model", lambda n: n == "lm_head.weight" or n.endswith("rotary_emb.inv_freq"))
  return _tree_map(jnp.asarray, params)
