"""Figure 2's driver: length statistics, the runs several seeds train (sweep.py's), the
spread over seeds in the JSON, report and figure (fast); the smoke preset end to end, one
seed then two (slow); the sweep script."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import figure_checks  # noqa: E402  (tests/)
from experiments import common  # noqa: E402
from experiments import fig2_length_reward  # noqa: E402
from experiments import plots  # noqa: E402
from experiments import stages  # noqa: E402
from scripts import sweep  # noqa: E402


def _expected_length_stats(lengths, num_prompts, l_min, l_max):
  """Mean length reward and its standard error over prompts, by hand in NumPy."""
  lengths = np.asarray(lengths)
  reward = np.where((lengths >= l_min) & (lengths <= l_max), 0.0, -1.0)
  per_prompt = reward.reshape(num_prompts, -1).mean(1)
  se = np.sqrt(np.sum((per_prompt - per_prompt.mean()) ** 2) / (num_prompts - 1) / num_prompts)
  return reward.mean(), se


def test_length_stats_by_hand():
  # 2 prompts x 2 samples; lengths 3, 1 | 5, 2 (EOS = 1 ends each, PAD = 0 after).
  tokens = np.array([[7, 8, 9, 1, 0, 0], [7, 1, 0, 0, 0, 0],
                     [5, 6, 7, 8, 9, 1], [4, 4, 1, 0, 0, 0]])
  stats = fig2_length_reward.length_stats(tokens, 2, 2, 3, np.arange(8))
  assert stats["lengths"] == [3, 1, 5, 2]
  assert stats["histogram"] == [0, 1, 1, 1, 0, 1, 0]
  # rewards 0, -1 | -1, 0: mean -1/2; per-prompt means -1/2, -1/2: standard error 0.
  assert stats["length_reward"] == -0.5 and stats["length_reward_se"] == 0.0
  assert stats["in_range"] == 0.5 and stats["mean_length"] == 2.75
  stats = fig2_length_reward.length_stats(tokens, 2, 1, 3, np.arange(8))
  # rewards 0, 0 | -1, 0: per-prompt means 0, -1/2: standard error 1/4.
  assert stats["length_reward"] == -0.25 and stats["length_reward_se"] == 0.25


def test_retrained_models_sample_with_their_own_keys():
  import jax  # pylint: disable=g-import-not-at-top
  rng = jax.random.PRNGKey(0)
  keys = [np.asarray(stages.model_key(rng, f"/w/ppo_beta{b}")) for b in ("0.1", "0.05", "0.2")]
  assert len({k.tobytes() for k in keys}) == 3
  # A model's key is its run's name, whatever the directory or the grid around it.
  np.testing.assert_array_equal(stages.model_key(rng, "/other/ppo_beta0.1/"), keys[0])


def test_sweep_prints_one_command_per_lam_at_beta_over_lam(tmp_path, capsys):
  sweep.main(["--run_gin", "configs/runs/ppo_length.gin", "--preset", "tiny",
              "--workdir", str(tmp_path), "--init_checkpoint", str(tmp_path / "sft"),
              "--beta", "0.1", "--lams", "0.5,2", "--gin.PPO_STEPS=7"])
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 2
  assert "--gin.BETA=0.2" in lines[0] and f"ppo_beta0.2'" in lines[0]
  assert "--gin.BETA=0.05" in lines[1] and "--gin.PPO_STEPS=7" in lines[1]
  assert all(l.startswith("python -m deranj.train --gin_file=configs/runs/ppo_length.gin")
             for l in lines)


class _Stop(Exception):
  """Ends the driver after its training runs."""


def _planned_runs(tmp_path, monkeypatch, *flags):
  """(run file, model_dir, bindings) of each run the driver starts on the smoke preset;
  nothing is trained, the driver stops before sampling."""
  started = []

  def train(run_gin, preset, model_dir, bindings=()):
    assert preset == "smoke"
    started.append((run_gin, model_dir, list(bindings)))
    return True

  def stop(*args, **kwargs):
    raise _Stop()

  monkeypatch.setattr(common, "train", train)
  monkeypatch.setattr(fig2_length_reward.pipeline, "load", stop)
  with pytest.raises(_Stop):
    fig2_length_reward.main(["--preset", "smoke", "--workdir", str(tmp_path), *flags])
  return started


def _sweep_commands(workdir, seeds, run_gin="configs/runs/pg_length.gin"):
  """scripts/sweep.py's commands for Figure 2's runs on the smoke preset (β = 0.1)."""
  lams = [0.5, 1.0, 2.0]
  return [r.command for r in sweep.plan(run_gin, "smoke", str(workdir),
                                        str(workdir / "sft"), [(0.1 / l, l) for l in lams],
                                        seeds, [])]


def test_seeds_train_the_sweeps_runs_in_its_directories(tmp_path, monkeypatch, capsys):
  started = _planned_runs(tmp_path, monkeypatch, "--seeds", "0,1")
  assert started[0] == (stages.SFT_RUN, str(tmp_path / "sft"), [])  # one SFT run, shared
  runs = started[1:]
  # Seed by seed, the aligned model (β = 0.1) first; seed 1 in sweep.py's suffixed directories.
  assert [os.path.basename(d) for _, d, _ in runs] == [
      "pg_length_beta0.1", "pg_length_beta0.2", "pg_length_beta0.05",
      "pg_length_beta0.1_seed1", "pg_length_beta0.2_seed1", "pg_length_beta0.05_seed1"]
  assert [b for _, _, bindings in runs for b in bindings if b.startswith("SEED")] == [
      "SEED = 0"] * 3 + ["SEED = 1"] * 3
  assert "-- run 7 of 7: pg_length_beta0.05_seed1" in capsys.readouterr().out
  # The same command lines as `sweep.py --seeds 0,1`: either reuses the other's runs.
  got = [common.train_command(run_gin, "smoke", d, b) for run_gin, d, b in runs]
  assert sorted(got) == sorted(_sweep_commands(tmp_path, [0, 1]))


def test_reward_weighted_runs_share_the_workdirs_pool_as_the_sweeps_do(tmp_path, monkeypatch):
  runs = _planned_runs(tmp_path, monkeypatch, "--trainer", "rwl")[1:]
  pool = f"RWL_CANDIDATES_FILE = '{tmp_path / stages.RWL_POOL_FILE}'"
  assert [os.path.basename(d) for _, d, _ in runs] == [
      "rwl_length_beta0.1", "rwl_length_beta0.2", "rwl_length_beta0.05"]
  assert all(pool in bindings for _, _, bindings in runs)
  got = [common.train_command(run_gin, "smoke", d, b) for run_gin, d, b in runs]
  assert sorted(got) == sorted(_sweep_commands(tmp_path, None, "configs/runs/rwl_length.gin"))
  assert stages.pool_bindings(str(tmp_path), "pg_length") == []


def test_one_seed_keeps_the_run_files_seed_and_directories(tmp_path, monkeypatch):
  runs = _planned_runs(tmp_path, monkeypatch, "--seed", "3")[1:]
  got = [common.train_command(run_gin, "smoke", d, b) for run_gin, d, b in runs]
  assert sorted(got) == sorted(_sweep_commands(tmp_path, None))  # no SEED binding, no suffix


@pytest.mark.parametrize("flags, message", [
    (["--seed", "1", "--seeds", "0,1"], "error: --seed and --seeds: give one"),
    (["--seeds", "0,0"], "error: --seeds='0,0': a seed given more than once."),
    (["--seeds", "1,x"], "error: --seeds='1,x': expected comma-separated integers >= 0"),
])
def test_seed_flag_errors_are_one_line(tmp_path, flags, message):
  with pytest.raises(SystemExit) as e:
    fig2_length_reward.main(["--preset", "smoke", "--workdir", str(tmp_path / "w"), *flags])
  assert str(e.value).startswith(message) and "\n" not in str(e.value)
  assert not os.path.exists(tmp_path / "w")  # nothing written


def _seed_block(seed, dera, retrained, rho, mad):
  """A made-up per_seed entry: mean length rewards per λ (0.5, 2) and the agreement."""
  return {"seed": seed, "per_lam": [
      {"lam": lam, "dera": {"length_reward": d}, "retrained": {"length_reward": r},
       "dera_resampled": {"length_reward": d - 0.125}}
      for lam, d, r in zip((0.5, 2.0), dera, retrained)],
          "agreement": {"length_reward": {"spearman": rho, "mean_abs_difference": mad}}}


def test_across_seeds_by_hand():
  per_seed = [_seed_block(0, (-0.5, -0.25), (-0.1, 0.0), 1.0, 0.1),
              _seed_block(4, (-0.25, -0.25), (-0.2, 0.0), None, 0.2),  # ρ undefined
              _seed_block(7, (-0.75, -0.25), (-0.6, 0.0), -0.5, 0.3)]
  got = fig2_length_reward.across_seeds(per_seed)
  assert got["seeds"] == [0, 4, 7] and [r["lam"] for r in got["per_lam"]] == [0.5, 2.0]
  dera, retrained = got["per_lam"][0]["dera"], got["per_lam"][0]["retrained"]
  # DeRa at λ = 0.5: -0.5, -0.25, -0.75: mean -0.5, deviations 0, 1/4, -1/4, so the
  # sample variance is (1/16 + 1/16) / 2 = 1/16.
  assert (dera["n"], dera["min"], dera["max"]) == (3, -0.75, -0.25)
  np.testing.assert_allclose([dera["mean"], dera["std"]], [-0.5, 0.25], rtol=1e-12)
  # Retrained: -0.1, -0.2, -0.6: mean -0.3, deviations 0.2, 0.1, -0.3: (0.14 / 2) ** 0.5.
  np.testing.assert_allclose([retrained["mean"], retrained["std"]], [-0.3, 0.07 ** 0.5],
                             rtol=1e-12)
  assert (retrained["min"], retrained["max"]) == (-0.6, -0.1)
  np.testing.assert_allclose(got["per_lam"][0]["dera_resampled"]["mean"], -0.625, rtol=1e-12)
  # λ = 2: every seed the same: no spread.
  assert got["per_lam"][1]["dera"] == {"n": 3, "mean": -0.25, "std": 0.0, "min": -0.25,
                                       "max": -0.25}
  rho, mad = got["spearman"], got["mean_abs_difference"]
  assert rho["per_seed"] == [1.0, None, -0.5] and rho["n"] == 2  # mean over defined ones
  np.testing.assert_allclose([rho["mean"], rho["std"]], [0.25, 1.5 / 2 ** 0.5], rtol=1e-12)
  assert mad["per_seed"] == [0.1, 0.2, 0.3]
  np.testing.assert_allclose([mad["mean"], mad["std"]], [0.2, 0.1], rtol=1e-12)


def _tokens(lengths, width=8):
  """Rows of the given response lengths (EOS = 1 after, PAD = 0)."""
  return np.array([[5] * n + [1] + [0] * (width - n - 1) for n in lengths])


def _fake_seed(seed, tmp_path, dera_lengths):
  """stages.seed_results for λ = 0.5, 1 on 2 prompts x 2 samples, L in [2, 3] rewarded,
  from made-up samples (the retrained models' always in range) and runs never trained."""
  lams = [0.5, 1.0]
  dera = np.stack([_tokens(x) for x in dera_lengths])
  ok = np.stack([_tokens([2, 3, 2, 3])] * 2)
  sampled = stages.Samples({"dera": dera, "retrained": ok, "dera_resampled": ok},
                           np.full((2, 4), 3.0), 1)
  points = [{"beta": 0.2 / lam, "length_reward": -0.1, "mean_length": 2.5, "in_range": 0.9,
             "ess_mean": 30.0, "ess_min": 20.0, "left_out": False, "reason": None}
            for lam in lams]
  dirs = [str(tmp_path / f"pg_length_beta{0.2 / lam:g}") for lam in lams]
  return fig2_length_reward.seed_results(seed, sampled, dirs, lams, 0.2, "pg_length", points,
                                         2, (2, 3), np.arange(9), 4)


def _seeds_result(tmp_path):
  # DeRa's rewards per λ: seed 0: -1/2, -1/4; seed 1: -1/4, -3/4.
  results = [_fake_seed(0, tmp_path, [[1, 2, 5, 3], [2, 7, 3, 3]]),
             _fake_seed(1, tmp_path, [[2, 2, 1, 3], [6, 6, 6, 2]])]
  per_seed = [fig2_length_reward.per_seed_entry(r) for r in results]
  first = results[0]
  return {"figure": "2", "preset": "smoke", "beta": 0.2, "seed": 0, "length_range": [2, 3],
          "num_prompts": 2, "samples_per_prompt": 2, "per_lam": first["per_lam"],
          "agreement": first["agreement"],
          "optimum": {"min_ess": 10.0, "sft_samples_per_prompt": 64},
          "wall_seconds": {"all": 1.0}, "seeds": [0, 1], "per_seed": per_seed,
          "across_seeds": fig2_length_reward.across_seeds(per_seed)}


def test_per_seed_entries_and_the_report_over_seeds(tmp_path, capsys):
  result = _seeds_result(tmp_path)
  entry = result["per_seed"][1]
  assert entry["seed"] == 1 and entry["dera_sweep_compiles"] == 1
  row = entry["per_lam"][1]
  assert "optimum" not in row and "lengths" not in row["dera"] and "histogram" not in row["dera"]
  assert row["dera"]["length_reward"] == -0.75 and row["retrained"]["length_reward"] == 0.0
  assert not row["retrained"]["plateau"]  # never trained: no evaluations
  assert [r["run"] for r in entry["runs"]] == ["pg_length_beta0.4", "pg_length_beta0.2"]
  fig2_length_reward.report(result)
  out = capsys.readouterr().out
  assert "seed 0 (the first of seeds 0,1):" in out
  # Over seeds, (-1/2, -1/4) and (-1/4, -3/4): sd = |a - b| / sqrt(2).
  assert f"| 0.5 | -0.375 ± {0.25 / 2 ** 0.5:.3f} [-0.500, -0.250] | 0.000 ± 0.000 " in out
  assert f"| 1 | -0.500 ± {0.5 / 2 ** 0.5:.3f} [-0.750, -0.250] | " in out
  # The retrained models are constant across λ: no Spearman ρ; mean |Δ| 3/8 and 1/2.
  assert "Spearman ρ(DeRa, retrained) = n/a, n/a (mean n/a); mean |Δ| = 0.375, 0.500 " \
         "(mean 0.438)" in out


def test_figure2_shades_the_range_over_seeds(tmp_path, monkeypatch):
  from matplotlib.collections import PolyCollection  # pylint: disable=g-import-not-at-top
  saved = []
  save = common.save_figure
  monkeypatch.setattr(common, "save_figure", lambda fig, path: (saved.append(fig),
                                                                 save(fig, path)))
  result = _seeds_result(tmp_path)
  plots.figure2(result, str(tmp_path / "fig2.png"))
  assert os.path.getsize(tmp_path / "fig2.png") > 10_000
  ax = saved[0].axes[0]
  bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
  assert len(bands) == 2  # DeRa's and the retrained models'
  labels = ax.get_legend_handles_labels()[1]
  assert "DeRa: range over seeds 0,1" in labels and "retrained: range over seeds 0,1" in labels
  # DeRa's band spans each λ's min to max over seeds.
  vertices = np.concatenate([p.vertices for p in bands[0].get_paths()])
  for lam, low, high in ((0.5, -0.5, -0.25), (1.0, -0.75, -0.25)):
    ys = vertices[np.isclose(vertices[:, 0], lam, rtol=1e-12), 1]
    np.testing.assert_allclose([ys.min(), ys.max()], [low, high], rtol=1e-12)
  # One seed: no band.
  del result["per_seed"]
  plots.figure2(result, str(tmp_path / "one.png"))
  assert not [c for c in saved[1].axes[0].collections if isinstance(c, PolyCollection)]


@pytest.mark.slow
def test_fig2_smoke_end_to_end_resumable_and_over_two_seeds(tmp_path):
  command = [sys.executable, "experiments/fig2_length_reward.py", "--preset", "smoke",
             "--workdir", str(tmp_path)]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  first = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=900)
  assert first.returncode == 0, first.stderr[-3000:]
  result = json.load(open(tmp_path / "fig2.json"))
  assert [r["lam"] for r in result["per_lam"]] == [0.5, 1.0, 2.0]
  l_min, l_max = result["length_range"]
  max_len = result["histogram_bins"][-1] - 1
  n = result["num_prompts"] * result["samples_per_prompt"]
  for row in result["per_lam"]:
    for method in stages.METHODS:
      stats = row[method]
      assert len(stats["lengths"]) == n
      mean, se = _expected_length_stats(stats["lengths"], result["num_prompts"], l_min, l_max)
      np.testing.assert_allclose([stats["length_reward"], stats["length_reward_se"]],
                                 [mean, se], rtol=1e-12, atol=1e-15)
      assert stats["histogram"] == np.bincount(stats["lengths"], minlength=len(
          result["histogram_bins"]) - 1).tolist()
  beta_row = result["per_lam"][result["lams"].index(1.0)]
  assert beta_row["dera"]["lengths"] != beta_row["retrained"]["lengths"]  # own keys
  assert "-- run 4 of 4: pg_length_beta0.05" in first.stdout  # smoke: SFT + 3 PG runs
  assert result["dera_sweep_compiles"] == 1  # one compiled sampler for the whole grid
  assert os.path.getsize(tmp_path / "fig2.png") > 10_000
  figure_checks.optimum_and_runs(result, "length_reward", "pg_length", first.stdout)
  assert result["trainer"] == "pg" and result["run_gin"] == "configs/runs/pg_length.gin"
  assert "length reward" in result["optimum"]["reward"]
  for row in result["per_lam"]:
    point = row["optimum"]
    if not point["left_out"]:
      assert -1 <= point["length_reward"] <= 0 and 0 <= point["mean_length"] <= max_len
      assert point["in_range"] == pytest.approx(1 + point["length_reward"], rel=1e-9)
  # Two seeds: seed 0's runs are the ones above (skipped), seed 1 trains its own 3 runs.
  again = subprocess.run(command + ["--seeds", "0,1"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=900)
  assert again.returncode == 0, again.stderr[-3000:]
  assert again.stdout.count("finished earlier, skipped") == 4
  assert again.stdout.count("-- run ") == 7 and "-- run 7 of 7: pg_length_beta0.05_seed1" in \
      again.stdout
  seeds = json.load(open(tmp_path / "fig2.json"))
  # The first seed's numbers are the one-seed run's, to the bit.
  for key in ("per_lam", "runs", "agreement", "optimum", "dera_sweep_compiles"):
    assert seeds[key] == result[key], key
  assert seeds["seeds"] == [0, 1] and [s["seed"] for s in seeds["per_seed"]] == [0, 1]
  first, second = seeds["per_seed"]
  for row, full in zip(first["per_lam"], result["per_lam"]):
    for method in stages.METHODS:
      assert row[method] == {k: v for k, v in full[method].items()
                             if k not in ("lengths", "histogram")}
  assert first["runs"] == result["runs"] and first["agreement"] == result["agreement"]
  assert second["dera_sweep_compiles"] == 0  # the same sampler, seed 1's parameters
  assert [r["run"] for r in second["runs"]] == [f"{r['run']}_seed1" for r in result["runs"]]
  assert second["runs"][0]["evals"] != first["runs"][0]["evals"]  # trained with SEED = 1
  assert "SEED = 1\n" in open(tmp_path / "pg_length_beta0.2_seed1" / "config.gin").read()
  figure_checks.optimum_and_runs(seeds, "length_reward", "pg_length", again.stdout)
  for i, row in enumerate(seeds["across_seeds"]["per_lam"]):
    for method in stages.METHODS:
      x = [s["per_lam"][i][method]["length_reward"] for s in seeds["per_seed"]]
      np.testing.assert_allclose([row[method]["mean"], row[method]["std"]],
                                 [np.mean(x), np.std(x, ddof=1)], rtol=1e-12, atol=1e-15)
  assert "over seeds 0,1: mean length reward" in again.stdout
  assert os.path.getsize(tmp_path / "fig2.png") > 10_000
