r"""Sample realigned models from the command line.

    python -m deranj.sample --gin_file=configs/sample/tiny.gin --lam=0,0.5,1,2 \
        --input=prompts.jsonl --output=samples.jsonl --gin.ALIGNED="'runs/ppo'"

The aligned checkpoint is a finished training run's MODEL_DIR (its `model/` is used), a
deranj model directory, a Hugging Face T5 or Llama / Mistral / Qwen2 / Qwen3 directory or
"tiny" (see `deranj.models.loading`). The reference is, unless `SampleConfig.reference_checkpoint` names
one, the model the aligned run started from: the `init_checkpoint` its `model/` records (the
SFT run, for PPO, PG and DPO runs). Each input line is a JSON object with a "prompt" string.
The output holds one line per prompt x lam x sample with the decoded text and the
per-sequence numbers of `deranj.dera.RealignedSamples`. Progress goes to stderr.

Decoding rules and best-of-N (`deranj.dera`):
  --rule=dera --lam=...        DeRa at each lam (the default, lam 1).
  --rule=aad --alpha=...       alignment-aware decoding at each alpha in (0, 1] (default
                               0.1), greedy unless SampleConfig.temperature is set.
  --best_of=N --scorer=S       N candidates per prompt and value, the best kept by S:
                               implicit (log p_aligned - log p_ref), mixture (DeRa's
                               exact-mixture weight) or reward_model (--reward_model=DIR,
                               a reward_model run's MODEL_DIR).

Two Hugging Face decoder-only directories (reference and aligned, one vocabulary) are
tokenized with the aligned directory's `tokenizer.json` (the `tokenizers` library; the
prompt gets the tokenizer's special tokens, e.g. BOS, and no EOS), and `--chat_template`
wraps each prompt as one user message in the `chat_template` of its
`tokenizer_config.json`, with the generation prompt. EOS is SampleConfig.eos_id, else the
tokenizer's `eos_token` (the end of a chat turn), else the checkpoint's `eos_token_id`.
Other models use deranj's SentencePiece conventions (EOS 1 ends the prompt).

Checkpoints whose vocabularies differ only by padding rows (a fine-tune resized 151936 ->
151665) realign over the ids they share with `--gin.SampleConfig.shared_vocab=151665`:
samples are ids < N, and every reported log-probability is over those N ids.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Optional, Sequence, Union

from absl import flags
from absl import logging
import gin
import jax
import jax.numpy as jnp
import numpy as np

from deranj import dera
from deranj import gin_utils
from deranj import progress as progress_lib
from deranj.data import batching
from deranj.data import files
from deranj.data import tokenizer
from deranj.models import loading

_LAM = flags.DEFINE_string("lam", None, "--rule=dera: comma-separated realignment strengths, "
                           "e.g. 0,0.5,1,2 (default 1).")
_RULE = flags.DEFINE_enum("rule", "dera", dera.RULES, "Decoding rule: DeRa at --lam, or "
                          "alignment-aware decoding (AAD) at --alpha.")
_ALPHA = flags.DEFINE_string("alpha", None, "--rule=aad: comma-separated candidate thresholds "
                             f"in (0, 1], e.g. 0.05,0.1,0.2 (default {dera.DEFAULT_ALPHA}).")
_BEST_OF = flags.DEFINE_integer("best_of", None, "Draw N candidates per prompt and value and "
                                "keep the best by --scorer.")
_SCORER = flags.DEFINE_enum("scorer", None, ["implicit", "mixture", "reward_model"],
                            "--best_of's ranking: the DPO implicit reward log p_aligned - "
                            "log p_ref, the exact-mixture weight (--rule=dera), or a reward "
                            "model (--reward_model).")
_REWARD_MODEL = flags.DEFINE_string("reward_model", None, "--scorer=reward_model: a "
                                    "reward_model run's MODEL_DIR or reward-model directory.")
_INPUT = flags.DEFINE_string("input", None, "JSON-lines prompts, one {'prompt': ...} per line.")
_OUTPUT = flags.DEFINE_string("output", None, "JSON-lines samples to write.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_CHAT_TEMPLATE = flags.DEFINE_boolean(
    "chat_template", False, "Hugging Face decoder-only models: wrap each prompt as a user "
    "message in the chat_template of the aligned model's tokenizer_config.json.")


class SampleError(ValueError):
  """Bad command-line input; the message says what and where."""


@gin.configurable
@dataclasses.dataclass(frozen=True)
class SampleConfig:
  """Everything `python -m deranj.sample` reads from gin."""
  aligned_checkpoint: Optional[str] = None  # required; a run's MODEL_DIR or a model dir
  reference_checkpoint: Optional[str] = None  # None: the aligned run's init_checkpoint
  spm_model: Optional[str] = None  # None: the tokenizer deranj ships
  prefix: str = ""  # prepended to every prompt, e.g. "summarize: "
  max_input_length: int = 512
  max_decode_len: int = 64
  long_prompts: str = "truncate"  # or "error"
  temperature: Optional[float] = None  # None: 0 (greedy) for lone AAD outputs, else 1
  top_k: int = 0
  top_p: float = 1.0
  num_decodes: int = 1
  batch_size: int = 16  # prompts per compiled call (each carries every lam)
  eos_id: Optional[int] = None  # None: 1, or a Hugging Face tokenizer's / checkpoint's
  shared_vocab: Optional[int] = None  # N: realign over ids < N (vocabularies that differ
  #                                      only by padding rows); None: equal vocabularies


def parse_lams(text: str) -> list[float]:
  """--lam: finite, distinct values in the order given (`dera.parse_lams`)."""
  try:
    return dera.parse_lams(text, flag="--lam")
  except ValueError as e:
    raise SampleError(str(e)) from None


SCORERS = ("implicit", "mixture", "reward_model")


@dataclasses.dataclass(frozen=True)
class Method:
  """How each prompt is decoded: the rule at each of its values, and best-of-N."""
  rule: str = "dera"
  values: tuple[float, ...] = (1.0,)  # lam for "dera", alpha for "aad"
  best_of: Optional[int] = None  # N candidates per prompt and value, the best kept
  scorer: Optional[str] = None  # one of SCORERS, with best_of
  reward_model: Optional[str] = None  # with scorer="reward_model"

  @property
  def name(self) -> str:
    """The value's name in the output lines."""
    return "lam" if self.rule == "dera" else "alpha"


def parse_method(rule: str = "dera", lam: Optional[str] = None, alpha: Optional[str] = None,
                 best_of: Optional[int] = None, scorer: Optional[str] = None,
                 reward_model: Optional[str] = None) -> Method:
  """The flags --rule, --lam, --alpha, --best_of, --scorer, --reward_model -> Method.

  Raises:
    SampleError: one line naming the flags that do not fit together.
  """
  if rule not in dera.RULES:
    raise SampleError(f"--rule={rule}: expected one of {', '.join(dera.RULES)}.")
  if rule == "dera":
    if alpha is not None:
      raise SampleError("--alpha applies to --rule=aad; --rule=dera takes --lam.")
    values = parse_lams("1" if lam is None else lam)
  else:
    if lam is not None:
      raise SampleError(f"--lam applies to --rule=dera; --rule=aad takes --alpha (default "
                        f"{dera.DEFAULT_ALPHA}).")
    try:
      values = dera.parse_alphas(str(dera.DEFAULT_ALPHA) if alpha is None else alpha)
    except ValueError as e:
      raise SampleError(str(e)) from None
  if best_of is None:
    if scorer is not None:
      raise SampleError(f"--scorer={scorer} ranks --best_of=N candidates; give --best_of too.")
  elif best_of < 1:
    raise SampleError(f"--best_of={best_of}: need at least 1 candidate per prompt.")
  elif scorer is None:
    raise SampleError(f"--best_of={best_of} needs --scorer ({', '.join(SCORERS)}).")
  if scorer not in (None,) + SCORERS:
    raise SampleError(f"--scorer={scorer}: expected one of {', '.join(SCORERS)}.")
  if scorer == "mixture" and rule != "dera":
    raise SampleError("--scorer=mixture ranks DeRa candidates by their exact-mixture weight; "
                      "--rule=aad has none (use --scorer=implicit or reward_model).")
  if scorer == "reward_model" and not reward_model:
    raise SampleError("--scorer=reward_model needs --reward_model=DIR (a reward_model run's "
                      "MODEL_DIR).")
  if reward_model and scorer != "reward_model":
    raise SampleError("--reward_model is read only with --scorer=reward_model.")
  return Method(rule, tuple(values), best_of, scorer, reward_model)


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
  """SentencePiece encode/decode with T5's EOS handling: a prompt ends with EOS."""

  def __init__(self, spm_model: Optional[str], eos_id: Optional[int]):
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    if spm_model is None:
      spm_model = tokenizer.model_path()
    if not os.path.isfile(spm_model):
      raise SampleError(f"SampleConfig.spm_model={spm_model!r}: no such file.")
    self.sp = spm.SentencePieceProcessor(model_file=spm_model)
    self.eos_id = tokenizer.EOS_ID if eos_id is None else eos_id
    self.name = spm_model
    self.vocab_size = self.sp.get_piece_size()

  def encode(self, text: str) -> list[int]:
    return self.sp.encode(text)

  def encode_prompt(self, text: str, limit: int) -> tuple[list[int], int]:
    """(the ids of `text` then EOS, cut to `limit` with EOS kept; the uncut length)."""
    ids = self.encode(text)
    return ids[:limit - 1] + [self.eos_id], len(ids) + 1

  def decode(self, ids: Sequence[int]) -> str:
    return self.sp.decode(tokenizer.response_ids(ids, self.eos_id))


HF_TOKENIZER_FILE = "tokenizer.json"
HF_TOKENIZER_CONFIG = "tokenizer_config.json"


def _token_text(value) -> Optional[str]:
  """A special token of tokenizer_config.json: a string or {"content": ...}."""
  return value.get("content") if isinstance(value, dict) else value


def _first_id(value) -> Optional[int]:
  return value[0] if isinstance(value, list) and value else value if isinstance(
      value, int) else None


class HFTokenizer:
  """A Hugging Face directory's `tokenizer.json` (the `tokenizers` library) for
  decoder-only models: prompts get the tokenizer's special tokens (e.g. BOS) and no EOS,
  or, with `chat_template`, are one user message in tokenizer_config.json's template."""

  def __init__(self, directory: str, eos_id: Optional[int], chat_template: bool):
    try:
      import tokenizers  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise SampleError(f"{directory} is a Hugging Face model: reading its "
                        f"{HF_TOKENIZER_FILE} needs the `tokenizers` package "
                        "(pip install tokenizers).") from None
    path = os.path.join(directory, HF_TOKENIZER_FILE)
    self.name = path
    try:
      self.tok = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises its own exception types
      raise SampleError(f"cannot read the tokenizer {path}: {e}") from None
    self.settings = _read_json(os.path.join(directory, HF_TOKENIZER_CONFIG), required=False)
    self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
    self.eos_id = self._eos_id(directory) if eos_id is None else eos_id
    self.template = self._template(directory) if chat_template else None

  def _eos_id(self, directory: str) -> int:
    """The tokenizer's eos_token (a chat turn's end), else the checkpoint's eos_token_id."""
    eos = _token_text(self.settings.get("eos_token"))
    if eos is not None and self.tok.token_to_id(eos) is not None:
      return self.tok.token_to_id(eos)
    for name in ("generation_config.json", "config.json"):
      found = _first_id(_read_json(os.path.join(directory, name), required=False).get(
          "eos_token_id"))
      if found is not None:
        return found
    raise SampleError(f"{directory}: no EOS id in {HF_TOKENIZER_CONFIG}, "
                      "generation_config.json or config.json; set SampleConfig.eos_id.")

  def _template(self, directory: str):
    """tokenizer_config.json's chat_template, compiled as transformers does."""
    template = self.settings.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
      template = {t.get("name"): t.get("template") for t in template}.get("default")
    jinja_file = os.path.join(directory, "chat_template.jinja")
    if template is None and os.path.isfile(jinja_file):
      with open(jinja_file) as f:
        template = f.read()
    if not isinstance(template, str):
      raise SampleError(f"--chat_template: {os.path.join(directory, HF_TOKENIZER_CONFIG)} has "
                        "no chat_template.")
    from jinja2 import exceptions  # pylint: disable=g-import-not-at-top
    from jinja2 import ext  # pylint: disable=g-import-not-at-top
    from jinja2 import sandbox  # pylint: disable=g-import-not-at-top

    def raise_exception(message):
      raise exceptions.TemplateError(message)

    env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[ext.loopcontrols])
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False,
                                                             indent=indent)
    env.globals.update(raise_exception=raise_exception,
                       strftime_now=lambda fmt: time.strftime(fmt))
    try:
      return env.from_string(template)
    except exceptions.TemplateError as e:
      raise SampleError(f"--chat_template: the chat_template of {directory} does not "
                        f"compile: {e}") from None

  def render(self, text: str) -> str:
    """`text` as one user message with the generation prompt, in the chat template."""
    special = {k: _token_text(self.settings.get(k)) or "" for k in (
        "bos_token", "eos_token", "pad_token", "unk_token")}
    try:
      return self.template.render(messages=[{"role": "user", "content": text}],
                                  add_generation_prompt=True, **special)
    except Exception as e:  # jinja2 raises several types
      raise SampleError(f"--chat_template: rendering the chat template failed: {e}") from None

  def encode_prompt(self, text: str, limit: int) -> tuple[list[int], int]:
    """(the prompt's ids, its last `limit` when longer; the uncut length). The end is
    kept: it holds the chat template's generation prompt."""
    if self.template is not None:
      ids = self.tok.encode(self.render(text), add_special_tokens=False).ids
    else:
      ids = self.tok.encode(text).ids
    return ids[-limit:], len(ids)

  def decode(self, ids: Sequence[int]) -> str:
    ids = [int(i) for i in ids]
    if self.eos_id in ids:
      ids = ids[:ids.index(self.eos_id)]
    return self.tok.decode([i for i in ids if i >= 0], skip_special_tokens=True)


def _read_json(path: str, required: bool = True) -> dict:
  if not os.path.isfile(path):
    if required:
      raise SampleError(f"{path} not found.")
    return {}
  try:
    with open(path) as f:
      value = json.load(f)
  except (json.JSONDecodeError, OSError) as e:
    raise SampleError(f"{path} is not valid JSON: {e}") from None
  return value if isinstance(value, dict) else {}


def make_tokenizer(config: SampleConfig, choice: "Choice", chat_template: bool = False):
  """The aligned Hugging Face decoder directory's tokenizer.json (unless
  SampleConfig.spm_model names a SentencePiece model), else SentencePiece."""
  directory = choice.aligned
  hf_decoder = (directory != "tiny" and config.spm_model is None
                and loading.is_hf_decoder_dir(directory))
  if hf_decoder:
    if not os.path.isfile(os.path.join(directory, HF_TOKENIZER_FILE)):
      raise SampleError(f"{directory} is a Hugging Face decoder-only model without "
                        f"{HF_TOKENIZER_FILE}; copy its tokenizer files there.")
    return HFTokenizer(directory, config.eos_id, chat_template)
  if chat_template:
    raise SampleError(f"--chat_template applies a Hugging Face tokenizer's chat template; "
                      f"the aligned model {directory} is not a Hugging Face decoder-only "
                      "directory with a tokenizer.json.")
  return Tokenizer(config.spm_model, config.eos_id)


def encode_prompts(prompts: list[str], tok, config: SampleConfig,
                   pad_id: int = 0) -> np.ndarray:
  """Prompts -> [N, max_input_length] ids padded with `pad_id`, truncated (or refused) if
  long (SentencePiece: ending in EOS)."""
  rows = np.full((len(prompts), config.max_input_length), pad_id, np.int32)
  for i, prompt in enumerate(prompts):
    ids, length = tok.encode_prompt(config.prefix + prompt, config.max_input_length)
    if length > config.max_input_length:
      message = (f"prompt {i + 1} has {length} tokens, more than "
                 f"SampleConfig.max_input_length={config.max_input_length}")
      if config.long_prompts == "error":
        raise SampleError(message + ".")
      logging.warning("%s; truncated.", message)
    rows[i, :len(ids)] = ids
  return rows


PROGRESS_EVERY_S = 5.0
_ALIGNED_HINT = "SampleConfig.aligned_checkpoint (--gin.ALIGNED with configs/sample/tiny.gin)"
_REFERENCE_HINT = ("SampleConfig.reference_checkpoint (--gin.REFERENCE with "
                   "configs/sample/tiny.gin)")


def say(message: str) -> None:
  """A line the user sees at the default verbosity (absl's info lines are hidden)."""
  print(f"deranj.sample: {message}", file=sys.stderr, flush=True)


def check_output(path: str) -> None:
  """Refuses an output path that cannot be written, before any work is done.

  Missing parent directories are fine: they are created when the output is written.
  """
  if not path:
    raise SampleError("--output is required.")
  if os.path.isdir(path) or path.endswith(os.sep):
    raise SampleError(f"--output={path} is a directory; give a file, e.g. "
                      f"--output={os.path.join(path, 'samples.jsonl')}.")
  parent = os.path.dirname(os.path.abspath(path))
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise SampleError(f"--output={path}: {parent} is a file, not a directory.")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise SampleError(f"--output={path}: cannot write in {parent}.")


def _resolve(spec: str, what: str) -> str:
  try:
    return loading.resolve(spec)
  except loading.ModelLoadError as e:
    raise SampleError(f"{what}={spec!r}: {e}") from None


def _same_model(a: str, b: str) -> bool:
  return a == b or (a != "tiny" and b != "tiny" and os.path.realpath(a) == os.path.realpath(b))


@dataclasses.dataclass(frozen=True)
class Choice:
  """Which models `run` loads, why, and a warning about the pair (or None)."""
  aligned: str
  aligned_why: str
  reference: str
  reference_why: str
  warning: Optional[str] = None


def choose_checkpoints(config: SampleConfig) -> Choice:
  """The aligned model and its reference (see the module docstring).

  Raises:
    SampleError: when the aligned model is missing, or no reference is given and the
      aligned model records none that exists here.
  """
  if not config.aligned_checkpoint:
    raise SampleError(f"no aligned model: set {_ALIGNED_HINT} to a finished training run's "
                      "MODEL_DIR or a model directory, e.g. --gin.ALIGNED=\"'runs/ppo'\".")
  given = config.aligned_checkpoint
  aligned = _resolve(given, "SampleConfig.aligned_checkpoint")
  aligned_why = (f"the final model of run {given}" if aligned != given
                 else "SampleConfig.aligned_checkpoint")
  try:
    recorded = loading.read_metadata(aligned).get("init_checkpoint")
  except loading.ModelLoadError as e:
    raise SampleError(f"SampleConfig.aligned_checkpoint={given!r}: {e}") from None
  record = os.path.join(aligned, loading.CONFIG_FILE)
  if config.reference_checkpoint:
    reference = _resolve(config.reference_checkpoint, "SampleConfig.reference_checkpoint")
    warning = None
    if recorded and recorded != "tiny" and not os.path.isdir(recorded):
      warning = (f"warning: cannot check the reference against the aligned run's "
                 f"init_checkpoint {recorded!r} (recorded in {record}): not a directory here.")
    elif recorded:
      try:
        same = _same_model(reference, loading.resolve(recorded))
      except loading.ModelLoadError:
        same = False
      if not same:
        warning = (f"warning: the reference {reference} is not the aligned run's "
                   f"init_checkpoint {recorded!r} (recorded in {record}): DeRa then realigns "
                   "against a model the aligned model was not trained from.")
    return Choice(aligned, aligned_why, reference, "SampleConfig.reference_checkpoint", warning)
  if not recorded:
    raise SampleError(f"{_REFERENCE_HINT} is required: the aligned model {aligned} records no "
                      "init_checkpoint (only a finished deranj training run's model/ does).")
  reference = _resolve(recorded, f"the aligned run's init_checkpoint (in {record})")
  if reference != "tiny" and not os.path.isdir(reference):
    raise SampleError(f"the aligned run's init_checkpoint {recorded!r} (recorded in {record}) "
                      f"is not a directory here; set {_REFERENCE_HINT} to that model.")
  return Choice(aligned, aligned_why, reference, "the aligned run's init_checkpoint")


def _load(path: str, role: str, why: str, warning: Optional[str] = None):
  say(f"{role}: {path} ({why})")
  if warning:
    say(warning)
  start = time.time()
  try:
    model, params = loading.load_model(path, dropout_rate=0.0)
  except (loading.ModelLoadError, ValueError, OSError) as e:
    raise SampleError(f"{role} model {path!r} ({why}): {e}") from None
  size = sum(np.size(x) for x in jax.tree_util.tree_leaves(params))
  say(f"loaded {role}: {size / 1e6:.1f}M parameters, vocab_size {model.config.vocab_size}, "
      f"{time.time() - start:.1f} s")
  return model, params


def check_vocabularies(choice: Choice, ref, al, tok, shared_vocab: Optional[int] = None):
  """The two models share one vocabulary (or its first `shared_vocab` ids) and the
  tokenizer's ids fit it."""
  sizes = (ref.config.vocab_size, al.config.vocab_size)
  if shared_vocab is None and sizes[0] != sizes[1]:
    raise SampleError(
        f"vocabulary mismatch: the reference {choice.reference} has vocab_size {sizes[0]}, the "
        f"aligned model {choice.aligned} {sizes[1]}; DeRa mixes their next-token logits, so "
        "both need one vocabulary. If they differ only by padding rows, set "
        f"SampleConfig.shared_vocab to the number of ids they share (at most {min(sizes)}).")
  if shared_vocab is not None and (isinstance(shared_vocab, bool) or not isinstance(
      shared_vocab, int) or not 0 < shared_vocab <= min(sizes)):
    raise SampleError(
        f"SampleConfig.shared_vocab={shared_vocab!r}: must be an integer in 1..{min(sizes)}, "
        f"the smaller vocab_size of the reference {choice.reference} ({sizes[0]}) and the "
        f"aligned model {choice.aligned} ({sizes[1]}).")
  if tok.vocab_size > min(sizes):
    setting = "SampleConfig.spm_model" if isinstance(tok, Tokenizer) else "the tokenizer files"
    raise SampleError(
        f"vocabulary mismatch: the tokenizer {tok.name} has {tok.vocab_size} "
        f"pieces, more than the models' vocab_size {min(sizes)}; set "
        f"{setting} to the models' tokenizer.")


def _progress(total: int, groups: int, samples: int, name: str = "lam",
              best_of: Optional[int] = None) -> progress_lib.Progress:
  """Prompts done, prompts/s and ETA on stderr."""
  what = f"prompts x {groups} {name}" + (f" x {samples} samples" if samples > 1 else "")
  if best_of:
    what += f" (best of {best_of})"
  return progress_lib.Progress(total, what, write=say, verb="sampled", rate_unit="prompts",
                               every_s=PROGRESS_EVERY_S)


def reward_model_scorer(path: str) -> tuple[dera.Scorer, int]:
  """(a best-of-N scorer by the reward model at `path`, its vocab_size)."""
  from deranj.training import rollouts  # pylint: disable=g-import-not-at-top
  try:
    reward = rollouts.LearnedReward(path)
  except (loading.ModelLoadError, OSError) as e:
    raise SampleError(f"--reward_model={path}: {e}") from None
  rewards_of = jax.jit(reward.__call__)
  params = reward.params()
  say(f"scorer: reward model {path}")
  return (lambda prompts, samples: rewards_of(params, prompts, samples.tokens),
          reward.model.config.vocab_size)


def _temperature(config: SampleConfig, method: Method) -> float:
  """SampleConfig.temperature, or its default: greedy for lone AAD outputs, else 1."""
  if config.temperature is None:
    return 0.0 if method.rule == "aad" and not method.best_of else 1.0
  if config.temperature == 0 and (method.best_of or 0) > 1:
    raise SampleError(f"--best_of={method.best_of} with SampleConfig.temperature=0: every "
                      "candidate would be the same greedy output; sample (temperature > 0).")
  return config.temperature


def run(config: SampleConfig, method: Union[Method, Sequence[float]], input_path: str,
        output_path: str, seed: int, chat_template: bool = False) -> int:
  """Decodes every prompt at every value of `method` (a list: DeRa at those lams);
  returns the number of lines written. `chat_template`: --chat_template."""
  if not isinstance(method, Method):
    method = Method(values=tuple(method))
  if config.long_prompts not in ("truncate", "error"):
    raise SampleError(f"SampleConfig.long_prompts={config.long_prompts!r}: "
                      "expected 'truncate' or 'error'.")
  if method.best_of and config.num_decodes != 1:
    raise SampleError(f"--best_of={method.best_of} writes one sample per prompt and value; "
                      f"leave SampleConfig.num_decodes at 1 (got {config.num_decodes}).")
  temperature = _temperature(config, method)
  check_output(output_path)
  prompts = read_prompts(input_path)
  choice = choose_checkpoints(config)
  tok = make_tokenizer(config, choice, chat_template)
  scorer = None
  if method.scorer == "reward_model":  # loaded first: a bad directory fails fast
    scorer, reward_vocab = reward_model_scorer(method.reward_model)
  elif method.scorer == "implicit":
    scorer = dera.implicit_reward_scorer()
  elif method.scorer == "mixture":
    scorer = dera.mixture_weight_scorer()
  al, al_p = _load(choice.aligned, "aligned", choice.aligned_why)
  ref, ref_p = _load(choice.reference, "reference", choice.reference_why, choice.warning)
  check_vocabularies(choice, ref, al, tok, config.shared_vocab)
  policy_vocab = {ref.config.vocab_size, al.config.vocab_size}
  if method.scorer == "reward_model" and reward_vocab not in policy_vocab:
    raise SampleError(f"vocabulary mismatch: the reward model {method.reward_model} has "
                      f"vocab_size {reward_vocab}, the policies "
                      f"{' and '.join(map(str, sorted(policy_vocab)))}.")
  try:
    realigner = dera.Realigner(ref, ref_p, al, al_p, max_decode_len=config.max_decode_len,
                               eos_id=tok.eos_id, shared_vocab=config.shared_vocab)
  except ValueError as e:
    raise SampleError(f"the reference {choice.reference} and the aligned model "
                      f"{choice.aligned} do not fit together: {e}") from None
  tokens = encode_prompts(prompts, tok, config, realigner.pad_id)

  # Each call carries batch_size prompts x every value, padded to a fixed shape (one compile).
  per_call, values = config.batch_size, list(method.values)
  value_rows = np.tile(np.asarray(values, np.float32), per_call)
  setting = {"lam" if method.rule == "dera" else "alpha": value_rows}
  n = 1 if method.best_of else config.num_decodes
  records = []
  progress = _progress(len(prompts), len(values), n, method.name, method.best_of)
  for chunk in batching.fixed_size_chunks(len(prompts), per_call):
    first, real = chunk.start, chunk.size
    rows = jnp.asarray(np.repeat(tokens[chunk.rows], len(values), axis=0))
    rng = jax.random.fold_in(jax.random.PRNGKey(seed), first)
    settings = dict(rule=method.rule, temperature=temperature, top_k=config.top_k,
                    top_p=config.top_p, **setting)
    if method.best_of:
      best = jax.device_get(realigner.best_of_n(rows, method.best_of, scorer, rng, **settings))
      out = best.samples
    else:
      out = jax.device_get(realigner.sample(rows, rng=rng, num_decodes=n, **settings))
    for r in range(real * len(values) * n):
      prompt_index = first + r // (len(values) * n)
      record = {"prompt_index": prompt_index, method.name: values[(r // n) % len(values)]}
      if method.best_of:
        record.update(best_of=method.best_of, scorer=method.scorer,
                      candidate_index=int(best.index[r]),
                      score=float(best.scores[r, best.index[r]]),
                      scores=[float(x) for x in best.scores[r]])
      else:
        record["sample_index"] = r % n
      record.update(prompt=prompts[prompt_index], text=tok.decode(out.tokens[r]),
                    length=int(out.lengths[r]), logq=float(out.logq[r]),
                    logp_ref=float(out.logp_ref[r]), logp_aligned=float(out.logp_aligned[r]))
      if out.log_weight is not None:  # DeRa only
        record["log_weight"] = float(out.log_weight[r])
      record["kl_ref"] = float(out.kl_ref[r])
      records.append(record)
    progress.update(first + real)
  files.write_jsonl(output_path, records)  # all lines or none
  return len(records)


def main(argv: Sequence[str]) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)  # JAX's backend probing is noise; warnings stay
  try:
    gin_utils.parse_gin_flags()
    method = parse_method(_RULE.value, _LAM.value, _ALPHA.value, _BEST_OF.value, _SCORER.value,
                          _REWARD_MODEL.value)
    count = run(gin_utils.build(SampleConfig), method, _INPUT.value, _OUTPUT.value, _SEED.value,
                _CHAT_TEMPLATE.value)
  except (SampleError, files.DataError, gin_utils.GinConfigError) as e:
    sys.exit(f"deranj.sample: {e}")
  print(f"wrote {count} samples to {_OUTPUT.value}")


if __name__ == "__main__":
  gin_utils.run(main)
