"""Figure 2's driver: length statistics (fast), the smoke preset end to end (slow), and the
sweep script."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import figure_checks  # noqa: E402  (tests/)
from experiments import fig2_length_reward  # noqa: E402
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


@pytest.mark.slow
def test_fig2_smoke_end_to_end_and_resumable(tmp_path):
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
  again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=900)
  assert again.returncode == 0
  assert again.stdout.count("finished earlier, skipped") == 4
  assert "[train]" not in again.stdout
