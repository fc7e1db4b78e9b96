"""What the figure drivers share: gin-driven training runs that are skipped when finished,
preset macros, λ grids, agreement numbers, JSON and PNG (stages.py builds on these).

A driver's work directory holds one MODEL_DIR per training run (`sft`, `<kind>_beta<β>`,
`<kind>_beta<β>_seed<s>` for seeds s > 0), then `figN.json` and `figN.png`. Re-running a driver skips every run whose final model
is present, so an interrupted sweep picks up where it stopped.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shlex
import struct
import sys
import time
from typing import Any, Iterable, Optional, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import gin  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from deranj import dera  # noqa: E402
from deranj import gin_utils  # noqa: E402
from deranj.data import files  # noqa: E402
from deranj.models import loading  # noqa: E402
from deranj.training import checkpoints  # noqa: E402
from deranj.training import trainer  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESET_FILES = {name: f"configs/presets/{name}.gin"
                for name in ("smoke", "demo", "tiny", "tiny_pairs32", "tiny_pairs32_betalr",
                             "paper")}
# A configs/models/ file read after the preset in every run (a driver's --model_gin).
_MODEL_GIN: list[str] = []


@contextlib.contextmanager
def model_gin(path: Optional[str]):
  """Training runs inside the block read `path` after the preset (None: the preset's model).

  Restored on exit, so a later driver in the same process (a test session) trains the
  model its own preset names.
  """
  saved = list(_MODEL_GIN)
  _MODEL_GIN[:] = [path] if path else []
  try:
    yield
  finally:
    _MODEL_GIN[:] = saved


def log(text: str) -> None:
  print(text, flush=True)


class Timer:
  """Wall seconds per named stage."""

  def __init__(self):
    self.seconds: dict[str, float] = {}

  @contextlib.contextmanager
  def __call__(self, stage: str):
    start = time.time()
    log(f"== {stage}")
    try:
      yield
    finally:
      self.seconds[stage] = round(self.seconds.get(stage, 0.0) + time.time() - start, 2)


def preset_macros(preset: str, names: Sequence[str],
                  defaults: Optional[dict[str, Any]] = None) -> dict[str, Any]:
  """Values of gin macros (e.g. TASK, L_MIN) as the preset file sets them; a name of
  `defaults` the preset does not set gets its default."""
  defaults = defaults or {}
  gin.clear_config()
  try:
    gin_utils.parse_gin([PRESET_FILES[preset]], [])
    out = {}
    for name in names:
      try:
        out[name] = gin.query_parameter(f"%{name}")
      except ValueError:
        if name not in defaults:
          raise
        out[name] = defaults[name]
    return out
  finally:
    gin.clear_config()


def beta_name(beta: float) -> str:
  return f"{beta:.4g}"


def run_dir(workdir: str, kind: str, beta: Optional[float] = None, seed: int = 0) -> str:
  """`<workdir>/<kind>[_beta<β>][_seed<s>]`: seed 0 (the run file's SEED) has no suffix, so
  the figure drivers and scripts/sweep.py find each other's runs."""
  name = kind if beta is None else f"{kind}_beta{beta_name(beta)}"
  return os.path.join(workdir, name if seed == 0 else f"{name}_seed{seed}")


def add_seed_flags(parser, single: str) -> None:
  """--seed (one seed: `single` says what it keys) and --seeds (runs per seed)."""
  parser.add_argument("--seed", type=int, default=None,
                      help=f"one seed (default 0): {single}; the runs keep the run file's SEED")
  parser.add_argument("--seeds", default=None,
                      help="e.g. 0,1,2: aligned and retrained runs per seed (SEED = s, "
                      "scripts/sweep.py's directories), the spread over seeds in the figure")


def seed_list(args) -> list[int]:
  """The seeds `add_seed_flags`' flags ask for; exits with one line when both are given."""
  if args.seed is not None and args.seeds is not None:
    raise SystemExit("error: --seed and --seeds: give one (--seeds=0,1,2 trains every seed).")
  return parse_seeds(args.seeds) if args.seeds is not None else [args.seed or 0]


def parse_seeds(text: str) -> list[int]:
  """`--seeds 0,1,2`; exits with one line on a bad or repeated seed."""
  try:
    seeds = [int(x) for x in text.split(",") if x.strip()]
  except ValueError:
    seeds = None
  if not seeds or any(s < 0 for s in seeds):
    raise SystemExit(f"error: --seeds={text!r}: expected comma-separated integers >= 0, "
                     "e.g. --seeds=0,1,2.")
  if len(set(seeds)) < len(seeds):
    raise SystemExit(f"error: --seeds={text!r}: a seed given more than once.")
  return seeds


def train_bindings(model_dir: str, bindings: Iterable[str]) -> list[str]:
  return [f"MODEL_DIR = '{model_dir}'", *bindings]


def train_command(run_gin: str, preset: str, model_dir: str, bindings: Iterable[str]) -> str:
  """The `python -m deranj.train` command line of a run (what scripts/sweep.py prints)."""
  args = ["python", "-m", "deranj.train", f"--gin_file={run_gin}",
          f"--gin_file={PRESET_FILES[preset]}", *[f"--gin_file={f}" for f in _MODEL_GIN]]
  for binding in train_bindings(model_dir, bindings):
    name, value = (x.strip() for x in binding.split("=", 1))
    if shlex.quote(value) != value and not any(c in value for c in '"$`\\'):
      value = f'"{value}"'  # --gin.MODEL_DIR="'/runs/x'": the shell keeps the gin quotes
    else:
      value = shlex.quote(value)
    args.append(f"--gin.{name}={value}")
  return " ".join(args)


def train(run_gin: str, preset: str, model_dir: str, bindings: Iterable[str] = ()) -> bool:
  """Runs (or resumes) one training run in-process; False when it had already finished."""
  if checkpoints.is_finished(model_dir):
    log(f"   {model_dir}: finished earlier, skipped")
    return False
  log(f"   {train_command(run_gin, preset, model_dir, bindings)}")
  gin.clear_config()
  try:
    gin_utils.parse_gin([run_gin, PRESET_FILES[preset], *_MODEL_GIN],
                        train_bindings(model_dir, bindings))
    trainer.train()
  finally:
    gin.clear_config()
  return True


def load_policy(model_dir: str):
  """(model, params) of a finished run's exported policy."""
  return loading.load_model(os.path.join(model_dir, checkpoints.MODEL_EXPORT_DIR))


EVAL_DIR = "eval"  # where the trainer's MetricsLogger writes a run's evaluations


def read_evals(model_dir: str) -> list[dict[str, float]]:
  """A run's evaluations, [{"step": s, metric: value, ...}] by step, from the TensorBoard
  event files under MODEL_DIR/eval (the last write of a step wins, by its wall time: a
  resumed run may repeat one). [] when the run wrote none. Reads the TFRecord frames directly, without
  TensorFlow; a truncated last record (a run killed mid-write) is ignored."""
  from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
  from tensorboard.util import tensor_util  # pylint: disable=g-import-not-at-top
  directory = os.path.join(model_dir, EVAL_DIR)
  by_step: dict[int, dict[str, float]] = {}
  written: dict[tuple[int, str], float] = {}  # (step, tag): wall time of the value kept
  names = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
  for name in names:  # two files of one second do not sort by name (…9.v2 > …10.v2)
    with open(os.path.join(directory, name), "rb") as f:
      data = f.read()
    i = 0
    while i + 12 <= len(data):  # frame: u64 length, u32 crc, record, u32 crc
      (n,) = struct.unpack("<Q", data[i:i + 8])
      if i + 16 + n > len(data):
        break
      event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
      i += 16 + n
      for value in event.summary.value:
        x = (tensor_util.make_ndarray(value.tensor) if value.HasField("tensor")
             else value.simple_value)
        key = (int(event.step), value.tag)
        if event.wall_time >= written.get(key, -math.inf):
          written[key] = event.wall_time
          by_step.setdefault(key[0], {})[value.tag] = float(x)
  return [{"step": step, **by_step[step]} for step in sorted(by_step)]


def agreement(lams: Sequence[float], dera: Sequence[float], retrained: Sequence[float],
              ) -> dict[str, Any]:
  """How DeRa's metric tracks the retrained models' across λ (higher metric = better)."""
  from deranj.evaluation import win_rates  # pylint: disable=g-import-not-at-top
  dera, retrained = np.asarray(dera, float), np.asarray(retrained, float)
  test = win_rates.spearman_test(dera, retrained)
  finite = np.isfinite(test.rho)
  return {
      # None when either side is constant across λ (no ranking to compare).
      "spearman": test.rho if finite else None,
      "spearman_p": test.p_value if finite else None,  # two-sided, under independence
      "spearman_p_method": test.method,
      "mean_abs_difference": win_rates.mean_abs_difference(dera, retrained),
      "lam_picked_by_dera": float(lams[int(np.argmax(dera))]),
      "lam_picked_by_retrained": float(lams[int(np.argmax(retrained))]),
  }


def spread(values: Sequence[Optional[float]]) -> dict[str, Any]:
  """Over the values given (None: not logged, left out): their number, mean, sample
  standard deviation (n - 1) and range; None where too few."""
  x = np.array([v for v in values if v is not None], np.float64)
  return {"n": int(x.size), "mean": float(x.mean()) if x.size else None,
          "std": float(x.std(ddof=1)) if x.size > 1 else None,
          "min": float(x.min()) if x.size else None, "max": float(x.max()) if x.size else None}


def mean_sd_text(s: dict[str, Any]) -> str:
  """`mean ± sd [min, max]` of a `spread`."""
  sd = "" if s["std"] is None else f" ± {s['std']:.3f}"
  return f"{s['mean']:.3f}{sd} [{s['min']:.3f}, {s['max']:.3f}]"


def spearman_text(agreement: dict[str, Any]) -> str:
  """An `agreement(...)`'s Spearman ρ for a printed line."""
  rho = agreement["spearman"]
  if rho is None:
    return "n/a (a constant side)"
  return f"{rho:.3f} (p = {agreement['spearman_p']:.2f}, {agreement['spearman_p_method']})"


def write_json(path: str, data: Any) -> None:
  """Atomic: the file appears complete or not at all."""
  with files.atomic_write(path) as f:
    json.dump(data, f, indent=2, default=_jsonable, allow_nan=False)


def _jsonable(x):
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  if isinstance(x, (np.ndarray, jax.Array)):
    return np.asarray(x).tolist()
  raise TypeError(f"not JSON-serialisable: {type(x)}")


def save_figure(fig, path: str) -> None:
  with files.atomic_write(path, "wb") as f:
    fig.savefig(f, format=os.path.splitext(path)[1][1:] or "png", dpi=120,
                bbox_inches="tight")


def parse_lams(text: str, *, add_one: bool = False, flag: str = "--lams") -> list[float]:
  """A driver's λ grid, sorted (and with 1, the aligned model, when `add_one`); exits
  with one line on a bad value."""
  try:
    lams = dera.parse_lams(text, positive=True, flag=flag)
  except ValueError as e:
    raise SystemExit(f"error: {e}") from None
  return sorted(set(lams) | ({1.0} if add_one else set()))


def setup_path() -> None:
  if REPO not in sys.path:
    sys.path.insert(0, REPO)
  os.chdir(REPO)  # gin files are given relative to the repository
