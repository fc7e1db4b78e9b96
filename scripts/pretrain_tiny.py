"""Pretrains the tiny T5 that deranj ships (deranj/assets/tiny_t5.{msgpack,json}).

T5 1.1 shape (gated-GELU, untied head), T5's span corruption (15% noise, mean span 3)
on the train split of all embedded prose (deranj.data.corpora), validation loss on the
validation split. A plain jitted optax loop: deranj's trainer comes later. The data
layer may import models only here.

Usage: bash scripts/pretrain_tiny.sh   (or python scripts/pretrain_tiny.py --help)
"""
import argparse
import dataclasses
import hashlib
import json
import math
import os
import shlex
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.serialization  # pylint: disable=g-import-not-at-top
import jax
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from deranj.data import corpora  # pylint: disable=g-import-not-at-top
from deranj.data import files
from deranj.data import span_corruption
from deranj.data import tokenizer
from deranj.models import build
from deranj.models import pretrained


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--steps", type=int, default=1500)
  p.add_argument("--batch_size", type=int, default=32)
  p.add_argument("--inputs_length", type=int, default=128)
  p.add_argument("--learning_rate", type=float, default=3e-3)
  p.add_argument("--warmup_steps", type=int, default=100)
  p.add_argument("--d_model", type=int, default=128)
  p.add_argument("--num_heads", type=int, default=4)
  p.add_argument("--d_kv", type=int, default=32)
  p.add_argument("--d_ff", type=int, default=512)
  p.add_argument("--num_layers", type=int, default=3)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--eval_every", type=int, default=100)
  p.add_argument("--output_dir", default=os.path.dirname(pretrained.TINY_T5_PARAMS))
  return p.parse_args()


def tokenized_chunks(split: str, tokens_length: int) -> np.ndarray:
  return span_corruption.chunk_documents([tokenizer.encode(t) for t in corpora.prose(split)],
                                         tokens_length)


def unigram_baseline(train: span_corruption.SpanCorruptionBatches,
                     valid: list[dict[str, np.ndarray]], vocab_size: int) -> float:
  """Cross-entropy (nats/token) of validation targets under add-one-smoothed unigram
  counts of one epoch of training targets: what a model that ignores its input gets."""
  counts = np.ones(vocab_size)
  for step in range(math.ceil(len(train.chunks) / train.batch_size)):
    targets = train.batch_at(step)["responses"]
    np.add.at(counts, targets[targets > 0], 1)
  log_p = np.log(counts / counts.sum())
  total = sum(-log_p[b["responses"][b["loss_weights"] > 0]].sum() for b in valid)
  return float(total / sum(b["loss_weights"].sum() for b in valid))


def main():
  args = parse_args()
  command = " ".join(["python scripts/pretrain_tiny.py", *map(shlex.quote, sys.argv[1:])])
  start = time.time()
  tokens_length, targets_length = span_corruption.random_spans_helper(args.inputs_length)
  vocab_size = tokenizer.vocab_size()
  train_chunks = tokenized_chunks("train", tokens_length)
  valid_chunks = tokenized_chunks("validation", tokens_length)
  print(f"train: {train_chunks.size} tokens in {len(train_chunks)} chunks of {tokens_length}; "
        f"validation: {valid_chunks.size} tokens; inputs/targets length "
        f"{args.inputs_length}/{targets_length}", flush=True)

  batches = span_corruption.SpanCorruptionBatches(
      train_chunks, args.batch_size, args.inputs_length, targets_length, vocab_size, args.seed)
  valid_stream = span_corruption.SpanCorruptionBatches(
      valid_chunks, 64, args.inputs_length, targets_length, vocab_size, seed=12345)
  valid = [valid_stream.batch_at(i) for i in range(len(valid_chunks) // 64)]
  baseline = unigram_baseline(batches, valid, vocab_size)
  print(f"unigram baseline: {baseline:.3f} nats/token; uniform: {math.log(vocab_size):.3f}",
        flush=True)

  config = build.T5Config(
      vocab_size=vocab_size, d_model=args.d_model, d_kv=args.d_kv, d_ff=args.d_ff,
      num_heads=args.num_heads, num_layers=args.num_layers, dropout_rate=0.0,
      feed_forward_proj="gated-gelu", tie_word_embeddings=False)
  model = build.build_model(config, z_loss=0.0)  # a T5: EncoderDecoderModel
  params = model.init_params(jax.random.PRNGKey(args.seed))
  num_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
  print(f"T5 1.1 tiny: {num_params:,} parameters", flush=True)

  schedule = optax.warmup_cosine_decay_schedule(0.0, args.learning_rate, args.warmup_steps,
                                                args.steps, end_value=args.learning_rate * 0.05)
  optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                          optax.adamw(schedule, b2=0.98, weight_decay=0.01))
  opt_state = optimizer.init(params)

  @jax.jit
  def train_step(params, opt_state, batch):
    (loss, metrics), grads = jax.value_and_grad(model.loss_fn, has_aux=True)(params, batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, metrics

  @jax.jit
  def eval_sums(params, batch):
    _, metrics = model.loss_fn(params, batch)
    return metrics["loss"] * metrics["num_tokens"], metrics["num_tokens"]

  def validation_loss(params) -> float:
    sums = [eval_sums(params, b) for b in valid]
    return float(sum(s for s, _ in sums) / sum(n for _, n in sums))

  history = [{"step": 0, "validation_loss": validation_loss(params)}]
  print(f"step 0: validation loss {history[-1]['validation_loss']:.3f}", flush=True)
  train_start, running = time.time(), []
  for step in range(args.steps):
    params, opt_state, metrics = train_step(params, opt_state, batches.batch_at(step))
    running.append(float(metrics["loss"]))
    if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
      history.append({"step": step + 1, "train_loss": float(np.mean(running)),
                      "validation_loss": validation_loss(params)})
      running = []
      print(f"step {step + 1}: train loss {history[-1]['train_loss']:.3f}, validation loss "
            f"{history[-1]['validation_loss']:.3f} ({time.time() - train_start:.0f}s)",
            flush=True)

  config_fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
                   if f.name not in ("dtype", "param_dtype")}
  with open(tokenizer.model_path(), "rb") as f:
    spm_sha256 = hashlib.sha256(f.read()).hexdigest()
  meta = {
      "config": config_fields,
      "num_params": int(num_params),
      "tokenizer": {"file": os.path.basename(tokenizer.model_path()), "sha256": spm_sha256},
      "pretraining": {
          "command": command, "objective": "span corruption (noise 0.15, mean span 3)",
          "data": "train split of deranj.data.corpora.prose()",
          "train_tokens": int(train_chunks.size), "validation_tokens": int(valid_chunks.size),
          "inputs_length": args.inputs_length, "targets_length": targets_length,
          "batch_size": args.batch_size, "steps": args.steps,
          "learning_rate": args.learning_rate, "warmup_steps": args.warmup_steps,
          "optimizer": "adamw(b2=0.98, wd=0.01), cosine decay, clip 1.0",
          "dropout_rate": 0.0, "seed": args.seed,
          "validation_loss": history[-1]["validation_loss"],
          "unigram_baseline_loss": baseline, "uniform_loss": math.log(vocab_size),
          "history": history, "wall_seconds": round(time.time() - start, 1),
          "jax_version": jax.__version__,
      },
  }
  params_path = os.path.join(args.output_dir, os.path.basename(pretrained.TINY_T5_PARAMS))
  meta_path = os.path.join(args.output_dir, os.path.basename(pretrained.TINY_T5_CONFIG))
  files.write_bytes_atomic(params_path, flax.serialization.to_bytes(jax.device_get(params)))
  files.write_bytes_atomic(meta_path, (json.dumps(meta, indent=2) + "\n").encode())
  print(f"wrote {params_path} ({os.path.getsize(params_path) / 2**20:.1f} MiB) and {meta_path}; "
        f"validation loss {history[-1]['validation_loss']:.3f} vs unigram {baseline:.3f}; "
        f"{time.time() - start:.0f}s in all", flush=True)


if __name__ == "__main__":
  main()
