r"""The retraining sweep over β (and seeds): print the `python -m deranj.train` commands (to
launch on your own cluster), or run them here one after another, resumably, and write a
summary table of the runs.

    python scripts/sweep.py --run_gin configs/runs/ppo_length.gin --preset tiny \
        --workdir /tmp/deranj/fig2 --init_checkpoint /tmp/deranj/fig2/sft \
        {--beta 0.1 --lams 0.25,0.5,1,2,4 | --betas 0.1,0.05} [--seeds 0,1,2] \
        [--gin.NAME=value ...] [--run | --summary] [--optimum_samples 256]

The grid: KL strengths β/λ for each λ of --lams (--beta 0.1 by default), or the βs of
--betas; times each seed of --seeds (bound to the run file's SEED, which the trainer hashes
with the objective and β). Seed 0 trains in `<workdir>/<kind>_beta<β>` (the directory the
figure drivers read, so a driver started afterwards skips it; kind = ppo | pg_length |
rwl_length | pg | dpo from the run file), seed s > 0 in `<workdir>/<kind>_beta<β>_seed<s>`
(common.run_dir; where
`fig2_length_reward.py --seeds` trains and reads them too). Every run is evaluated
as the figure drivers' are (stages.eval_bindings), enough evaluations for the plateau test.

--run trains the runs in turn, seed by seed: finished runs are skipped and an interrupted
one resumes from its last checkpoint, so the same command picks a sweep up where it
stopped. After it (or with --summary alone, on the runs already there) the sweep writes
`<workdir>/sweep_summary.{json,md}`, per run: β, seed, final reward, KL to the reference,
KL to the optimum (where the objective logs them), plateau yes/no (stages.plateau_test)
and, with --optimum_samples N (the length reward only), the gap to the optimum's expected
reward; per β, the spread over seeds. The markdown table is printed too.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import subprocess
import sys
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from deranj import dera  # noqa: E402
from deranj import gin_utils  # noqa: E402
from deranj.data import files  # noqa: E402
from deranj.training import checkpoints  # noqa: E402
from experiments import common  # noqa: E402  pylint: disable=g-import-not-at-top
from experiments import stages  # noqa: E402

KINDS = {"ppo_length": "ppo", "pg_length": "pg_length", "rwl_length": "rwl_length",
         "pg_reward": "pg", "dpo": "dpo"}
# The trained reward each kind's evaluations log as objective/scores (DPO logs none).
REWARDS = {"ppo": "length reward", "pg_length": "length reward", "rwl_length": "length reward",
           "pg": "the run's reward model", "dpo": "none logged"}
# Where the sweep can estimate the optimum.
LENGTH_REWARD_KINDS = ("ppo", "pg_length", "rwl_length")
# Bindings the sweep makes itself: one extra --gin.NAME would silently undo the grid.
RESERVED = ("MODEL_DIR", "INIT_CHECKPOINT", "BETA", "SEED", "train.model_dir", "train.seed")
SUMMARY = "sweep_summary"  # <workdir>/sweep_summary.{json,md}
GAP_RULE = ("gap = the optimum pi*(beta)'s expected length reward (self-normalised importance "
            "sampling of SFT samples on the run's evaluation prompts) - the run's last "
            "evaluation's objective/scores; > 0: short of the optimum")


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run of the sweep."""
  model_dir: str
  beta: float
  seed: int
  lam: Optional[float]  # None for a --betas grid
  command: str

  @property
  def name(self) -> str:
    return os.path.basename(self.model_dir)


def kind_of(run_gin: str) -> str:
  """ppo | pg_length | rwl_length | pg | dpo for a run file; one line when it is none of
  the retraining runs."""
  stem = os.path.splitext(os.path.basename(run_gin))[0]
  if stem not in KINDS:
    raise SystemExit(f"error: --run_gin={run_gin}: expected one of "
                     f"{[f'configs/runs/{k}.gin' for k in KINDS]}.")
  return KINDS[stem]


def _steps_given(kind: str, extra: Sequence[str]) -> Optional[int]:
  """The run's step count when an extra binding sets the kind's STEPS macro."""
  value = None
  for binding in extra:
    name, given = (x.strip() for x in binding.split("=", 1))
    if name == stages.STEPS_MACROS[kind]:
      value = given
  try:
    return None if value is None else int(value)
  except ValueError:
    return None  # gin names the bad value when the run parses it


def plan(run_gin: str, preset: str, workdir: str, init_checkpoint: Optional[str],
         grid: Sequence[tuple[float, Optional[float]]], seeds: Optional[Sequence[int]],
         extra: Sequence[str]) -> list[Run]:
  """The sweep's runs, seed by seed, for `grid` [(β, λ or None)]; `seeds` None binds no
  SEED (the run file's, 0). `init_checkpoint` None: no INIT_CHECKPOINT binding."""
  kind = kind_of(run_gin)
  workdir = os.path.abspath(workdir)
  evals = stages.eval_bindings(preset, kind, _steps_given(kind, extra))
  names = {}
  for beta, _ in grid:
    name = common.run_dir(workdir, kind, beta)
    if name in names:
      raise SystemExit(f"error: beta = {names[name]!r} and {beta!r} share the run directory "
                       f"{name}: give betas that differ in their first 4 digits.")
    names[name] = beta
  runs = []
  for seed in seeds if seeds is not None else [0]:
    for beta, lam in grid:
      model_dir = common.run_dir(workdir, kind, beta, seed)
      bindings = [*stages.beta_bindings(preset, kind, beta),
                  *([f"SEED = {seed}"] if seeds is not None else []),
                  *evals, *stages.pool_bindings(workdir, kind), *extra]
      if init_checkpoint is not None:
        bindings.insert(0, f"INIT_CHECKPOINT = '{init_checkpoint}'")
      runs.append(Run(model_dir, beta, seed, lam,
                      common.train_command(run_gin, preset, model_dir, bindings)))
  return runs


def commands(run_gin: str, preset: str, workdir: str, init_checkpoint: str, beta: float,
             lams: list[float], extra: list[str]) -> list[tuple[str, str]]:
  """(model_dir, command) per λ of one seed's λ grid at β/λ."""
  return [(r.model_dir, r.command) for r in plan(
      run_gin, preset, workdir, _checkpoint_path(init_checkpoint),
      [(beta / lam, lam) for lam in lams], None, extra)]


def _checkpoint_path(spec: str) -> str:
  return spec if spec == "tiny" else os.path.abspath(spec)  # "tiny": the shipped model


# ----------------------------------------------------------------------------- running


def _launch(run: Run) -> None:
  """Runs one command here (this Python), to its end; one line when it fails."""
  argv = shlex.split(run.command)
  argv[0] = sys.executable
  proc = subprocess.Popen(argv, cwd=common.REPO)
  try:
    code = proc.wait()
  except KeyboardInterrupt:
    proc.wait()  # Ctrl-C reached the run too: it stops between steps, checkpoints intact
    raise SystemExit(f"interrupted in {run.name}: run the same command again to resume the "
                     "sweep.") from None
  if code:
    raise SystemExit(f"error: {run.name} failed (exit status {code}; its error is above). "
                     "Finished runs are kept: run the same command again to resume.")


def run_all(runs: Sequence[Run]) -> None:
  """Runs the unfinished runs in turn; an interrupted one resumes from its checkpoint."""
  for k, run in enumerate(runs, 1):
    head = f"# run {k} of {len(runs)}: {run.name}"
    if checkpoints.is_finished(run.model_dir):
      common.log(f"{head}: finished, skipped")
      continue
    resumes = os.path.isdir(os.path.join(run.model_dir, checkpoints.CHECKPOINTS_DIR))
    common.log(f"{head}{' (resumes from its last checkpoint)' if resumes else ''}\n"
               f"# {run.command}")
    _launch(run)


# ----------------------------------------------------------------------------- optimum


def _run_macros(run_gin: str, preset: str, run: Run, names: Sequence[str]) -> dict:
  """Gin macros as a run sees them (run file, preset and the run's bindings)."""
  import gin  # pylint: disable=g-import-not-at-top
  bindings = shlex.split(run.command)[3:]
  bindings = [b[len("--gin_bindings="):] for b in gin_utils.rewrite_gin_args(bindings)
              if b.startswith("--gin_bindings=")]
  gin.clear_config()
  try:
    gin_utils.parse_gin([run_gin, common.PRESET_FILES[preset]], bindings)
    return {name: gin.query_parameter(f"%{name}") for name in names}
  except gin_utils.GinConfigError as e:
    raise SystemExit(f"error: {e}") from None
  finally:
    gin.clear_config()


def estimate_optimum(run_gin: str, preset: str, runs: Sequence[Run], init_checkpoint: str,
                     samples: int) -> dict:
  """The optimum π*(β) under the length reward at every β of the sweep, from `samples`
  samples of the SFT model per evaluation prompt (the trainer's: EVAL_EXAMPLES of the
  validation split), as Figure 2's optimum curve: {method..., "points": [per β]}."""
  import jax  # pylint: disable=g-import-not-at-top
  from deranj.data import pipeline  # pylint: disable=g-import-not-at-top
  from deranj.models import loading  # pylint: disable=g-import-not-at-top
  from experiments import fig2_length_reward  # pylint: disable=g-import-not-at-top
  m = _run_macros(run_gin, preset, runs[0], ["TASK", "INPUTS_LENGTH", "TARGETS_LENGTH",
                                             "EVAL_EXAMPLES", "L_MIN", "L_MAX", "FIG_CHUNK"])
  try:
    model, params = loading.load_model(init_checkpoint)
  except loading.ModelLoadError as e:
    raise SystemExit(f"error: --init_checkpoint: {e}") from None
  lengths = {"inputs": m["INPUTS_LENGTH"], "targets": m["TARGETS_LENGTH"]}
  prompts = pipeline.load(m["TASK"], "validation", lengths,
                          max_examples=m["EVAL_EXAMPLES"]).features["prompts"]
  common.log(f"# the optimum: {samples} SFT samples on each of {len(prompts)} evaluation "
             "prompts")
  tokens = stages.sample_model(model, params, prompts, samples, m["FIG_CHUNK"],
                               m["TARGETS_LENGTH"],
                               jax.random.fold_in(jax.random.PRNGKey(0), stages.SFT))
  betas = sorted({r.beta for r in runs})
  return fig2_length_reward.optimum_curve(tokens, len(prompts), betas, m["L_MIN"], m["L_MAX"])


# ----------------------------------------------------------------------------- summary


def summarize(runs: Sequence[Run], kind: str, optimum: Optional[dict] = None) -> dict:
  """Each existing run's convergence record (stages.run_record) with its seed and λ, the
  gap to `optimum`'s expected reward (estimate_optimum) where given, and per β the spread
  over seeds. Runs never started are listed under "missing"."""
  points = {p["beta"]: p for p in (optimum or {}).get("points", [])}
  records, missing = [], []
  for run in runs:
    if not os.path.isdir(run.model_dir):
      missing.append(run.name)
      continue
    point = points.get(run.beta)
    record = stages.run_record(run.model_dir, kind, run.beta, REWARDS[kind], None, None)
    if point is not None:  # the run's own reward: its last evaluation's
      gap = record["gap_to_optimum"]
      gap.update(optimum=point["length_reward"], run=record["final_reward"],
                 ess_min=point["ess_min"], left_out_reason=point["reason"])
      if gap["optimum"] is not None and gap["run"] is not None:
        gap["gap"] = gap["optimum"] - gap["run"]
    records.append({**record, "seed": run.seed, "lam": run.lam,
                    "finished": checkpoints.is_finished(run.model_dir)})
  by_beta = []
  for beta in sorted({r["beta"] for r in records}):
    rows = [r for r in records if r["beta"] == beta]
    by_beta.append({
        "beta": beta, "seeds": [r["seed"] for r in rows],
        **{key: common.spread([r[key] for r in rows]) for key in ("final_reward", "final_kl")},
        "gap": common.spread([r["gap_to_optimum"]["gap"] for r in rows]),
        "at_plateau": sum(r["plateau"]["passed"] for r in rows)})
  return {"kind": kind, "plateau_rule": stages.PLATEAU_RULE,
          "optimum": None if optimum is None else {**optimum, "gap_rule": GAP_RULE},
          "runs": records, "by_beta": by_beta, "missing": missing}


def _num(x: Optional[float], digits: int = 3) -> str:
  return "–" if x is None else f"{x:.{digits}f}"


def _mean_sd(s: dict) -> str:
  if s["mean"] is None:
    return "–"
  return _num(s["mean"]) + ("" if s["std"] is None else f" ± {s['std']:.3f}")


def markdown(summary: dict) -> str:
  """The summary's tables: one row per run, then (several seeds) the spread per β."""
  gap = summary["optimum"] is not None
  head = ["run", "β", "seed", "step", "finished", "reward", "KL", "KL to optimum"]
  head += ["gap to optimum"] if gap else []
  lines = ["| " + " | ".join(head + ["plateau"]) + " |", "|---" * (len(head) + 1) + "|"]
  for r in summary["runs"]:
    cells = [r["run"], f"{r['beta']:.4g}", str(r["seed"]),
             "–" if r["final_step"] is None else str(r["final_step"]),
             "yes" if r["finished"] else "no", _num(r["final_reward"]), _num(r["final_kl"]),
             _num(r["final_kl_to_optimum"])]
    if gap:
      g = r["gap_to_optimum"]
      cells.append(_num(g["gap"]) if g.get("left_out_reason") is None
                   else f"left out (ESS {g['ess_min']:.1f})")
    lines.append("| " + " | ".join(cells + ["yes" if r["plateau"]["passed"] else "no"]) + " |")
  lines += ["", f"plateau: {summary['plateau_rule']}."]
  lines += [f"- {r['run']}: not at a plateau: {r['plateau']['reason']}"
            for r in summary["runs"] if not r["plateau"]["passed"]]
  if gap:
    lines.append(f"gap to optimum: {GAP_RULE}.")
  if any(len(b["seeds"]) > 1 for b in summary["by_beta"]):
    lines += ["", "| β | seeds | reward (mean ± sd) | KL (mean ± sd) | "
              + ("gap (mean ± sd) | " if gap else "") + "at plateau |",
              "|---|---|---|---|" + ("---|" if gap else "") + "---|"]
    for b in summary["by_beta"]:
      cells = [f"{b['beta']:.4g}", ",".join(map(str, b["seeds"])), _mean_sd(b["final_reward"]),
               _mean_sd(b["final_kl"])] + ([_mean_sd(b["gap"])] if gap else [])
      lines.append("| " + " | ".join(cells + [f"{b['at_plateau']} of {len(b['seeds'])}"])
                   + " |")
  if summary["missing"]:
    lines += ["", f"not started: {', '.join(summary['missing'])}"]
  return "\n".join(lines) + "\n"


def write_summary(workdir: str, summary: dict) -> str:
  """<workdir>/sweep_summary.{json,md}, each complete or absent; returns the markdown."""
  text = markdown(summary)
  common.write_json(os.path.join(workdir, f"{SUMMARY}.json"), summary)
  with files.atomic_write(os.path.join(workdir, f"{SUMMARY}.md")) as f:
    f.write(text)
  return text


# ----------------------------------------------------------------------------- flags


def parse_betas(text: str) -> list[float]:
  try:
    betas = dera.parse_lams(text, flag="--betas")
  except ValueError as e:
    raise SystemExit(f"error: {e}") from None
  if any(b <= 0 for b in betas):
    raise SystemExit(f"error: --betas={text!r}: every KL strength must be > 0.")
  return betas


def _extra_bindings(rest: Sequence[str]) -> list[str]:
  extra = []
  for arg in rest:
    if not arg.startswith("--gin.") or "=" not in arg:
      raise SystemExit(f"error: unexpected argument {arg!r} (extra settings: --gin.NAME=value)")
    name, value = arg[len("--gin."):].split("=", 1)
    if name in RESERVED:
      raise SystemExit(f"error: --gin.{name}: the sweep sets it per run (--workdir, "
                       "--init_checkpoint, --beta/--lams/--betas, --seeds).")
    extra.append(f"{name} = {value}")
  return extra


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--run_gin", required=True)
  parser.add_argument("--preset", choices=sorted(common.PRESET_FILES), required=True)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--init_checkpoint", help="the SFT run (or model); needed unless "
                      "--summary alone")
  parser.add_argument("--beta", type=float, default=None, help="with --lams (default 0.1)")
  parser.add_argument("--lams", default=None, help="λ grid at β/λ (default 0.25,0.5,1,2,4)")
  parser.add_argument("--betas", default=None, help="the βs themselves, instead of "
                      "--beta/--lams")
  parser.add_argument("--seeds", default=None, help="e.g. 0,1,2: one run per seed and β")
  parser.add_argument("--run", action="store_true", help="run the commands here, in turn")
  parser.add_argument("--summary", action="store_true",
                      help="write the summary of the runs there (also after --run)")
  parser.add_argument("--optimum_samples", type=int, default=None,
                      help="SFT samples per evaluation prompt for the gap to the optimum "
                           "(length reward)")
  args, rest = parser.parse_known_args(argv)
  extra = _extra_bindings(rest)
  kind = kind_of(args.run_gin)
  run_gin = args.run_gin
  if not os.path.isfile(os.path.join(common.REPO, run_gin)):
    if not os.path.isfile(run_gin):
      raise SystemExit(f"error: --run_gin={run_gin}: no such file.")
    run_gin = os.path.abspath(run_gin)
  if args.betas is not None:
    if args.lams is not None or args.beta is not None:
      raise SystemExit("error: --betas replaces --beta and --lams: give one or the other.")
    grid = [(beta, None) for beta in parse_betas(args.betas)]
  else:
    beta = 0.1 if args.beta is None else args.beta
    if not beta > 0:
      raise SystemExit(f"error: --beta={args.beta}: the KL strength must be > 0.")
    grid = [(beta / lam, lam) for lam in common.parse_lams(args.lams or "0.25,0.5,1,2,4")]
  seeds = None if args.seeds is None else common.parse_seeds(args.seeds)
  summary_only = args.summary and not args.run
  if args.init_checkpoint is None and (not summary_only or args.optimum_samples):
    raise SystemExit("error: --init_checkpoint (the SFT run) is needed to print or run the "
                     "commands and to sample the optimum.")
  if args.optimum_samples is not None:
    if not (args.run or args.summary):
      raise SystemExit("error: --optimum_samples goes with --run or --summary.")
    if kind not in LENGTH_REWARD_KINDS:
      raise SystemExit(f"error: --optimum_samples: the optimum's reward is estimated for the "
                       f"length reward (ppo_length.gin, pg_length.gin, rwl_length.gin) only, not "
                       f"{args.run_gin}.")
    if args.optimum_samples < 2:
      raise SystemExit(f"error: --optimum_samples={args.optimum_samples}: the optimum needs "
                       f">= 2 SFT samples per prompt (>= {stages.optimum.MIN_ESS:g} for a gap).")
  init = None if args.init_checkpoint is None else _checkpoint_path(args.init_checkpoint)
  workdir = os.path.abspath(args.workdir)
  common.setup_path()  # the presets' gin includes are relative to the repository
  runs = plan(run_gin, args.preset, workdir, init, grid, seeds, extra)
  if not (args.run or args.summary):
    for run in runs:
      print(run.command)
    return None
  if args.run:
    run_all(runs)
  elif not any(os.path.isdir(r.model_dir) for r in runs):
    raise SystemExit(f"error: --summary: no run of this sweep in {workdir} (looked for "
                     f"{', '.join(r.name for r in runs)}); start it with --run.")
  optimum = None
  if args.optimum_samples:
    optimum = estimate_optimum(run_gin, args.preset, runs, init, args.optimum_samples)
  summary = summarize(runs, kind, optimum)
  summary.update(run_file=args.run_gin, preset=args.preset, workdir=workdir)
  print(write_summary(workdir, summary), end="", flush=True)
  common.log(f"summary: {os.path.join(workdir, SUMMARY)}.{{json,md}}")
  return summary


if __name__ == "__main__":
  main()
