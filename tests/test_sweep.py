"""scripts/sweep.py: the grid's runs over betas and seeds (directories, gin bindings),
finished runs skipped and interrupted ones resumed, the summary table from the trainer's
own evaluation records, one-line errors (fast); a 2-run sweep on the smoke preset (slow)."""
import json
import os
import shlex
import subprocess
import sys

import gin
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from deranj import gin_utils  # noqa: E402
from deranj.models import loading  # noqa: E402
from deranj.training import checkpoints  # noqa: E402
from experiments import stages  # noqa: E402
from scripts import sweep  # noqa: E402
# tests/: evaluations written with the trainer's own MetricsLogger.
from test_convergence import _write_evals  # noqa: E402  pylint: disable=g-bad-import-order

PPO = "configs/runs/ppo_length.gin"


def _args(workdir, *more):
  return ["--run_gin", PPO, "--preset", "smoke", "--workdir", str(workdir), *more]


def _bindings(command):
  """{name: value} of a printed command's --gin.NAME=value arguments, in order."""
  args = gin_utils.rewrite_gin_args(shlex.split(command)[3:])
  return dict(a[len("--gin_bindings="):].split(" = ", 1) for a in args
              if a.startswith("--gin_bindings="))


def test_betas_times_seeds_each_in_its_own_directory(tmp_path, capsys):
  sweep.main(_args(tmp_path, "--init_checkpoint", str(tmp_path / "sft"), "--betas",
                   "0.1,0.05", "--seeds", "0,2", "--gin.PPO_STEPS=12"))
  lines = capsys.readouterr().out.strip().splitlines()
  # Seed by seed; seed 0 in the figure drivers' directory, other seeds with a suffix.
  dirs = ["ppo_beta0.1", "ppo_beta0.05", "ppo_beta0.1_seed2", "ppo_beta0.05_seed2"]
  assert [_bindings(l)["MODEL_DIR"] for l in lines] == [f"'{tmp_path / d}'" for d in dirs]
  assert [_bindings(l)["BETA"] for l in lines] == ["0.1", "0.05"] * 2
  assert [_bindings(l)["SEED"] for l in lines] == ["0", "0", "2", "2"]
  for line in lines:
    got = _bindings(line)
    assert got["INIT_CHECKPOINT"] == f"'{tmp_path / 'sft'}'"
    # Evaluated as the drivers' runs: up to EVALS_PER_RUN times over the 12 steps given.
    assert got["train.eval_every"] == str(-(-12 // stages.EVALS_PER_RUN))
    assert list(got)[-1] == "PPO_STEPS"  # extra settings last: they win
  # The command parses with the run file's checks, and binds what the sweep says.
  args = gin_utils.rewrite_gin_args(shlex.split(lines[3])[3:])
  gin.clear_config()
  try:
    gin_utils.parse_gin([a[len("--gin_file="):] for a in args if a.startswith("--gin_file=")],
                        [a[len("--gin_bindings="):] for a in args
                         if a.startswith("--gin_bindings=")])
    assert gin.query_parameter("%SEED") == 2 and gin.query_parameter("%BETA") == 0.05
    assert gin.query_parameter("train.eval_every") == 3
  finally:
    gin.clear_config()


def test_lams_grid_without_seeds_keeps_the_drivers_commands(tmp_path):
  runs = sweep.plan(PPO, "smoke", str(tmp_path), "tiny", [(0.1 / 2, 2.0), (0.1 / 0.5, 0.5)],
                    None, [])
  assert [(r.name, r.beta, r.seed, r.lam) for r in runs] == [
      ("ppo_beta0.05", 0.05, 0, 2.0), ("ppo_beta0.2", 0.2, 0, 0.5)]
  got = _bindings(runs[0].command)
  assert "SEED" not in got and got["INIT_CHECKPOINT"] == "'tiny'"  # the shipped model's name
  # The preset's 8 PPO steps: the same binding the figure drivers pass.
  assert [f"train.eval_every = {got['train.eval_every']}"] == stages.eval_bindings("smoke", "ppo")
  assert sweep.commands(PPO, "smoke", str(tmp_path), "tiny", 0.1, [2.0, 0.5], []) == [
      (r.model_dir, r.command) for r in runs]


def _finish(model_dir):
  """What `checkpoints.is_finished` looks for: the exported model's config."""
  os.makedirs(os.path.join(model_dir, checkpoints.MODEL_EXPORT_DIR), exist_ok=True)
  with open(os.path.join(model_dir, checkpoints.MODEL_EXPORT_DIR, loading.CONFIG_FILE), "w") as f:
    f.write("{}")


def _flat(scores, kl, kl_to_optimum, steps=(2, 4, 6)):
  return [(s, {"objective/scores": scores, "objective/kl": kl,
               "objective/kl_to_optimum": kl_to_optimum}) for s in steps]


def test_run_skips_finished_runs_and_resumes_interrupted_ones(tmp_path, monkeypatch, capsys):
  _finish(str(tmp_path / "ppo_beta0.1"))
  os.makedirs(tmp_path / "ppo_beta0.05" / checkpoints.CHECKPOINTS_DIR / "4")  # interrupted
  launched = []

  def fake_launch(run):  # a run that trains to the end
    launched.append(run.name)
    _write_evals(run.model_dir, _flat(-0.5, 1.0, 0.25))
    _finish(run.model_dir)

  monkeypatch.setattr(sweep, "_launch", fake_launch)
  args = _args(tmp_path, "--init_checkpoint", "tiny", "--betas", "0.1,0.05", "--seeds", "0,1",
               "--run")
  summary = sweep.main(args)
  assert launched == ["ppo_beta0.05", "ppo_beta0.1_seed1", "ppo_beta0.05_seed1"]
  out = capsys.readouterr().out
  assert "# run 1 of 4: ppo_beta0.1: finished, skipped" in out
  assert "# run 2 of 4: ppo_beta0.05 (resumes from its last checkpoint)" in out
  assert "# run 3 of 4: ppo_beta0.1_seed1\n# python -m deranj.train" in out
  assert [r["run"] for r in summary["runs"]] == ["ppo_beta0.1", "ppo_beta0.05",
                                                  "ppo_beta0.1_seed1", "ppo_beta0.05_seed1"]
  assert summary["missing"] == [] and all(r["finished"] for r in summary["runs"])
  # A second time nothing is launched.
  launched.clear()
  sweep.main(args)
  assert launched == []
  assert capsys.readouterr().out.count("finished, skipped") == 4


def test_a_failed_run_is_one_line_naming_it(tmp_path):
  run = sweep.Run(str(tmp_path / "ppo_beta0.1"), 0.1, 0, None,
                  "python -c 'import sys; sys.exit(3)'")
  with pytest.raises(SystemExit) as e:
    sweep._launch(run)
  assert str(e.value).startswith("error: ppo_beta0.1 failed (exit status 3;")


def _fake_sweep(tmp_path):
  """β 0.1 and 0.05 (β = 0.1, λ = 1, 2) at seeds 0 and 1, one run never started."""
  w = tmp_path
  _write_evals(str(w / "ppo_beta0.1"), _flat(-0.5, 2.0, 0.25))
  _finish(str(w / "ppo_beta0.1"))
  _write_evals(str(w / "ppo_beta0.1_seed1"), _flat(-0.25, 1.5, 0.5))
  # Still moving: its KL doubles every evaluation (and it has not finished).
  _write_evals(str(w / "ppo_beta0.05"), [(s, {"objective/scores": -0.75, "objective/kl": k,
                                              "objective/kl_to_optimum": 1.0})
                                         for s, k in ((2, 0.5), (4, 1.0), (6, 2.0))])
  return _args(w, "--beta", "0.1", "--lams", "1,2", "--seeds", "0,1", "--summary")


def test_summary_from_the_trainers_eval_records(tmp_path, capsys):
  summary = sweep.main(_fake_sweep(tmp_path))
  by_run = {r["run"]: r for r in summary["runs"]}
  assert list(by_run) == ["ppo_beta0.1", "ppo_beta0.05", "ppo_beta0.1_seed1"]
  assert summary["missing"] == ["ppo_beta0.05_seed1"]
  r = by_run["ppo_beta0.1"]
  assert (r["beta"], r["seed"], r["lam"], r["finished"], r["final_step"]) == (0.1, 0, 1.0, True, 6)
  assert (r["final_reward"], r["final_kl"], r["final_kl_to_optimum"]) == (-0.5, 2.0, 0.25)
  assert r["plateau"]["passed"] and by_run["ppo_beta0.1_seed1"]["plateau"]["passed"]
  r = by_run["ppo_beta0.05"]
  assert (r["beta"], r["seed"], r["lam"], r["finished"]) == (0.05, 0, 2.0, False)
  assert not r["plateau"]["passed"] and "objective/kl moved 1.5" in r["plateau"]["reason"]
  # The spread over seeds, per β.
  b = {x["beta"]: x for x in summary["by_beta"]}
  assert b[0.1]["seeds"] == [0, 1] and b[0.1]["at_plateau"] == 2
  np.testing.assert_allclose(b[0.1]["final_reward"]["mean"], -0.375, rtol=1e-12)
  np.testing.assert_allclose(b[0.1]["final_reward"]["std"], np.std([-0.5, -0.25], ddof=1),
                             rtol=1e-12)
  np.testing.assert_allclose(b[0.1]["final_kl"]["mean"], 1.75, rtol=1e-12)
  assert (b[0.1]["final_reward"]["min"], b[0.1]["final_reward"]["max"]) == (-0.5, -0.25)
  assert b[0.05]["final_kl"] == {"n": 1, "mean": 2.0, "std": None, "min": 2.0, "max": 2.0}
  assert b[0.1]["gap"] == {"n": 0, "mean": None, "std": None, "min": None,
                           "max": None}  # no optimum estimated
  # Written next to the runs, the markdown printed as well.
  saved = json.load(open(tmp_path / "sweep_summary.json"))
  assert saved["runs"][0]["evals"] == [{"step": s, "objective/scores": -0.5, "objective/kl": 2.0,
                                        "objective/kl_to_optimum": 0.25} for s in (2, 4, 6)]
  assert saved["optimum"] is None and saved["run_file"] == PPO
  text = open(tmp_path / "sweep_summary.md").read()
  assert text in capsys.readouterr().out
  lines = text.splitlines()
  assert lines[0] == "| run | β | seed | step | finished | reward | KL | KL to optimum | plateau |"
  assert lines[2] == "| ppo_beta0.1 | 0.1 | 0 | 6 | yes | -0.500 | 2.000 | 0.250 | yes |"
  assert lines[3] == "| ppo_beta0.05 | 0.05 | 0 | 6 | no | -0.750 | 2.000 | 1.000 | no |"
  assert "| 0.1 | 0,1 | -0.375 ± 0.177 | 1.750 ± 0.354 | 2 of 2 |" in lines
  assert "| 0.05 | 0 | -0.750 | 2.000 | 0 of 1 |" in lines
  assert lines[-1] == "not started: ppo_beta0.05_seed1"


def test_summary_gap_to_the_optimum(tmp_path, monkeypatch):
  args = _fake_sweep(tmp_path) + ["--optimum_samples", "64", "--init_checkpoint", "tiny"]
  asked = []

  def fake_optimum(run_gin, preset, runs, init, samples):
    asked.append((run_gin, preset, sorted({r.beta for r in runs}), init, samples))
    return {"method": "snis", "points": [
        {"beta": 0.05, "length_reward": None, "ess_min": 3.0, "reason": "ESS 3 < 10"},
        {"beta": 0.1, "length_reward": -0.125, "ess_min": 20.0, "reason": None}]}

  monkeypatch.setattr(sweep, "estimate_optimum", fake_optimum)
  summary = sweep.main(args)
  assert asked == [(PPO, "smoke", [0.05, 0.1], "tiny", 64)]
  gaps = {r["run"]: r["gap_to_optimum"] for r in summary["runs"]}
  assert gaps["ppo_beta0.1"]["gap"] == 0.375 and gaps["ppo_beta0.1_seed1"]["gap"] == 0.125
  assert gaps["ppo_beta0.1"]["optimum"] == -0.125 and gaps["ppo_beta0.1"]["run"] == -0.5
  assert gaps["ppo_beta0.05"]["gap"] is None
  assert gaps["ppo_beta0.05"]["left_out_reason"] == "ESS 3 < 10"
  np.testing.assert_allclose(summary["by_beta"][1]["gap"]["mean"], 0.25, rtol=1e-12)
  assert summary["optimum"]["gap_rule"] == sweep.GAP_RULE
  lines = open(tmp_path / "sweep_summary.md").read().splitlines()
  assert lines[0].endswith("| KL to optimum | gap to optimum | plateau |")
  assert lines[2].endswith("| 0.250 | 0.375 | yes |")
  assert lines[3].endswith("| 1.000 | left out (ESS 3.0) | no |")


@pytest.mark.parametrize("more, message", [
    (["--run_gin", "configs/runs/sft.gin"], "--run_gin=configs/runs/sft.gin: expected one of"),
    (["--run_gin", "nowhere/ppo_length.gin"], "--run_gin=nowhere/ppo_length.gin: no such file"),
    (["--seeds", "0,a"], "--seeds='0,a': expected comma-separated integers >= 0"),
    (["--seeds", "-1"], "--seeds='-1': expected comma-separated integers >= 0"),
    (["--seeds", ","], "--seeds=',': expected comma-separated integers >= 0"),
    (["--seeds", "1,1"], "--seeds='1,1': a seed given more than once"),
    (["--betas", "0.1,0"], "--betas='0.1,0': every KL strength must be > 0"),
    (["--betas", "x"], "--betas='x': expected comma-separated numbers"),
    (["--betas", "0.1,0.10001"], "beta = 0.1 and 0.10001 share the run directory"),
    (["--betas", "0.1", "--lams", "1,2"], "--betas replaces --beta and --lams"),
    (["--beta", "0"], "--beta=0.0: the KL strength must be > 0"),
    (["--lams", "1,-2"], "--lams='1,-2': every value must be positive"),
    (["--gin.SEED=3"], "--gin.SEED: the sweep sets it per run"),
    (["--gin.train.model_dir='/x'"], "--gin.train.model_dir: the sweep sets it per run"),
    (["--steps", "3"], "unexpected argument '--steps'"),
    (["--summary"], "--summary: no run of this sweep in"),
    (["--optimum_samples", "8"], "--optimum_samples goes with --run or --summary"),
    (["--optimum_samples", "1", "--summary"], "--optimum_samples=1: the optimum needs >= 2"),
    (["--run_gin", "configs/runs/pg_reward.gin", "--optimum_samples", "8", "--summary"],
     "--optimum_samples: the optimum's reward is estimated for the length reward"),
])
def test_user_errors_are_one_line(tmp_path, more, message):
  args = _args(tmp_path) + ([] if more == ["--summary"] else ["--init_checkpoint", "tiny"])
  with pytest.raises(SystemExit) as e:
    sweep.main(args + more)
  text = str(e.value)
  assert text.startswith("error: ") and message in text and "\n" not in text
  assert not os.listdir(tmp_path)  # nothing written


def test_printing_or_running_needs_the_sft_run(tmp_path):
  with pytest.raises(SystemExit, match="^error: --init_checkpoint .* is needed"):
    sweep.main(_args(tmp_path))


@pytest.mark.slow
def test_two_seed_sweep_on_the_smoke_preset_resumes_and_summarises(tmp_path, capsys):
  args = _args(tmp_path, "--init_checkpoint", "tiny", "--betas", "2", "--seeds", "0,1",
               "--gin.PPO_STEPS=4", "--run")  # evaluated at every step
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  done = subprocess.run([sys.executable, "scripts/sweep.py", *args, "--optimum_samples", "32"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  summary = json.load(open(tmp_path / "sweep_summary.json"))
  assert open(tmp_path / "sweep_summary.md").read() in done.stdout
  assert [(r["run"], r["seed"], r["finished"]) for r in summary["runs"]] == [
      ("ppo_beta2", 0, True), ("ppo_beta2_seed1", 1, True)]
  for r in summary["runs"]:
    assert r["final_step"] == 4 and [e["step"] for e in r["evals"]] == [1, 2, 3, 4]
    assert r["final_reward"] == r["evals"][-1]["objective/scores"]
    assert r["final_kl_to_optimum"] == r["evals"][-1]["objective/kl_to_optimum"]
    gap = r["gap_to_optimum"]
    if gap["left_out_reason"] is None:
      np.testing.assert_allclose(gap["gap"], gap["optimum"] - gap["run"], rtol=1e-12)
  # Tilting pi_sft towards the reward never lowers its expectation (nor above the max, 0).
  point = summary["optimum"]["points"][0]
  assert point["beta"] == 2.0
  if not point["left_out"]:
    assert summary["optimum"]["sft"]["length_reward"] <= point["length_reward"] <= 0
  # The seeds trained differently.
  assert summary["runs"][0]["evals"] != summary["runs"][1]["evals"]
  for name, seed in (("ppo_beta2", 0), ("ppo_beta2_seed1", 1)):
    assert f"SEED = {seed}\n" in open(tmp_path / name / "config.gin").read()
  # The same command again trains nothing and summarises the same runs.
  again = sweep.main(args)
  out = capsys.readouterr().out
  assert out.count("finished, skipped") == 2 and "# python -m deranj.train" not in out
  assert [r["evals"] for r in again["runs"]] == [r["evals"] for r in summary["runs"]]
