"""Figure 2's driver on the smoke preset, and the sweep script."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from scripts import sweep  # noqa: E402


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
  for row in result["per_lam"]:
    for method in ("dera", "retrained", "dera_resampled"):
      assert -1.0 <= row[method]["length_reward"] <= 0.0
      assert sum(row[method]["histogram"]) == result["num_prompts"] * result[
          "samples_per_prompt"]
  assert result["dera_sweep_compiles"] == 1  # one compiled sampler for the whole grid
  assert os.path.getsize(tmp_path / "fig2.png") > 10_000
  again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=900)
  assert again.returncode == 0
  assert again.stdout.count("finished earlier, skipped") == 4
  assert "[train]" not in again.stdout
