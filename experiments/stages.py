"""The stages Figures 2, 3 and 7 share: the preset's sampling grid, training the SFT,
aligned and retrained models, sampling DeRa / SIR / every retrained model, the optimum
pi*(beta / lam) from SFT samples, each run's convergence record, and (Figures 3 and 7)
the gold-labelled preference pairs.

Random keys: the DeRa sweep, its importance-resampled version, the SFT samples and each
retrained model draw from their own key (`model_key`: from the run's name, so a model's
samples do not depend on the rest of the grid). No two methods share random numbers.
"""
from __future__ import annotations

import dataclasses
import json
import os
import zlib
from typing import Callable, Optional, Sequence, TYPE_CHECKING

import jax
import numpy as np

from deranj import decoding
from deranj import dera
from deranj import profiling
from deranj import progress as progress_lib
from deranj.data import batching
from deranj.data import preferences
from deranj.data import tokenizer
from deranj.evaluation import optimum
from experiments import common

# deranj.data.pipeline and .tasks import TensorFlow (seconds): imported where used, so that
# scripts/sweep.py prints its commands without it.
if TYPE_CHECKING:
  from deranj.data import pipeline  # pylint: disable=g-bad-import-order

SFT_RUN = "configs/runs/sft.gin"
RM_RUN = "configs/runs/reward_model.gin"
PAIRS = "pairs"
METHODS = ("dera", "retrained", "dera_resampled")
# Streams of the driver's seed; retrained models fold their run name into RETRAINED.
DERA, DERA_RESAMPLED, RETRAINED, SFT, PAIR_SAMPLES = 0, 1, 2, 3, 100
PAIR_LABELS = 101  # numpy streams of the pairs' Bradley-Terry labels (LABEL_RULE)


# ----------------------------------------------------------------------------- grid


@dataclasses.dataclass(frozen=True)
class Grid:
  """A figure's sampling settings, from the preset's `<PREFIX>_*` gin macros."""
  lams: list[float]  # sorted, 1 (the aligned model) included
  prompts: int  # held-out prompts
  samples: int  # samples per prompt and λ
  candidates: int  # SIR candidates per sample
  chunk: int  # rows per sampler call (FIG_CHUNK)
  pair_prompts: int = 0  # Figures 3 and 7: prompts giving training pairs
  val_pair_prompts: int = 0  # ... and held-out pairs
  optimum_samples: int = 0  # SFT samples per prompt for the optimum (<PREFIX>_OPTIMUM_SAMPLES)
  pairs_per_prompt: int = 1  # training pairs per prompt (PAIRS_PER_PROMPT; held out: 1)


def read_grid(preset: str, prefix: str, lams_flag: Optional[str]) -> Grid:
  """The preset's grid for `prefix` (FIG2 or SUMMARIZATION); `--lams` replaces its λs."""
  names = [f"{prefix}_{k}" for k in ("LAMS", "PROMPTS", "SAMPLES", "CANDIDATES")]
  pairs = (["PAIR_PROMPTS", "VAL_PAIR_PROMPTS", "PAIRS_PER_PROMPT"] if prefix == "SUMMARIZATION"
           else [])
  macros = common.preset_macros(preset, names + ["FIG_CHUNK", f"{prefix}_OPTIMUM_SAMPLES"]
                                + pairs)
  if lams_flag is not None:
    lams = common.parse_lams(lams_flag, add_one=True)
  else:
    lams = common.parse_lams(",".join(repr(float(x)) for x in macros[names[0]]),
                             add_one=True, flag=f"{common.PRESET_FILES[preset]}: {names[0]}")
  optimum_samples = int(macros[f"{prefix}_OPTIMUM_SAMPLES"])
  if optimum_samples < 2:
    raise SystemExit(f"error: {common.PRESET_FILES[preset]}: {prefix}_OPTIMUM_SAMPLES = "
                     f"{optimum_samples}: the optimum needs >= 2 SFT samples per prompt "
                     f"(>= {optimum.MIN_ESS:g} for a point to be kept).")
  pair_fields = {}
  if pairs:
    pair_fields = dict(zip(("pair_prompts", "val_pair_prompts", "pairs_per_prompt"),
                           (int(macros[n]) for n in pairs)))
    if pair_fields["pairs_per_prompt"] < 1:
      raise SystemExit(f"error: {common.PRESET_FILES[preset]}: PAIRS_PER_PROMPT = "
                       f"{pair_fields['pairs_per_prompt']}: at least 1.")
  return Grid(lams, *(int(macros[n]) for n in names[1:]), int(macros["FIG_CHUNK"]),
              optimum_samples=optimum_samples, **pair_fields)


# ----------------------------------------------------------------------------- training


class Runs:
  """Numbers the driver's training runs: "run k of n" on each run's first log line."""

  def __init__(self, total: int):
    self.total, self.done = total, 0

  def train(self, run_gin: str, preset: str, model_dir: str, bindings: Sequence[str] = ()
            ) -> bool:
    self.done += 1
    common.log(f"-- run {self.done} of {self.total}: {os.path.basename(model_dir)}")
    return common.train(run_gin, preset, model_dir, bindings)


# ----------------------------------------------------------------------------- sampling


def model_key(rng: jax.Array, model_dir: str) -> jax.Array:
  """A retrained model's own key: its run's name folded into the RETRAINED stream."""
  name = os.path.basename(os.path.normpath(model_dir)).encode()
  return jax.random.fold_in(jax.random.fold_in(rng, RETRAINED), zlib.crc32(name) & 0x7fffffff)


def sample_dera(realigner, prompts, lams, samples, chunk, rng, candidates=0):
  """Tokens [len(lams), P * samples, T] from DeRa (or its importance-resampled version),
  and the SIR effective sample sizes [len(lams), P * samples] (None without SIR)."""
  rows = np.repeat(prompts, len(lams) * samples, axis=0)
  lam_rows = np.tile(np.repeat(np.asarray(lams, np.float32), samples), len(prompts))

  def one(i, enc, lam):
    key = jax.random.fold_in(rng, i)
    if candidates:
      res = realigner.resample(enc, lam, key, num_candidates=candidates)
      return res.samples.tokens, res.ess
    return realigner.sample(enc, lam, key).tokens, None

  progress = progress_lib.Progress(len(rows), "rows", write=common.log,
                                   verb="   sampled SIR" if candidates else "   sampled DeRa")
  tokens, ess = batching.map_in_fixed_batches(one, (rows, lam_rows), chunk, pass_number=True,
                                              on_batch=progress.update)

  def by_lam(x):  # rows prompt-major, then lam, then sample -> [lam, prompt * sample, ...]
    x = x.reshape((len(prompts), len(lams), samples) + x.shape[1:])
    return np.swapaxes(x, 0, 1).reshape((len(lams), len(prompts) * samples) + x.shape[3:])

  return by_lam(tokens), (by_lam(ess) if ess is not None else None)


def sample_model(model, params, prompts, samples, chunk, max_decode_len, rng):
  """[P * samples, T] tokens, prompt-major; fixed chunk shape, so one compile per model
  object however many parameter sets."""
  return batching.map_in_fixed_batches(
      lambda i, enc: decoding.sample(model, params, enc, jax.random.fold_in(rng, i),
                                     max_decode_len=max_decode_len).tokens,
      (np.repeat(prompts, samples, axis=0),), chunk, pass_number=True)


@dataclasses.dataclass
class Samples:
  """Every method's samples, [len(lams), P * samples, T] each (see METHODS)."""
  tokens: dict[str, np.ndarray]
  ess: np.ndarray  # SIR effective sample sizes [len(lams), P * samples]
  compiles: int  # compilations of DeRa's sampler over the whole sweep


def sample_methods(timer: common.Timer, realigner, model, retrained: Sequence[tuple[str, object]],
                   prompts: np.ndarray, grid: Grid, max_len: int, rng: jax.Array) -> Samples:
  """DeRa over the grid (one compiled sampler), SIR, and each retrained model.

  `retrained`: (model_dir, params) per λ of the grid, λ = 1 being the aligned model.
  """
  # The filter is a jitted function's name: DeRa's sampler.
  with timer("dera_sweep"), profiling.count_compiles("_sample_logit_mixed") as compiles:
    dera, _ = sample_dera(realigner, prompts, grid.lams, grid.samples, grid.chunk,
                          jax.random.fold_in(rng, DERA))
  with timer("dera_resampled"):
    sir, ess = sample_dera(realigner, prompts, grid.lams, grid.samples, grid.chunk,
                           jax.random.fold_in(rng, DERA_RESAMPLED), candidates=grid.candidates)
  with timer("retrained_sampling"):
    tokens = []
    for k, (model_dir, params) in enumerate(retrained):
      common.log(f"   sampling {k + 1} of {len(retrained)}: {os.path.basename(model_dir)}")
      tokens.append(sample_model(model, params, prompts, grid.samples, grid.chunk, max_len,
                                 model_key(rng, model_dir)))
  return Samples({"dera": dera, "retrained": np.stack(tokens), "dera_resampled": sir}, ess,
                 compiles.count)


def sample_sft(model, params, prompts: np.ndarray, grid: Grid, max_len: int,
               rng: jax.Array) -> np.ndarray:
  """[P * M, T] SFT samples, M = grid.optimum_samples per prompt (prompt-major), from the
  SFT stream of the driver's seed: the optimum's importance samples (and the first
  `grid.samples` of each prompt serve as the SFT samples the judges compare against)."""
  return sample_model(model, params, prompts, max(grid.optimum_samples, grid.samples),
                      grid.chunk, max_len, jax.random.fold_in(rng, SFT))


def first_samples(rows: np.ndarray, num_prompts: int, k: int) -> np.ndarray:
  """The first k samples of each prompt from prompt-major rows [P * M, ...]."""
  rows = np.asarray(rows)
  return rows.reshape((num_prompts, -1) + rows.shape[1:])[:, :k].reshape(
      (num_prompts * k,) + rows.shape[1:])


def optimum_points(rewards: np.ndarray, values: dict, betas: Sequence[float],
                   samples_per_prompt: int) -> list[dict]:
  """Per beta, E_{pi*(beta)}[f] for each f in `values` from SFT samples with `rewards`
  (deranj.evaluation.optimum): {"beta", f's name: value or None, "ess_mean", "ess_min",
  "left_out", "reason"}."""
  points = []
  for beta in betas:
    est = optimum.expectations(rewards, values, beta, samples_per_prompt)
    points.append({"beta": est.beta, **est.values, "ess_mean": est.ess_mean,
                   "ess_min": est.ess_min, "left_out": est.left_out, "reason": est.reason})
  return points


def optimum_method(samples_per_prompt: int, num_prompts: int, reward: str) -> dict:
  """What figN.json says about how its optimum curve was computed."""
  return {
      "method": "self-normalised importance sampling of the SFT model's own samples: "
                "E_{pi*(b)}[f] = E_sft[f exp(r / b)] / E_sft[exp(r / b)] per prompt (float64, "
                "log space), averaged over prompts, at b = beta / lam",
      "reward": reward, "sft_samples_per_prompt": int(samples_per_prompt),
      "num_prompts": int(num_prompts), "min_ess": optimum.MIN_ESS,
      "left_out_rule": "a point is left out (its values null) when any prompt's effective "
                       "sample size 1 / sum w_i^2 is below min_ess; ESS does not see mass "
                       "pi*(b) puts on responses the SFT samples never hit"}


# ----------------------------------------------------------------------------- convergence

# A run is "at a plateau" when, over its last PLATEAU_EVALS evaluations, every metric of
# PLATEAU_METRICS[kind] moved (max - min) by at most PLATEAU_RTOL times max(|its mean over
# those evaluations|, PLATEAU_FLOOR): 5% of its size, and at least 0.05 absolute (one unit,
# a nat of KL or the length reward's whole range, is the floor of "its size"). The drivers
# evaluate each alignment run every ceil(steps / EVALS_PER_RUN) steps and at its end: at
# most EVALS_PER_RUN times (4 on the smoke preset's 8 steps).
EVALS_PER_RUN = 5
PLATEAU_EVALS = 3
PLATEAU_RTOL = 0.05
PLATEAU_FLOOR = 1.0
# DPO's held-out margin in the policy's own units: rewards/margins is beta x the log-ratio
# margin, so at a small beta it stays under any fixed tolerance however far the policy
# moves; run_record adds this to each DPO evaluation.
LOGRATIO_MARGINS = "logratio/margins"
PLATEAU_METRICS = {"ppo": ("objective/scores", "objective/kl"),
                   "pg": ("objective/scores", "objective/kl"),
                   "pg_length": ("objective/scores", "objective/kl"),
                   "rwl_length": ("objective/scores", "objective/kl"),
                   "dpo": ("loss", LOGRATIO_MARGINS)}  # DPO evaluates held-out pairs
# kind: ppo (ppo_length.gin), pg (pg_reward.gin), pg_length (pg_length.gin), rwl_length
# (rwl_length.gin), dpo (dpo.gin).
STEPS_MACROS = {"ppo": "PPO_STEPS", "pg": "PG_STEPS", "pg_length": "PG_LENGTH_STEPS",
                "rwl_length": "RWL_LENGTH_STEPS",
                "dpo": "DPO_STEPS"}
PLATEAU_RULE = (f"over the last {PLATEAU_EVALS} evaluations each of the run's plateau metrics "
                f"moved (max - min) by at most {PLATEAU_RTOL:g} x max(|mean|, "
                f"{PLATEAU_FLOOR:g}); runs are evaluated every ceil(steps / {EVALS_PER_RUN}) steps "
                "and at their last")


# DPO_LR_REFERENCE_BETA (a preset macro; None or absent: off): a DPO run at beta trains at
# DPO_LEARNING_RATE x DPO_LR_REFERENCE_BETA / beta. Adam's step does not grow with the
# loss's scale, while the log-ratios of DPO's optimum grow as 1 / beta: at one rate and
# budget, the runs at small beta stop short of theirs.
LR_REFERENCE_MACRO = "DPO_LR_REFERENCE_BETA"


def beta_bindings(preset: str, kind: str, beta: float) -> list[str]:
  """The gin bindings of a `kind` run at `beta`: BETA, and for DPO under the preset's
  LR_REFERENCE_MACRO its learning rate scaled by reference / beta."""
  bindings = [f"BETA = {beta!r}"]
  if kind != "dpo":
    return bindings
  macros = common.preset_macros(preset, [LR_REFERENCE_MACRO, "DPO_LEARNING_RATE"],
                                defaults={LR_REFERENCE_MACRO: None})
  reference = macros[LR_REFERENCE_MACRO]
  if reference is None:
    return bindings
  if not (isinstance(reference, (int, float)) and reference > 0):
    raise SystemExit(f"error: {common.PRESET_FILES[preset]}: {LR_REFERENCE_MACRO} = "
                     f"{reference!r}: expected None or a positive number.")
  return bindings + [f"DPO_LEARNING_RATE = {macros['DPO_LEARNING_RATE'] * reference / beta!r}"]


# Reward-weighted runs (rwl_length.gin) of one workdir share one pool of SFT samples.
RWL_POOL_FILE = "rwl_pool.npz"


def pool_bindings(workdir: str, kind: str) -> list[str]:
  """For rwl_length runs, the binding that points them at the workdir's shared pool."""
  if kind != "rwl_length":
    return []
  return [f"RWL_CANDIDATES_FILE = '{os.path.join(os.path.abspath(workdir), RWL_POOL_FILE)}'"]


def eval_bindings(preset: str, kind: str, steps: Optional[int] = None) -> list[str]:
  """The gin binding that evaluates a `kind` run up to EVALS_PER_RUN times, evenly
  (over `steps`, or the preset's STEPS_MACROS[kind] when None)."""
  if steps is None:
    steps = int(common.preset_macros(preset, [STEPS_MACROS[kind]])[STEPS_MACROS[kind]])
  return [f"train.eval_every = {max(1, -(-steps // EVALS_PER_RUN))}"]


def plateau_test(evals: Sequence[dict], metrics: Sequence[str]) -> dict:
  """Whether `evals` (`common.read_evals`) end on a plateau of `metrics` (see PLATEAU_RULE):
  {"passed", "steps" (the window's), "moved" and "tolerance" per metric, "reason"}."""
  out = {"passed": False, "steps": [e["step"] for e in evals[-PLATEAU_EVALS:]], "moved": {},
         "tolerance": {}, "reason": None}
  if len(evals) < PLATEAU_EVALS:
    out["reason"] = f"{len(evals)} evaluation(s) logged, {PLATEAU_EVALS} needed"
    return out
  failed = []
  for name in metrics:
    values = [e.get(name) for e in evals[-PLATEAU_EVALS:]]
    if any(v is None for v in values):
      failed.append(f"{name} not logged")
      continue
    moved = float(max(values) - min(values))
    tolerance = PLATEAU_RTOL * max(abs(float(np.mean(values))), PLATEAU_FLOOR)
    out["moved"][name], out["tolerance"][name] = moved, tolerance
    if not moved <= tolerance:
      failed.append(f"{name} moved {moved:.3g} > {tolerance:.3g}")
  out["passed"] = not failed
  if failed:
    out["reason"] = (f"over steps {out['steps'][0]}..{out['steps'][-1]}: "
                     + "; ".join(failed))
  return out


def run_record(model_dir: str, kind: str, beta: float, reward: str,
               optimum_reward: Optional[float], run_reward: Optional[float]) -> dict:
  """A run's convergence: its evaluations, final reward / KL / KL to the optimum (None
  where its objective does not log them), its gap to the optimum and its plateau test.

  `reward`: the reward the run optimises, named; `optimum_reward`: pi*(beta)'s expected
  value of it (None when left out), `run_reward`: the run's samples' mean of it on the
  same prompts; gap = optimum - run (> 0: short of the optimum).
  """
  evals = common.read_evals(model_dir)
  if kind == "dpo":
    evals = [{**e, LOGRATIO_MARGINS: e["rewards/margins"] / beta} if "rewards/margins" in e
             else e for e in evals]
  last = evals[-1] if evals else {}
  gap = (optimum_reward - run_reward
         if optimum_reward is not None and run_reward is not None else None)
  return {
      "run": os.path.basename(os.path.normpath(model_dir)), "kind": kind, "beta": beta,
      "evals": evals,
      "final_step": last.get("step"),
      "final_reward": last.get("objective/scores"),  # the trained reward, eval prompts
      "final_kl": last.get("objective/kl"),
      "final_kl_to_optimum": last.get("objective/kl_to_optimum"),
      "gap_to_optimum": {"reward": reward, "optimum": optimum_reward, "run": run_reward,
                         "gap": gap},
      "plateau": plateau_test(evals, PLATEAU_METRICS[kind]),
  }


def warn_unconverged(records: Sequence[dict]) -> None:
  """A printed warning per run that failed its plateau test."""
  for r in records:
    if not r["plateau"]["passed"]:
      common.log(f"warning: {r['run']} (beta = {r['beta']:.4g}) is not at a plateau "
                 f"({r['plateau']['reason']}): its points are not a model trained to "
                 "convergence at that beta.")


# ----------------------------------------------------------------------------- pairs


class Context:
  """What a summarization driver's `train_aligned` needs: preset, work directory, runs."""

  def __init__(self, preset: str, workdir: str, runs: Optional[Runs] = None):
    self.preset = preset
    self.workdir = workdir
    self.runs = runs or Runs(0)
    self.sft_dir = common.run_dir(workdir, "sft")
    self.gold_dir = common.run_dir(workdir, "gold_rm")
    self.pairs_dir = os.path.join(workdir, PAIRS)

  def train(self, run_gin: str, model_dir: str, bindings: Sequence[str] = ()) -> bool:
    return self.runs.train(run_gin, self.preset, model_dir, bindings)

  def pair_bindings(self) -> list[str]:
    """The `preference_pairs` task over this work directory's labelled pairs."""
    return ["PREFERENCE_TASK = 'preference_pairs'",
            f"preference_pairs_dir.path = '{self.pairs_dir}'"]


# How make_pairs labels a pair, written to DIR/pairs/labels.json and the figures' JSON.
LABEL_RULE = ("bradley_terry: of two SFT samples, the first is chosen with probability "
              "sigmoid(r_gold(a) - r_gold(b)), one draw per pair from numpy's "
              f"default_rng([seed, {PAIR_LABELS}, split, pair]); equal rewards are a coin "
              "flip and no pair is dropped")
LABELS_FILE = "labels.json"


def bradley_terry_choices(scores_a, scores_b, seed: Sequence[int]) -> np.ndarray:
  """[N] bool, True where pair i's first response is chosen: with probability
  sigmoid(scores_a[i] - scores_b[i]), drawn by pair i's own generator
  `default_rng([*seed, i])`, so a pair's label does not depend on the other pairs.

  Labels drawn from the gold reward's Bradley-Terry model, not argmax: on
  deterministic labels the Bradley-Terry fit is unbounded and DPO has no optimum that
  depends on beta.
  """
  margin = np.asarray(scores_a, np.float64) - np.asarray(scores_b, np.float64)
  p_first = 0.5 * (1.0 + np.tanh(0.5 * margin))  # sigmoid, without overflow
  draws = np.array([np.random.default_rng([*seed, i]).random() for i in range(len(margin))])
  return draws < p_first


def label_pairs(prompts: Sequence[str], responses_a: Sequence[str],
                responses_b: Sequence[str], scores_a, scores_b, seed: Sequence[int],
                ids: Optional[tuple[Sequence, Sequence, Sequence]] = None
                ) -> list[preferences.PreferencePair]:
  """Pairs of responses -> PreferencePairs labelled by `bradley_terry_choices`.

  `ids`: (prompt ids, ids of a, ids of b), one id tuple per pair each, kept on the
  pairs so that training sees the sampled ids (see `preferences`).
  """
  scores_a, scores_b = np.asarray(scores_a, np.float64), np.asarray(scores_b, np.float64)
  n = len(prompts)
  sizes = [len(responses_a), len(responses_b), len(scores_a), len(scores_b),
           *(len(x) for x in ids or ())]
  if any(size != n for size in sizes):
    raise ValueError(f"{n} prompts, {len(responses_a)} and {len(responses_b)} responses, "
                     f"{len(scores_a)} and {len(scores_b)} scores"
                     f"{', ids ' + str([len(x) for x in ids]) if ids else ''}: give one "
                     "of each per pair.")
  first = bradley_terry_choices(scores_a, scores_b, seed)
  ids = ids or ([None] * n,) * 3
  pairs = []
  for i in range(n):
    order = (0, 1) if first[i] else (1, 0)
    texts, sides = (responses_a[i], responses_b[i]), (ids[1][i], ids[2][i])
    pairs.append(preferences.PreferencePair(
        prompt=prompts[i], chosen=texts[order[0]], rejected=texts[order[1]],
        prompt_ids=ids[0][i], chosen_ids=sides[order[0]], rejected_ids=sides[order[1]]))
  return pairs


def documents(split: pipeline.Split) -> list[str]:
  """The raw prompts of a summarization split (the task adds the prefix back)."""
  from deranj.data import tasks  # pylint: disable=g-import-not-at-top
  return [x[len(tasks.PREFIX):] if x.startswith(tasks.PREFIX) else x
          for x in split.texts["inputs"]]


def decode_all(tokens: np.ndarray) -> list[str]:
  return [tokenizer.decode(row) for row in np.asarray(tokens)]


def reused_probe_pairs(pairs_dir: str, pairs_per_prompt: int,
                       source: Optional[str] = None) -> dict:
  """The training split's statistics of pairs a probe made earlier in `pairs_dir`, marked
  reused; exits when they were made with another pair count (or from another `source`
  directory): the run trained on them would be skipped as finished."""
  path = os.path.join(pairs_dir, LABELS_FILE)
  if not os.path.isfile(path):
    raise SystemExit(f"error: {pairs_dir} has pairs but no {LABELS_FILE}: give another --out.")
  with open(path) as f:
    stats = json.load(f)["train"]
  if stats["pairs_per_prompt"] != pairs_per_prompt or stats.get("from") != source:
    made_from, asked_from = ((f" from {stats.get('from')}", f" from {source}") if source
                             else ("", ""))
    raise SystemExit(f"error: {pairs_dir} holds {stats['pairs_per_prompt']} pair(s) per "
                     f"prompt{made_from}, not --pairs_per_prompt {pairs_per_prompt}"
                     f"{asked_from}: give another --out.")
  return {**stats, "reused": True}


def check_labels_file(pairs_dir: str) -> dict:
  """The reused pairs' labels.json; a one-line error when they were labelled otherwise."""
  path = os.path.join(pairs_dir, LABELS_FILE)
  labels = {}
  if os.path.isfile(path):
    with open(path) as f:
      labels = json.load(f)
  if labels.get("rule") != LABEL_RULE:
    raise SystemExit(
        f"error: {pairs_dir}: these preference pairs were not labelled by the current rule "
        f"({labels.get('rule', 'no ' + LABELS_FILE + ', an older labelling')}); delete "
        "the pairs directory and the runs trained on them (proxy_rm, pg_*, dpo_*) to "
        "label them again.")
  return labels


def sampled_pairs(sft, gold, data, pairs_per_prompt: int, chunk: int, max_len: int,
                  rng: jax.Array, seed: Sequence[int]) -> tuple[list, dict]:
  """`pairs_per_prompt` pairs of SFT samples per prompt of `data` (a pipeline split),
  prompt-major, labelled by `label_pairs` with `seed`; and their statistics."""
  model, params = sft
  prompts, k = data.features["prompts"], pairs_per_prompt
  # 2k samples per prompt, rows prompt-major: a = even rows, b = odd rows.
  tokens = sample_model(model, params, prompts, 2 * k, chunk, max_len, rng)
  scores = gold.rewards(np.repeat(prompts, 2 * k, axis=0), tokens)
  texts = decode_all(tokens)
  ids = [preferences.sampled_ids(row) for row in tokens]
  docs = [d for d in documents(data) for _ in range(k)]
  prompt_ids = [preferences.sampled_ids(p) for p in np.repeat(prompts, k, axis=0)]
  pairs = label_pairs(docs, texts[0::2], texts[1::2], scores[0::2], scores[1::2], seed=seed,
                      ids=(prompt_ids, ids[0::2], ids[1::2]))
  margin = scores[0::2] - scores[1::2]
  chosen_is_a = np.array([p.chosen_ids == a for p, a in zip(pairs, ids[0::2])])
  return pairs, {
      "prompts": int(len(prompts)), "pairs": len(pairs), "pairs_per_prompt": k,
      "mean_abs_gold_margin": float(np.mean(np.abs(margin))),
      # How noisy the labels are: pairs whose chosen response has the lower gold reward.
      "chosen_lower_gold": float(np.mean(np.where(chosen_is_a, margin < 0, margin > 0))),
      "identical_pairs": int(sum(a == b for a, b in zip(ids[0::2], ids[1::2]))),
  }


def make_pairs(ctx: Context, macros: dict, grid: Grid, sft, gold, rng: jax.Array,
               seed: int) -> dict:
  """Writes DIR/pairs/{train,validation}.jsonl and labels.json unless they exist;
  returns the labelling rule and each split's statistics.

  grid.pairs_per_prompt pairs of SFT samples per prompt of the TASK's train split, one
  per prompt of its validation split, labelled by Bradley-Terry on the gold reward
  (`label_pairs`, LABEL_RULE, seeded by `seed`); the pairs keep the sampled token ids.
  """
  from deranj.data import pipeline  # pylint: disable=g-import-not-at-top,redefined-outer-name
  splits = (("train", grid.pair_prompts, grid.pairs_per_prompt),
            ("validation", grid.val_pair_prompts, 1))
  paths = [os.path.join(ctx.pairs_dir, f"{split}.jsonl") for split, _, _ in splits]
  if all(os.path.isfile(p) for p in paths):
    labels = check_labels_file(ctx.pairs_dir)
    made = labels.get("train", {}).get("pairs_per_prompt", 1)
    if made != grid.pairs_per_prompt:
      raise SystemExit(
          f"error: {ctx.pairs_dir}: these pairs were made with {made} pair(s) per training "
          f"prompt, the preset asks for PAIRS_PER_PROMPT = {grid.pairs_per_prompt}; delete "
          "the pairs directory and the runs trained on them (proxy_rm, pg_*, dpo_*) to "
          "make them again.")
    for (split, _, _), path in zip(splits, paths):
      labels[split] = {**labels.get(split, {}), "pairs": len(preferences.read_pairs(path)),
                       "reused": True}
    return labels
  lengths = {"inputs": macros["INPUTS_LENGTH"], "targets": macros["TARGETS_LENGTH"]}
  labels = {"rule": LABEL_RULE, "seed": seed}
  labelled = []
  for i, (split, size, k) in enumerate(splits):
    data = pipeline.load(macros["TASK"], split, lengths, max_examples=size)
    common.log(f"   labelling {k} SFT sample pair(s) for each of "
               f"{len(data.features['prompts'])} {split} prompts")
    pairs, labels[split] = sampled_pairs(sft, gold, data, k, grid.chunk,
                                         macros["TARGETS_LENGTH"], jax.random.fold_in(rng, i),
                                         seed=(seed, PAIR_LABELS, i))
    labelled.append(pairs)
  # labels.json first: pairs files without it would read as an older labelling.
  common.write_json(os.path.join(ctx.pairs_dir, LABELS_FILE), labels)
  for path, pairs in zip(paths, labelled):
    preferences.write_pairs(path, pairs)
  return labels


# ----------------------------------------------------------------------------- seeds


def across_seeds(per_seed: Sequence[dict], value: Callable[[dict], float],
                 agreement: str) -> dict:
  """The spread over seeds (common.spread: n, mean, sample std (n - 1), min, max) of a
  figure's per-seed results: per λ of `value(row[method])` for each method, and of each
  seed's Spearman ρ (undefined ones left out) and mean |Δ| in `agreement[agreement]`."""
  agree = [s["agreement"][agreement] for s in per_seed]
  rho = [a["spearman"] for a in agree]
  mad = [a["mean_abs_difference"] for a in agree]
  return {
      "seeds": [s["seed"] for s in per_seed],
      "per_lam": [{"lam": row["lam"], **{
          m: common.spread([value(s["per_lam"][i][m]) for s in per_seed]) for m in METHODS}}
          for i, row in enumerate(per_seed[0]["per_lam"])],
      "spearman": {"per_seed": rho, **common.spread(rho)},
      "mean_abs_difference": {"per_seed": mad, **common.spread(mad)},
  }


def report_across_seeds(spread: dict, what: str) -> None:
  """Prints `across_seeds`: a table of `what` per λ and method, then ρ and mean |Δ| per seed."""
  seeds = ",".join(map(str, spread["seeds"]))
  common.log(f"\nover seeds {seeds}: {what}, mean ± sd (n - 1) [min, max]\n\n"
             "| λ | DeRa | retrained | DeRa+SIR |\n|---|---|---|---|")
  for r in spread["per_lam"]:
    common.log(f"| {r['lam']:.4g} | {common.mean_sd_text(r['dera'])} | "
               f"{common.mean_sd_text(r['retrained'])} | "
               f"{common.mean_sd_text(r['dera_resampled'])} |")
  rho, mad = spread["spearman"], spread["mean_abs_difference"]
  rhos = ", ".join("n/a" if x is None else f"{x:.3f}" for x in rho["per_seed"])
  common.log(f"\nper seed: Spearman ρ(DeRa, retrained) = {rhos} (mean "
             f"{'n/a' if rho['mean'] is None else format(rho['mean'], '.3f')}); mean |Δ| = "
             f"{', '.join(f'{x:.3f}' for x in mad['per_seed'])} (mean {mad['mean']:.3f})")


# The keys of a figure's JSON that are one seed's (the first seed's with --seeds).
SEED_KEYS = ("per_lam", "runs", "all_runs_at_plateau", "agreement", "lam_picked",
             "dera_sweep_compiles")


def seed_fields(first: dict) -> dict:
  """A figure's JSON fields from one seed's results (SEED_KEYS it has), and the plateau rule."""
  return {**{k: first[k] for k in SEED_KEYS if k in first}, "plateau_rule": PLATEAU_RULE}


def seeds_fields(seeds: Sequence[int], per_seed: list[dict], spread: dict,
                 per_seed_has: str, shared: str) -> dict:
  """The fields `--seeds` adds: the seeds, a note on what is whose, `per_seed`, `across_seeds`."""
  kept = ", ".join(k for k in SEED_KEYS if k in per_seed[0])
  return {"seeds": list(seeds),
          "first_seed_note": (f"{kept} are seed {seeds[0]}'s (the first of seeds); per_seed "
                              f"has every seed's ({per_seed_has}), across_seeds their "
                              f"spread; {shared}"),
          "per_seed": per_seed, "across_seeds": spread}


def seed_models(realigner: Optional[dera.Realigner], ref, ref_params, run_dirs: Sequence[str],
                lams: Sequence[float], max_len: int) -> tuple[dera.Realigner, list]:
  """One seed's retrained params (per λ of `run_dirs`; λ = 1 is the aligned model) and the
  realigner of (SFT, aligned): built on the first call, later given this seed's params
  (the same models: its compiled sampler is reused)."""
  retrained = [common.load_policy(d)[1] for d in run_dirs]
  aligned = retrained[list(lams).index(1.0)]
  if realigner is None:
    realigner = dera.Realigner(ref, ref_params, ref, aligned, max_decode_len=max_len)
  else:
    realigner.params = (ref_params, aligned)
  return realigner, retrained


def write_figure(workdir: str, name: str, result: dict, plot: Callable[[dict, str], None],
                 report: Callable[[dict], None], records: Sequence[dict]) -> None:
  """`<workdir>/<name>.json` and `.png`, the printed table, a warning per run of
  `records` not at a plateau, and where the files are."""
  json_path, png_path = (os.path.join(workdir, f"{name}.{x}") for x in ("json", "png"))
  common.write_json(json_path, result)
  plot(result, png_path)
  report(result)
  warn_unconverged(records)
  common.log(f"figure: {png_path}\nnumbers: {json_path}")
