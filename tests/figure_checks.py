"""Checks the figure drivers' smoke tests share: the optimum curve and the runs'
convergence records in a figN.json."""
import pytest

from deranj.evaluation import optimum
from experiments import stages


def optimum_and_runs(saved, reward_key, kind, stdout):
  """The optimum per λ and each run's convergence record, as every figure writes them
  (every seed's, where the figure has `per_seed`)."""
  opt = saved["optimum"]
  assert opt["min_ess"] == optimum.MIN_ESS and opt["sft_samples_per_prompt"] == 64
  assert opt["num_prompts"] == saved["num_prompts"]
  for row in saved["per_lam"]:
    point = row["optimum"]
    assert point["beta"] == pytest.approx(saved["beta"] / row["lam"], rel=1e-12)
    assert point["ess_min"] <= point["ess_mean"] <= 64 * (1 + 1e-9)
    assert point["left_out"] == (point["ess_min"] < optimum.MIN_ESS)
    assert (point[reward_key] is None) == point["left_out"] == (point["reason"] is not None)
  warned = 0
  for block in saved.get("per_seed", [saved]):
    warned += _runs(block, saved["per_lam"], kind, stdout)
  assert stdout.count(" is not at a plateau ") == warned
  assert saved["all_runs_at_plateau"] == saved.get("per_seed", [saved])[0]["all_runs_at_plateau"]


def _runs(block, rows_with_optimum, kind, stdout):
  """One seed's run records against its rows; returns how many failed their plateau test."""
  runs = block["runs"]
  assert [r["beta"] for r in runs] == [row["beta_over_lam"] for row in block["per_lam"]]
  warned = 0
  for row, top, run in zip(block["per_lam"], rows_with_optimum, runs):
    assert row["lam"] == top["lam"]
    assert run["kind"] == kind and row["retrained"]["run"] == run["run"]
    # 8 smoke steps, evaluated every ceil(8 / 5) = 2 steps.
    assert [e["step"] for e in run["evals"]] == [2, 4, 6, 8]
    assert run["final_step"] == 8
    last = run["evals"][-1]
    assert run["final_reward"] == last.get("objective/scores")
    assert run["final_kl_to_optimum"] == last.get("objective/kl_to_optimum")
    assert (run["final_kl"] is None) == (kind == "dpo")  # DPO evaluates pairs, not samples
    plateau = run["plateau"]
    assert plateau["steps"] == [4, 6, 8]
    assert plateau["passed"] == all(plateau["moved"][m] <= plateau["tolerance"][m]
                                    for m in stages.PLATEAU_METRICS[kind])
    for m in stages.PLATEAU_METRICS[kind]:
      values = [e[m] for e in run["evals"][1:]]
      assert plateau["moved"][m] == pytest.approx(max(values) - min(values), rel=1e-12)
    assert row["retrained"]["plateau"] == plateau["passed"]
    gap = run["gap_to_optimum"]
    assert gap["optimum"] == top["optimum"][
        "length_reward" if kind in ("ppo", "pg_length", "rwl_length") else "mean_trained_reward"]
    assert (gap["gap"] is None) == top["optimum"]["left_out"]
    if gap["gap"] is not None:
      assert gap["gap"] == pytest.approx(gap["optimum"] - gap["run"], rel=1e-12)
    warned += not plateau["passed"]
    assert (f"warning: {run['run']} " in stdout) != plateau["passed"]
  assert block["all_runs_at_plateau"] == (warned == 0)
  return warned
