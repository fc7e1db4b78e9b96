"""The figures' convergence records and optimum curves: evaluations read back from the
trainer's event files, the plateau test, gaps to the optimum, and each figure's optimum
helper against a direct computation (fast)."""
import io
import os

import numpy as np
import pytest

from experiments import common
from experiments import fig2_length_reward
from experiments import stages
from experiments import summarization


def _write_evals(model_dir, rows):
  from deranj.training import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  log = metrics_lib.MetricsLogger(model_dir, 100, stream=io.StringIO())
  for step, metrics in rows:
    log.write_eval(step, metrics)
  log.close()


def test_read_evals_from_the_trainers_event_files(tmp_path):
  model_dir = str(tmp_path / "ppo_beta0.1")
  _write_evals(model_dir, [(2, {"objective/scores": -0.5, "objective/kl": 0.25}),
                           (4, {"objective/scores": -0.25, "objective/kl": 0.5})])
  # A resumed run writes a second file; its step 4 replaces the first one's.
  _write_evals(model_dir, [(4, {"objective/scores": -0.125, "objective/kl": 0.75}),
                           (6, {"objective/scores": -0.0625, "objective/kl": 1.0})])
  want = [{"step": 2, "objective/scores": -0.5, "objective/kl": 0.25},
          {"step": 4, "objective/scores": -0.125, "objective/kl": 0.75},
          {"step": 6, "objective/scores": -0.0625, "objective/kl": 1.0}]
  assert common.read_evals(model_dir) == want  # powers of two: exact in float32
  # A record cut short (a run killed mid-write) is ignored, not an error.
  directory = os.path.join(model_dir, common.EVAL_DIR)
  last = sorted(os.listdir(directory))[-1]
  with open(os.path.join(directory, last), "ab") as f:
    f.write(b"\x40\x00\x00\x00\x00\x00\x00\x00\x00")
  assert common.read_evals(model_dir) == want
  assert common.read_evals(str(tmp_path / "never_ran")) == []


def test_read_evals_keeps_the_latest_write_when_file_names_do_not_sort_in_time(tmp_path):
  # Writers of one second are named by a counter: ...9.v2 sorts after ...10.v2.
  model_dir = str(tmp_path / "ppo_beta0.1")
  for k in range(12):
    _write_evals(model_dir, [(2, {"objective/scores": float(k)})])
  assert common.read_evals(model_dir) == [{"step": 2, "objective/scores": 11.0}]


def _evals(values):
  return [{"step": 10 * (i + 1), "objective/scores": r, "objective/kl": k}
          for i, (r, k) in enumerate(values)]


def test_plateau_test_moves_relative_to_size_with_a_floor():
  metrics = stages.PLATEAU_METRICS["ppo"]
  k = stages.PLATEAU_EVALS
  # Early evaluations may move a lot; only the last k count.
  flat = _evals([(-1.0, 0.0)] + [(-0.2, 4.0)] * (k - 1) + [(-0.2 + 0.04, 4.0 + 0.19)])
  got = stages.plateau_test(flat, metrics)
  assert got["passed"] and got["reason"] is None
  assert got["steps"] == [e["step"] for e in flat[-k:]]
  # Tolerance: RTOL x max(|mean|, FLOOR): the floor for the reward, the KL's own size.
  np.testing.assert_allclose(got["tolerance"]["objective/scores"],
                             stages.PLATEAU_RTOL * stages.PLATEAU_FLOOR, rtol=1e-12)
  kl_mean = np.mean([4.0] * (k - 1) + [4.19])
  np.testing.assert_allclose(got["tolerance"]["objective/kl"], stages.PLATEAU_RTOL * kl_mean,
                             rtol=1e-12)
  np.testing.assert_allclose(got["moved"]["objective/kl"], 0.19, rtol=1e-12)
  # The same KL movement on a small KL is not a plateau.
  rising = _evals([(-0.2, 0.5)] * (k - 1) + [(-0.2, 0.69)])
  got = stages.plateau_test(rising, metrics)
  assert not got["passed"]
  assert got["reason"] == (f"over steps {rising[-k]['step']}..{rising[-1]['step']}: "
                           "objective/kl moved 0.19 > 0.05")
  got = stages.plateau_test(flat[:k - 1], metrics)
  assert not got["passed"] and got["reason"] == f"{k - 1} evaluation(s) logged, {k} needed"
  got = stages.plateau_test(flat, stages.PLATEAU_METRICS["dpo"])
  assert not got["passed"] and "loss not logged" in got["reason"]


def test_run_record_and_gap(tmp_path, capsys):
  model_dir = str(tmp_path / "ppo_beta0.05")
  rows = [(s, {"objective/scores": -0.5, "objective/kl": 2.0,
               "objective/kl_to_optimum": 0.25}) for s in (2, 4, 6)]
  _write_evals(model_dir, rows)
  record = stages.run_record(model_dir, "ppo", 0.05, "length reward", -0.125, -0.5)
  assert (record["run"], record["kind"], record["beta"]) == ("ppo_beta0.05", "ppo", 0.05)
  assert (record["final_step"], record["final_reward"], record["final_kl"],
          record["final_kl_to_optimum"]) == (6, -0.5, 2.0, 0.25)
  assert record["gap_to_optimum"] == {"reward": "length reward", "optimum": -0.125,
                                      "run": -0.5, "gap": 0.375}
  assert record["plateau"]["passed"] and len(record["evals"]) == 3
  # DPO logs neither a sampled reward nor a KL; a left-out optimum has no gap.
  record = stages.run_record(model_dir, "dpo", 0.05, "gold", None, -0.5)
  assert record["final_reward"] == -0.5  # this run's own log, whatever the kind
  assert record["gap_to_optimum"]["gap"] is None
  assert not record["plateau"]["passed"]
  stages.warn_unconverged([record, stages.run_record(model_dir, "ppo", 0.05, "r", 0.0, 0.0)])
  out = capsys.readouterr().out.strip().splitlines()
  assert out == ["warning: ppo_beta0.05 (beta = 0.05) is not at a plateau (over steps 2..6: "
                 "loss not logged; logratio/margins not logged): its points are not a model "
                 "trained to convergence at that beta."]


def test_dpo_plateau_reads_the_policy_margin_whatever_the_beta(tmp_path):
  # The same policy movement (log-ratio margin 0.5 -> 1.0 -> 1.5 nats on held-out pairs)
  # logged at two betas: rewards/margins is beta x that, so at beta 0.02 it moves 0.02,
  # under the 0.05 floor, yet the policy is no more at a plateau than at beta 0.2.
  for beta in (0.2, 0.02):
    model_dir = str(tmp_path / f"dpo_beta{beta}")
    _write_evals(model_dir, [(s, {"loss": 0.69, "rewards/margins": beta * m})
                             for s, m in ((2, 0.5), (4, 1.0), (6, 1.5))])
    record = stages.run_record(model_dir, "dpo", beta, "gold", None, None)
    assert [e[stages.LOGRATIO_MARGINS] for e in record["evals"]] == pytest.approx(
        [0.5, 1.0, 1.5], rel=1e-6)
    assert not record["plateau"]["passed"]
    assert "logratio/margins moved 1 > 0.05" in record["plateau"]["reason"]
  # Flat in the policy's units: a plateau at either beta.
  model_dir = str(tmp_path / "dpo_flat")
  _write_evals(model_dir, [(s, {"loss": 0.69, "rewards/margins": 0.02 * 1.5}) for s in (2, 4, 6)])
  assert stages.run_record(model_dir, "dpo", 0.02, "gold", None, None)["plateau"]["passed"]


def test_eval_bindings_evaluate_each_run_at_most_evals_per_run_times():
  for kind in ("ppo", "pg", "dpo"):
    steps = common.preset_macros("smoke", [stages.STEPS_MACROS[kind]])[stages.STEPS_MACROS[kind]]
    (binding,) = stages.eval_bindings("smoke", kind)
    every = int(binding.split("=")[1])
    assert binding.startswith("train.eval_every = ")
    # Evaluations at every, 2 every, ... and the last step: ceil(steps / every) of them.
    assert stages.PLATEAU_EVALS <= -(-steps // every) <= stages.EVALS_PER_RUN
  assert stages.eval_bindings("tiny", "pg") == [
      f"train.eval_every = {-(-200 // stages.EVALS_PER_RUN)}"]


def test_grid_reads_the_optimum_samples_and_first_samples_keeps_prompts():
  grid = stages.read_grid("smoke", "FIG2", None)
  assert grid.optimum_samples == 64 and grid.samples == 2
  rows = np.arange(3 * 5)[:, None] * np.ones((1, 2), int)  # 3 prompts x 5 samples
  np.testing.assert_array_equal(stages.first_samples(rows, 3, 2)[:, 0], [0, 1, 5, 6, 10, 11])


def test_fig2_optimum_curve_against_a_direct_computation():
  # 2 prompts x 4 samples; lengths 3, 1, 5, 2 | 2, 2, 6, 4 (EOS = 1 ends each).
  lengths = np.array([3, 1, 5, 2, 2, 2, 6, 4])
  tokens = np.zeros((8, 8), int)
  for i, n in enumerate(lengths):
    tokens[i, :n], tokens[i, n] = 7, 1
  beta = 0.5
  curve = fig2_length_reward.optimum_curve(tokens, 2, [beta, 1e-3], 2, 4)
  reward = np.where((lengths >= 2) & (lengths <= 4), 0.0, -1.0)
  w = np.exp(reward / beta).reshape(2, 4)
  w /= w.sum(1, keepdims=True)
  point = curve["points"][0]
  assert point["left_out"]  # 4 samples per prompt: ESS < MIN_ESS
  assert point["mean_length"] is None and point["reason"].startswith("ESS ")
  np.testing.assert_allclose(point["ess_min"], (1 / (w ** 2).sum(1)).min(), rtol=1e-12)
  assert curve["points"][1]["beta"] == 1e-3
  assert curve["prompts_without_an_in_range_sample"] == 0
  np.testing.assert_allclose(curve["sft"]["length_reward"], reward.mean(), rtol=1e-12)
  # With the rule relaxed, the values themselves.
  got = stages.optimum.expectations(reward, {"mean_length": lengths.astype(float)}, beta, 4,
                                    min_ess=1)
  np.testing.assert_allclose(got.values["mean_length"], np.mean((w * lengths.reshape(2, 4)).sum(1)),
                             rtol=1e-12)


class _FakeJudge:
  """rewards(prompts, tokens): the first token of each response as its score."""

  def rewards(self, prompts, tokens):
    assert len(prompts) == len(tokens)
    return np.asarray(tokens)[:, 0].astype(np.float32)


class _NegatedJudge(_FakeJudge):

  def rewards(self, prompts, tokens):
    return -super().rewards(prompts, tokens)


def test_summarization_optimum_curve_win_rate_and_rewards():
  n = 16
  prompts = np.ones((3, 5), int)
  scores = np.random.default_rng(0).integers(0, 6, size=3 * n)
  tokens = np.stack([scores, np.ones_like(scores)], 1)
  gold = _FakeJudge()
  # The gold optimum at a small beta: every prompt's best sample, which beats the rest.
  curve = summarization.optimum_curve(gold, "gold", gold, prompts, tokens, [1e-4, 1e9])
  assert curve["reward"] == "gold" and curve["sft_samples_per_prompt"] == n
  sharp, flat = curve["points"]
  assert sharp["left_out"] and sharp["ess_min"] >= 1  # ties at the top share the weight
  # A huge beta is pi_sft: its win rate against pi_sft's other samples is 1/2.
  np.testing.assert_allclose(flat["gold_vs_sft"], 0.5, rtol=1e-6)
  np.testing.assert_allclose(flat["mean_gold_reward"], scores.mean(), rtol=1e-6)
  assert flat["ess_min"] > n - 1e-3
  # The optimum of the opposite reward, judged by gold, loses to SFT.
  curve = summarization.optimum_curve(gold, "anti", _NegatedJudge(), prompts, tokens, [1.0])
  point = stages.optimum.expectations(-scores.astype(float), {
      "w": stages.optimum.win_rate_against_samples(scores, n)}, 1.0, n, min_ess=1)
  assert curve["points"][0]["left_out"] is (point.ess_min < stages.optimum.MIN_ESS)
  if not curve["points"][0]["left_out"]:
    np.testing.assert_allclose(curve["points"][0]["gold_vs_sft"], point.values["w"], rtol=1e-12)
  assert point.values["w"] < 0.5
  np.testing.assert_allclose(curve["sft"]["mean_trained_reward"], -scores.mean(), rtol=1e-6)


@pytest.mark.parametrize("samples", ["1", "0"])
def test_too_few_optimum_samples_is_a_one_line_error(samples, monkeypatch):
  real = common.preset_macros

  def fake(preset, names):
    got = real(preset, names)
    return {**got, **({"FIG2_OPTIMUM_SAMPLES": int(samples)}
                      if "FIG2_OPTIMUM_SAMPLES" in got else {})}

  monkeypatch.setattr(common, "preset_macros", fake)
  with pytest.raises(SystemExit, match=f"FIG2_OPTIMUM_SAMPLES = {samples}: the optimum needs"):
    stages.read_grid("smoke", "FIG2", None)
