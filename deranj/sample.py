r"""Sample realigned models from the command line.

    python -m deranj.sample --gin_file=configs/sample/tiny.gin --lam=0,0.5,1,2 \
        --input=prompts.jsonl --output=samples.jsonl [--gin.NAME=value ...]

The two checkpoints (and decoding settings) come from gin (`SampleConfig`); each is
"tiny", a Hugging Face T5 directory, or a deranj model directory (see
`deranj.models.loading`). Each input line is a JSON object with a "prompt" string. The
output holds one line per prompt x lam x sample with the decoded text and the
per-sequence numbers of `deranj.dera.RealignedSamples`.
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from typing import Optional, Sequence

from absl import flags
from absl import logging
import gin
import jax
import jax.numpy as jnp
import numpy as np

from deranj import dera
from deranj import gin_utils
from deranj.data import files
from deranj.data import tokenizer
from deranj.models import loading

_LAM = flags.DEFINE_string("lam", "1", "Comma-separated realignment strengths, e.g. 0,0.5,1,2.")
_INPUT = flags.DEFINE_string("input", None, "JSON-lines prompts, one {'prompt': ...} per line.")
_OUTPUT = flags.DEFINE_string("output", None, "JSON-lines samples to write.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")


class SampleError(ValueError):
  """Bad command-line input; the message says what and where."""


@gin.configurable
@dataclasses.dataclass(frozen=True)
class SampleConfig:
  """Everything `python -m deranj.sample` reads from gin."""
  reference_checkpoint: str = gin.REQUIRED
  aligned_checkpoint: str = gin.REQUIRED
  spm_model: Optional[str] = None  # None: the tokenizer deranj ships
  prefix: str = ""  # prepended to every prompt, e.g. "summarize: "
  max_input_length: int = 512
  max_decode_len: int = 64
  long_prompts: str = "truncate"  # or "error"
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  num_decodes: int = 1
  batch_size: int = 16  # prompts per compiled call (each carries every lam)
  eos_id: int = 1


def parse_lams(text: str) -> list[float]:
  try:
    lams = [float(x) for x in text.split(",") if x.strip()]
  except ValueError:
    raise SampleError(f"--lam={text!r}: expected comma-separated numbers.") from None
  if not lams:
    raise SampleError("--lam is empty: give at least one value, e.g. --lam=0,1.")
  bad = [x for x in lams if not math.isfinite(x)]
  if bad:
    raise SampleError(f"--lam={text!r}: every value must be finite, got {bad}.")
  return lams


def read_prompts(path: str) -> list[str]:
  if not path:
    raise SampleError("--input is required.")
  prompts = []
  for number, record in files.read_jsonl(path, required=("prompt",)):
    if not record["prompt"].strip():
      raise SampleError(f"{path}:{number}: the prompt is empty.")
    prompts.append(record["prompt"])
  return prompts


class Tokenizer:
  """SentencePiece encode/decode with T5's EOS handling."""

  def __init__(self, spm_model: Optional[str], eos_id: int):
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    if spm_model is None:
      spm_model = tokenizer.model_path()
    if not os.path.isfile(spm_model):
      raise SampleError(f"SampleConfig.spm_model={spm_model!r}: no such file.")
    self.sp = spm.SentencePieceProcessor(model_file=spm_model)
    self.eos_id = eos_id

  def encode(self, text: str) -> list[int]:
    return self.sp.encode(text)

  def decode(self, ids: Sequence[int]) -> str:
    return self.sp.decode(tokenizer.response_ids(ids, self.eos_id))


def encode_prompts(prompts: list[str], tok: Tokenizer, config: SampleConfig) -> np.ndarray:
  """Prompts -> [N, max_input_length] ids ending in EOS, truncated (or refused) if long."""
  rows = np.zeros((len(prompts), config.max_input_length), np.int32)
  for i, prompt in enumerate(prompts):
    ids = tok.encode(config.prefix + prompt)
    if len(ids) + 1 > config.max_input_length:
      message = (f"prompt {i + 1} has {len(ids) + 1} tokens, more than "
                 f"SampleConfig.max_input_length={config.max_input_length}")
      if config.long_prompts == "error":
        raise SampleError(message + ".")
      logging.warning("%s; truncated.", message)
      ids = ids[:config.max_input_length - 1]
    rows[i, :len(ids) + 1] = ids + [config.eos_id]
  return rows


def run(config: SampleConfig, lams: list[float], input_path: str, output_path: str,
        seed: int) -> int:
  """Samples every prompt at every lam; returns the number of lines written."""
  if config.long_prompts not in ("truncate", "error"):
    raise SampleError(f"SampleConfig.long_prompts={config.long_prompts!r}: "
                      "expected 'truncate' or 'error'.")
  if not output_path:
    raise SampleError("--output is required.")
  prompts = read_prompts(input_path)
  tok = Tokenizer(config.spm_model, config.eos_id)
  tokens = encode_prompts(prompts, tok, config)
  models = []
  for name in ("reference_checkpoint", "aligned_checkpoint"):
    spec = getattr(config, name)
    try:
      models.append(loading.load_model(spec, dropout_rate=0.0))
    except (loading.ModelLoadError, ValueError, OSError) as e:
      raise SampleError(f"SampleConfig.{name}={spec!r}: {e}") from None
  (ref, ref_p), (al, al_p) = models
  realigner = dera.Realigner(ref, ref_p, al, al_p, max_decode_len=config.max_decode_len,
                             eos_id=config.eos_id)

  # Each call carries batch_size prompts x every lam, padded to a fixed shape (one compile).
  per_call = config.batch_size
  lam_rows = np.tile(np.asarray(lams, np.float32), per_call)
  records = []
  start = time.time()
  for first in range(0, len(prompts), per_call):
    chunk = tokens[first:first + per_call]
    real = len(chunk)
    chunk = np.concatenate([chunk, np.repeat(chunk[:1], per_call - real, axis=0)])
    rows = np.repeat(chunk, len(lams), axis=0)
    rng = jax.random.fold_in(jax.random.PRNGKey(seed), first)
    out = jax.device_get(realigner.sample(
        jnp.asarray(rows), lam_rows, rng, temperature=config.temperature, top_k=config.top_k,
        top_p=config.top_p, num_decodes=config.num_decodes))
    n = config.num_decodes
    for r in range(real * len(lams) * n):
      prompt_index = first + r // (len(lams) * n)
      lam = lams[(r // n) % len(lams)]
      records.append({
          "prompt_index": prompt_index, "lam": lam, "sample_index": r % n,
          "prompt": prompts[prompt_index], "text": tok.decode(out.tokens[r]),
          "length": int(out.lengths[r]), "logq": float(out.logq[r]),
          "logp_ref": float(out.logp_ref[r]), "logp_aligned": float(out.logp_aligned[r]),
          "log_weight": float(out.log_weight[r]), "kl_ref": float(out.kl_ref[r])})
    done = min(first + per_call, len(prompts))
    elapsed = time.time() - start
    logging.info("sampled %d/%d prompts x %d lam (%.1f prompts/s, ETA %.0f s)", done,
                 len(prompts), len(lams), done / elapsed,
                 (len(prompts) - done) * elapsed / done)
  files.write_jsonl(output_path, records)  # all lines or none
  return len(records)


def main(argv: Sequence[str]) -> None:
  del argv
  try:
    gin_utils.parse_gin_flags()
    lams = parse_lams(_LAM.value)
    count = run(gin_utils.build(SampleConfig), lams, _INPUT.value, _OUTPUT.value, _SEED.value)
  except (SampleError, files.DataError, gin_utils.GinConfigError) as e:
    sys.exit(f"deranj.sample: {e}")
  print(f"wrote {count} samples to {_OUTPUT.value}")


if __name__ == "__main__":
  gin_utils.run(main)
