"""The Figure 3 and 7 drivers: preference-pair labelling, λ grids, agreement and reports
(fast), and smoke runs (slow)."""
import dataclasses
import json
import os
import shlex

import numpy as np
import pytest

import figure_checks
from deranj.data import pipeline
from experiments import common
from experiments import judging
from experiments import stages
from experiments import summarization


@pytest.mark.parametrize("margin", [-3.0, 0.0, 1.0])
def test_bradley_terry_labels_follow_the_sigmoid_of_the_margin(margin):
  n = 4000
  first = stages.bradley_terry_choices(np.full(n, 2.0 + margin), np.full(n, 2.0), (7, 0))
  p = 1 / (1 + np.exp(-margin))
  # Binomial: 4 standard deviations of the frequency (a fixed seed, so no flakes).
  assert abs(first.mean() - p) < 4 * np.sqrt(p * (1 - p) / n), (first.mean(), p)
  # Each pair draws from its own generator: its label does not depend on the others.
  np.testing.assert_array_equal(
      stages.bradley_terry_choices(np.full(10, 2.0 + margin), np.full(10, 2.0), (7, 0)),
      first[:10])
  other_seed = stages.bradley_terry_choices(np.full(n, 2.0 + margin), np.full(n, 2.0), (8, 0))
  assert not np.array_equal(other_seed, first)


def test_label_pairs_keep_ties_identical_texts_and_the_sampled_ids():
  prompts = [f"doc {i}" for i in range(400)]
  a, b = [f"a{i}" for i in range(400)], [f"b{i}" for i in range(400)]
  a[0] = b[0] = "same"
  ids = ([(9, i + 2, 1) for i in range(400)], [(5, i + 2) for i in range(400)],
         [(6, i + 2, 1) for i in range(400)])
  pairs = stages.label_pairs(prompts, a, b, np.zeros(400), np.zeros(400), (0, 1), ids=ids)
  assert len(pairs) == 400  # equal scores and identical texts are kept
  assert pairs[0].chosen == pairs[0].rejected == "same"
  chose_a = [p.chosen_ids == ids[1][i] for i, p in enumerate(pairs)]
  assert 0.4 < np.mean(chose_a) < 0.6  # a tie is a coin flip
  for i, p in enumerate(pairs):  # texts and ids go together
    assert p.prompt_ids == ids[0][i]
    assert (p.chosen, p.rejected, p.chosen_ids, p.rejected_ids) == (
        (a[i], b[i], ids[1][i], ids[2][i]) if chose_a[i] else (b[i], a[i], ids[2][i], ids[1][i]))
  with pytest.raises(ValueError, match="one of each per pair"):
    stages.label_pairs(["x"], ["a"], ["b", "c"], [1.0], [0.0], (0,))


def test_pairs_labelled_by_another_rule_are_not_reused(tmp_path):
  ctx = stages.Context("smoke", str(tmp_path))
  for split in ("train", "validation"):
    stages.preferences.write_pairs(os.path.join(ctx.pairs_dir, f"{split}.jsonl"),
                                   [stages.preferences.PreferencePair("p", "c", "r")])
  grid = stages.Grid([1.0], 1, 1, 1, 1, 1, 1)
  with pytest.raises(SystemExit, match=r"not labelled by the current rule \(no labels\.json"):
    stages.make_pairs(ctx, {}, grid, None, None, None, seed=0)
  stages.common.write_json(os.path.join(ctx.pairs_dir, "labels.json"),
                           {"rule": stages.LABEL_RULE, "seed": 3, "train": {"pairs": 1}})
  labels = stages.make_pairs(ctx, {}, grid, None, None, None, seed=0)
  assert labels["rule"] == stages.LABEL_RULE and labels["seed"] == 3
  assert labels["validation"] == {"pairs": 1, "reused": True}
  # Made with one pair per training prompt (labels.json says so, or is older and silent):
  # a preset asking for more is refused, not silently given the old pairs.
  more = stages.Grid([1.0], 1, 1, 1, 1, 1, 1, pairs_per_prompt=4)
  with pytest.raises(SystemExit, match=r"made with 1 pair\(s\) per training prompt, the "
                     r"preset asks for PAIRS_PER_PROMPT = 4"):
    stages.make_pairs(ctx, {}, more, None, None, None, seed=0)


def test_presets_give_the_pairs_per_prompt():
  for preset in ("smoke", "tiny", "paper"):
    grid = stages.read_grid(preset, "SUMMARIZATION", None)
    assert grid.pairs_per_prompt == 1 and grid.pair_prompts > 0
  assert stages.read_grid("tiny", "FIG2", None).pairs_per_prompt == 1  # unused there
  # tiny_pairs32 is tiny with more pairs and one epoch of DPO over them.
  many = stages.read_grid("tiny_pairs32", "SUMMARIZATION", None)
  tiny = stages.read_grid("tiny", "SUMMARIZATION", None)
  assert many.pairs_per_prompt == 32
  assert dataclasses.replace(many, pairs_per_prompt=1) == tiny
  names = ["DPO_STEPS", "DPO_BATCH_SIZE", "DPO_LEARNING_RATE", "GOLD_RM_STEPS", "SFT_STEPS"]
  ours, theirs = (common.preset_macros(p, names) for p in ("tiny_pairs32", "tiny"))
  assert ours["DPO_STEPS"] > theirs.pop("DPO_STEPS") and ours == {**theirs, "DPO_STEPS": 700}


def test_beta_bindings_scale_dpo_learning_rate_only_where_the_preset_asks(tmp_path, monkeypatch):
  assert stages.beta_bindings("tiny", "dpo", 0.01) == ["BETA = 0.01"]  # macro unset: off
  assert stages.beta_bindings("tiny_pairs32_betalr", "pg", 0.01) == ["BETA = 0.01"]
  lr = common.preset_macros("tiny_pairs32_betalr", ["DPO_LEARNING_RATE"])["DPO_LEARNING_RATE"]
  for beta in (0.2, 0.1, 0.01):
    got = stages.beta_bindings("tiny_pairs32_betalr", "dpo", beta)
    assert got[0] == f"BETA = {beta!r}" and got[1].startswith("DPO_LEARNING_RATE = ")
    assert float(got[1].split("=")[1]) == pytest.approx(lr * 0.1 / beta, rel=1e-12)
  (tmp_path / "presets").mkdir()  # a preset may set macros a run does not read
  bad = tmp_path / "presets" / "bad.gin"
  bad.write_text("include 'configs/presets/tiny.gin'\nDPO_LR_REFERENCE_BETA = -1\n")
  monkeypatch.setitem(common.PRESET_FILES, "bad", str(bad))
  with pytest.raises(SystemExit, match=r"bad.gin: DPO_LR_REFERENCE_BETA = -1: expected None"):
    stages.beta_bindings("bad", "dpo", 0.1)


def test_documents_strip_the_task_prefix():
  split = pipeline.Split(
      features={}, texts={"inputs": ["summarize: the cat sat.", "no prefix"]})
  assert stages.documents(split) == ["the cat sat.", "no prefix"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """One work directory for both figures: they share the SFT run, gold reward model and
  pairs, as the drivers do when given the same --workdir."""
  return str(tmp_path_factory.mktemp("figs"))


def _check(result, workdir, figure, lams, stdout):
  with open(os.path.join(workdir, f"fig{figure}.json")) as f:
    saved = json.load(f)
  assert saved["lams"] == lams
  assert saved["pairs"]["rule"] == stages.LABEL_RULE  # Bradley-Terry labels, written down
  pairs = stages.preferences.read_pairs(os.path.join(workdir, "pairs", "train.jsonl"))
  assert all(p.has_ids for p in pairs)  # the sampled ids, for DPO and the reward model
  assert saved["win_rate_interval"]["resamples"] == 2000  # bootstrapped over prompts
  assert [r["lam"] for r in saved["per_lam"]] == lams
  n = saved["num_prompts"] * saved["samples_per_prompt"]
  held_out = saved["held_out_pairs"]
  for row in saved["per_lam"]:
    for method in stages.METHODS:
      for judge in judging.JUDGES:
        keys = ("vs_sft", "vs_beta") + (() if method == "retrained" else ("vs_retrained",))
        for key in keys:
          w = row[method][judge][key]
          assert w["n"] == n, (method, judge, key, w)
          # Outcomes are 1, 1/2 or 0: the rate is a multiple of 1 / (2n).
          assert abs(2 * n * w["rate"] - round(2 * n * w["rate"])) < 1e-9 * n, w
    for method in ("dera", "retrained"):  # k of the held-out pairs
      k = row[method]["pairwise_accuracy"] * held_out
      assert abs(k - round(k)) < 1e-9 * held_out
  beta_row = saved["per_lam"][lams.index(1.0)]
  # The β model against itself (the same samples): every ROUGE-L comparison ties.
  assert beta_row["retrained"]["rouge_l"]["vs_beta"] == {"rate": 0.5, "low": 0.5, "high": 0.5,
                                                         "n": n}
  # DeRa at λ = 1 is the aligned model: the same eq. 14 accuracy.
  assert beta_row["dera"]["pairwise_accuracy"] == beta_row["retrained"]["pairwise_accuracy"]
  assert saved["dera_sweep_compiles"] == 1  # one compiled sampler for the whole grid
  agree = saved["agreement"]["gold/vs_sft"]
  assert agree["spearman_p_method"] == "exact permutation"
  assert (agree["spearman"] is None) == (agree["spearman_p"] is None)
  assert os.path.getsize(os.path.join(workdir, f"fig{figure}.png")) > 0
  assert saved["trained_runs"] == result["trained_runs"] > 0
  figure_checks.optimum_and_runs(saved, "gold_vs_sft", "pg" if figure == "3" else "dpo", stdout)
  assert ("proxy" in saved["optimum"]["reward"]) == (figure == "3")
  assert "gold_vs_sft" in saved["optimum"]["metric"]
  for row in saved["per_lam"]:
    point = row["optimum"]
    if not point["left_out"]:
      assert 0 <= point["gold_vs_sft"] <= 1
      if figure == "7":  # defined by the gold reward itself
        assert point["mean_trained_reward"] == point["mean_gold_reward"]


@pytest.mark.slow
@pytest.mark.parametrize("figure", ["3", "7"])
def test_figure_smoke_run_then_rerun_skips_training(workdir, figure, capsys):
  if figure == "3":
    from experiments import fig3_policy_gradient as driver  # pylint: disable=g-import-not-at-top
  else:
    from experiments import fig7_dpo as driver  # pylint: disable=g-import-not-at-top
  argv = ["--preset", "smoke", "--workdir", workdir]  # the smoke grid: λ 0.5, 1, 2
  lams = [0.5, 1.0, 2.0]
  result = driver.main(argv)
  _check(result, workdir, figure, lams, capsys.readouterr().out)
  again = driver.main(argv)
  assert again["trained_runs"] == 0  # every run finished: all training skipped
  assert np.isfinite(again["per_lam"][0]["dera"]["gold"]["vs_sft"]["rate"])
  assert again["runs"] == json.loads(json.dumps(result["runs"]))  # read back from the runs
  if figure == "7":  # seeds: seed 0's runs reused, seed 1's trained, the spread reported
    seeds = driver.main(argv + ["--seeds", "0,1"])
    assert seeds["trained_runs"] == len(lams)
    assert seeds["per_lam"] == json.loads(json.dumps(again["per_lam"]))  # seed 0 as before
    assert [s["seed"] for s in seeds["per_seed"]] == [0, 1]
    assert [r["run"] for r in seeds["per_seed"][1]["runs"]] == [
        "dpo_beta0.2_seed1", "dpo_beta0.1_seed1", "dpo_beta0.05_seed1"]
    spread = seeds["across_seeds"]["per_lam"][0]["dera"]
    rates = [s["per_lam"][0]["dera"]["gold_vs_sft"]["rate"] for s in seeds["per_seed"]]
    assert spread["n"] == 2 and (spread["min"], spread["max"]) == (min(rates), max(rates))
    assert "over seeds 0,1" in capsys.readouterr().out


def test_a_drivers_model_gin_does_not_outlive_its_run(monkeypatch):
  """A driver's --model_gin reaches its own runs only: a later driver in the same process
  (a test session) trains the model its preset names."""
  seen = []
  monkeypatch.setattr(common, "train", lambda run_gin, preset, model_dir, bindings=():
                      seen.append(common.train_command(run_gin, preset, model_dir, bindings)))

  def fail_after_one_run(*args, **kwargs):
    common.train("configs/runs/sft.gin", "smoke", "/tmp/sft")
    raise RuntimeError("stop")

  monkeypatch.setattr(summarization, "_run", fail_after_one_run)
  with pytest.raises(RuntimeError):
    summarization.run("7", "dpo", "dpo", ["--preset", "smoke", "--workdir", "/tmp/x",
                                          "--model_gin", "configs/models/llama_tiny.gin"],
                      "", train_aligned=None)
  common.train("configs/runs/sft.gin", "smoke", "/tmp/sft")
  assert "--gin_file=configs/models/llama_tiny.gin" in seen[0]
  assert "llama_tiny" not in seen[1]


def test_report_says_when_spearman_is_undefined(capsys):
  rate = {"rate": 0.5, "low": 0.2, "high": 0.8}
  judged = {"gold": {"vs_sft": rate, "vs_beta": rate, "vs_retrained": rate},
            "mean_gold_reward": 0.25}
  row = {"lam": 2.0, "beta_over_lam": 0.05, "dera": {**judged, "pairwise_accuracy": 0.5},
         "retrained": {**judged, "pairwise_accuracy": 0.5, "plateau": False},
         "dera_resampled": judged,
         "optimum": {"left_out": True, "ess_min": 3.25, "gold_vs_sft": None}}
  result = {"per_lam": [row], "lam_picked": {"by": "gold", "dera": 2.0},
            "agreement": {"gold/vs_sft": {"spearman": None, "mean_abs_difference": 0.0}},
            "trained_runs": 0, "wall_seconds": {"sft": 1.0}}
  summarization.report(result)
  out = capsys.readouterr().out
  assert "Spearman ρ(DeRa, retrained) = n/a (a constant side)" in out
  assert "| 2 | 0.05 | 0.50 [0.20, 0.80] |" in out  # win rates with their intervals
  # The optimum's point left out (ESS 3.25 < 10); the retrained run not at a plateau.
  assert "| left out (3.2) |" in out and out.rstrip().split("\n")[-3].endswith(
      "| 0.25 / 0.25 / left out | no |")


def test_parse_lams_one_rule_one_line_errors():
  from deranj import dera  # pylint: disable=g-import-not-at-top
  from experiments import common  # pylint: disable=g-import-not-at-top
  assert dera.parse_lams(" 2, 0,-1.5,") == [2.0, 0.0, -1.5]  # order kept; 0 and < 0 allowed
  for text, message in (("0,x", "expected comma-separated numbers"), (",", "is empty"),
                        ("0,nan", "must be finite, got \\[nan\\]"),
                        ("1,0.5,1", "\\[1.0\\] given more than once")):
    with pytest.raises(ValueError, match=f"^--lam.*{message}") as e:
      dera.parse_lams(text)
    assert "\n" not in str(e.value)
  with pytest.raises(ValueError, match="--lams='0.5,0': every value must be positive"):
    dera.parse_lams("0.5,0", positive=True, flag="--lams")
  # The drivers' grid: sorted, with the aligned model's λ = 1 added once.
  assert common.parse_lams("2,0.5", add_one=True) == [0.5, 1.0, 2.0]
  assert common.parse_lams("4,1,0.25", add_one=True) == [0.25, 1.0, 4.0]
  with pytest.raises(SystemExit, match="^error: --lams='-1': every value must be positive"):
    common.parse_lams("-1")


def test_agreement_reports_rho_with_its_p_value():
  from experiments import common  # pylint: disable=g-import-not-at-top
  agree = common.agreement([0.25, 0.5, 1, 2, 4], [1, 2, 3, 4, 5], [4, 3, 5, 1, 2])
  assert agree["spearman_p_method"] == "exact permutation"
  np.testing.assert_allclose([agree["spearman"], agree["spearman_p"]], [-0.6, 0.35], rtol=1e-12)
  assert (agree["lam_picked_by_dera"], agree["lam_picked_by_retrained"]) == (4.0, 1.0)
  assert common.spearman_text(agree) == "-0.600 (p = 0.35, exact permutation)"


@pytest.mark.slow
def test_decoding_compare_smoke_run_reuses_the_figure_runs(workdir):
  """The comparison on the Figure 7 setting: after Figures 3 and 7 (same work directory)
  only the second DPO round trains; alone, all five runs do."""
  from deranj.training import checkpoints  # pylint: disable=g-import-not-at-top
  from experiments import decoding_compare as dc  # pylint: disable=g-import-not-at-top
  runs = ["sft", "gold_rm", "proxy_rm", "dpo_beta0.1", "dpo2_aad_beta0.1"]
  before = [checkpoints.is_finished(os.path.join(workdir, r)) for r in runs]
  result = dc.main(["--preset", "smoke", "--workdir", workdir])
  assert result["trained_runs"] == before.count(False) > 0
  with open(os.path.join(workdir, "decoding_compare.json")) as f:
    saved = json.load(f)
  assert saved["lams"] == [0.5, 1.0, 2.0] and saved["alphas"] == [0.05, 0.1, 0.2, 0.5]
  val = saved["validation"]
  rewards = [r["mean_gold_reward"] for r in val["per_lam"]]
  assert rewards[saved["lams"].index(val["lam_picked"])] == max(rewards)
  assert val["dera_lam1_matches_greedy_dpo"] == 1.0  # λ = 1 weighs the SFT model by 0
  arms = {a["name"]: a for a in saved["arms"]}
  assert list(arms) == (
      ["greedy_sft", "greedy_dpo", f"dera_lam{val['lam_picked']:g}"]
      + [f"aad_alpha{a:g}" for a in saved["alphas"]]
      + [f"best_of{n}_{s}" for n in (2, 8, 32) for s in ("proxy_rm", "implicit")])
  n = saved["num_prompts"]
  for name, arm in arms.items():
    for judge in ("gold", "rouge_l_judge"):
      w = arm[judge]
      assert 0 <= w["low"] <= w["rate"] <= w["high"] <= 1 and w["n"] == n, (name, w)
      assert abs(2 * n * w["rate"] - round(2 * n * w["rate"])) < 1e-9 * n  # 1, 1/2 or 0 each
    assert 0 < arm["mean_length"] <= 24 and 0 <= arm["rouge_l"] <= 100
    assert np.isfinite(arm["mean_gold_reward"]) and arm["relative_time"] > 0
  # Greedy DPO against itself: every comparison a tie.
  assert arms["greedy_dpo"]["gold"] == {"rate": 0.5, "low": 0.5, "high": 0.5, "n": n}
  assert arms["greedy_dpo"]["relative_time"] == 1.0
  # AAD at alpha = 1 keeps only the DPO argmax: greedy DPO, from the same compiled sweep.
  assert saved["checks"] == {"aad_alpha1_matches_greedy_dpo": 1.0, "aad_sweep_compiles": 1}
  for name in (a for a in arms if a.startswith("best_of")):
    check = {k: np.asarray(v) for k, v in arms[name]["check"].items()}
    assert check["candidate_max"].shape == (n,)
    # The chosen output, scored again on its own, has the best candidate's score (float32
    # sums of up to 24 tokens per model: a relative tolerance on their magnitude).
    np.testing.assert_array_less(np.abs(check["chosen_rescored"] - check["candidate_max"]),
                                 1e-6 * 24 * check["scale"] + 1e-30)
  assert saved["eft"]["applicable"] is False and "vocabulary" in saved["eft"]["reason"]
  loop = saved["data_loop"]
  pairs = loop["pairs"]
  assert pairs["train"]["pairs"] + pairs["train"]["identical"] == pairs["train"]["prompts"] == 24
  assert loop["init_and_reference"] == os.path.join(workdir, "dpo_beta0.1")
  assert checkpoints.is_finished(loop["run"])
  train = stages.preferences.read_pairs(os.path.join(workdir, "aad_pairs", "train.jsonl"))
  assert len(train) == pairs["train"]["pairs"] and all(p.chosen_ids != p.rejected_ids
                                                       for p in train)
  w = loop["greedy_vs_first_dpo"]["gold"]
  assert 0 <= w["low"] <= w["rate"] <= w["high"] <= 1 and w["n"] == n
  assert os.path.getsize(os.path.join(workdir, "decoding_compare.png")) > 0


@pytest.mark.slow
def test_dpo_pairs_probe_trains_on_k_pairs_per_prompt(workdir):
  """The Figure 7 diagnostic on the figures' work directory (made here when this test
  runs alone): k pairs per training prompt, the same held-out pairs, every evaluation."""
  from deranj.data import preferences  # pylint: disable=g-import-not-at-top
  from experiments import dpo_pairs_probe  # pylint: disable=g-import-not-at-top
  from experiments import fig7_dpo  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(os.path.join(workdir, "pairs", "validation.jsonl")):
    fig7_dpo.main(["--preset", "smoke", "--workdir", workdir])
  out = os.path.join(workdir, "probe")
  result = dpo_pairs_probe.main(["--preset", "smoke", "--workdir", workdir, "--out", out,
                                 "--pairs_per_prompt", "2", "--steps", "4",
                                 "--eval_every", "2"])
  read = lambda d, split: preferences.read_pairs(os.path.join(d, "pairs", f"{split}.jsonl"))
  figure_pairs, probe_pairs = read(workdir, "train"), read(out, "train")
  assert len(probe_pairs) == 2 * len(figure_pairs) == result["pairs"]["pairs"]
  prompts = [p.prompt for p in probe_pairs]
  assert prompts[0::2] == prompts[1::2] == [p.prompt for p in figure_pairs]
  assert all(p.has_ids for p in probe_pairs)
  assert read(out, "validation") == read(workdir, "validation")
  held_out = len(read(workdir, "validation"))
  assert [e["step"] for e in result["held_out"]] == [2, 4]
  for e in result["held_out"]:
    assert np.isfinite(e["loss"])
    assert abs(e["accuracy"] * held_out - round(e["accuracy"] * held_out)) < 1e-6 * held_out
  with open(os.path.join(out, "probe.json")) as f:
    assert json.load(f)["held_out"] == result["held_out"]
  # Run again: the pairs and the finished run are reused, with the count they were made at.
  again = dpo_pairs_probe.main(["--preset", "smoke", "--workdir", workdir, "--out", out,
                                "--pairs_per_prompt", "2", "--steps", "4", "--eval_every", "2"])
  assert again["pairs"] == {**result["pairs"], "reused": True}
  assert again["held_out"] == result["held_out"]
  with pytest.raises(SystemExit,
                     match=r"holds 2 pair\(s\) per prompt, not --pairs_per_prompt 3"):
    dpo_pairs_probe.main(["--preset", "smoke", "--workdir", workdir, "--out", out,
                          "--pairs_per_prompt", "3"])


def test_proxy_probe_orders_as_gold_by_hand():
  from experiments import proxy_rm_probe  # pylint: disable=g-import-not-at-top
  gold = [[1.0, 2.0, 3.0], [0.0, 0.0, 1.0]]
  proxy = [[1.0, 3.0, 2.0], [5.0, 5.0, 5.0]]
  # Prompt 0: (0,1) and (0,2) ordered as gold, (1,2) not; prompt 1: (0,1) has equal gold
  # rewards (left out), (0,2) and (1,2) are proxy ties (a half each). 3 of 5 pairs.
  # Spearman: prompt 0 ranks (1,2,3) vs (1,3,2): 1 - 6 * 2 / (3 * 8) = 0.5; prompt 1's
  # proxy is constant (left out).
  assert proxy_rm_probe.ordering_agreement(gold, proxy) == {
      "pairs": 5, "agreement": 0.6, "mean_spearman": 0.5, "prompts_with_spearman": 1}


def test_proxy_probe_keeps_the_first_k_pairs_of_each_prompt(tmp_path):
  from deranj.data import preferences  # pylint: disable=g-import-not-at-top
  from experiments import proxy_rm_probe  # pylint: disable=g-import-not-at-top
  figures = stages.Context("smoke", str(tmp_path / "figs"))
  os.makedirs(figures.pairs_dir)
  pairs = [preferences.PreferencePair(f"doc {i}", f"c{i}.{j}", f"r{i}.{j}")
           for i in range(2) for j in range(3)]
  preferences.write_pairs(os.path.join(figures.pairs_dir, "train.jsonl"), pairs)
  preferences.write_pairs(os.path.join(figures.pairs_dir, "validation.jsonl"), pairs[:1])
  common.write_json(os.path.join(figures.pairs_dir, stages.LABELS_FILE), {
      "rule": stages.LABEL_RULE, "train": {"prompts": 2, "pairs": 6, "pairs_per_prompt": 3}})
  probe = stages.Context("smoke", str(tmp_path / "probe"))
  stats = proxy_rm_probe.first_pairs(figures, probe, 2)
  assert stats == {"from": figures.pairs_dir, "prompts": 2, "pairs": 4, "pairs_per_prompt": 2}
  read = lambda split: preferences.read_pairs(os.path.join(probe.pairs_dir, f"{split}.jsonl"))
  assert [p.chosen for p in read("train")] == ["c0.0", "c0.1", "c1.0", "c1.1"]
  assert read("validation") == pairs[:1]
  assert stages.check_labels_file(probe.pairs_dir)["train"] == stats
  assert proxy_rm_probe.first_pairs(figures, probe, 2) == {**stats, "reused": True}
  with pytest.raises(SystemExit, match=r"holds 2 pair\(s\) per prompt .*not --pairs_per_prompt 1"):
    proxy_rm_probe.first_pairs(figures, probe, 1)
  with pytest.raises(SystemExit, match=r"holds 3 pair\(s\) per training prompt; give 1..3"):
    proxy_rm_probe.first_pairs(figures, stages.Context("smoke", str(tmp_path / "p4")), 4)


@pytest.mark.slow
def test_proxy_rm_probe_trains_and_scores_against_gold(workdir):
  """The Figure 3 diagnostic on the figures' work directory (made here when this test runs
  alone): a proxy reward model on their pairs, its gold agreement on fresh SFT samples."""
  from experiments import fig7_dpo  # pylint: disable=g-import-not-at-top
  from experiments import proxy_rm_probe  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(os.path.join(workdir, "pairs", "validation.jsonl")):
    fig7_dpo.main(["--preset", "smoke", "--workdir", workdir])
  argv = ["--preset", "smoke", "--workdir", workdir, "--steps", "4", "--eval_samples", "3"]
  result = proxy_rm_probe.main(argv)
  out = os.path.join(workdir, "proxy_rm_probe_k1")
  prompts = common.preset_macros("smoke", ["SUMMARIZATION_PROMPTS"])["SUMMARIZATION_PROMPTS"]
  agreement = result["gold_agreement"]
  assert agreement["prompts"] == prompts and agreement["samples_per_prompt"] == 3
  assert 0 < agreement["pairs"] <= 3 * prompts and 0 <= agreement["agreement"] <= 1
  assert [e["step"] for e in result["held_out"]] == [1, 2, 3, 4]
  assert all(0 <= e["accuracy"] <= 1 and np.isfinite(e["loss"]) for e in result["held_out"])
  with open(os.path.join(out, "probe.json")) as f:
    assert json.load(f) == json.loads(json.dumps(result))
  again = proxy_rm_probe.main(argv)  # pairs and the finished run reused, same samples
  assert again["pairs"] == {**result["pairs"], "reused": True}
  assert again["gold_agreement"] == agreement


class _Stop(Exception):
  """Ends a summarization driver after its training runs."""


def test_fig7_seeds_train_the_sweeps_runs_with_its_commands(tmp_path, monkeypatch, capsys):
  """`fig7_dpo.py --seeds 0,1` trains each seed's DPO runs in scripts/sweep.py's
  directories with the command lines `sweep.py --seeds 0,1` prints: either reuses the
  other's runs."""
  from experiments import fig7_dpo  # pylint: disable=g-import-not-at-top
  from scripts import sweep  # pylint: disable=g-import-not-at-top
  started = []

  def train(run_gin, preset, model_dir, bindings=()):
    started.append(common.train_command(run_gin, preset, model_dir, bindings))
    return True

  def stop(*args, **kwargs):
    raise _Stop()

  monkeypatch.setattr(common, "train", train)
  monkeypatch.setattr(summarization, "base_stages", lambda *a, **k: (None, (None, None), {}))
  monkeypatch.setattr(summarization.pipeline, "load", stop)  # after the training runs
  workdir = tmp_path / "figs"
  with pytest.raises(_Stop):
    fig7_dpo.main(["--preset", "smoke", "--workdir", str(workdir), "--lams", "0.5,2",
                   "--seeds", "0,1"])
  # Of 8: SFT and the gold reward model (stubbed here, so not counted), 3 runs per seed.
  assert "-- run 6 of 8: dpo_beta0.05_seed1" in capsys.readouterr().out
  ctx = stages.Context("smoke", str(workdir))
  expected = [r.command for r in sweep.plan(
      "configs/runs/dpo.gin", "smoke", str(workdir), ctx.sft_dir,
      [(0.1 / lam, lam) for lam in (1.0, 0.5, 2.0)], [0, 1], ctx.pair_bindings())]
  # The same run file, preset, directory and bindings (the order may differ).
  as_set = lambda commands: [sorted(shlex.split(c)) for c in commands]  # noqa: E731
  assert as_set(started) == as_set(expected)
  assert [os.path.basename(c.split("MODEL_DIR=")[1].split()[0].strip("\"'"))
          for c in started] == ["dpo_beta0.1", "dpo_beta0.2", "dpo_beta0.05",
                                "dpo_beta0.1_seed1", "dpo_beta0.2_seed1", "dpo_beta0.05_seed1"]
  with pytest.raises(SystemExit, match="give one"):
    fig7_dpo.main(["--preset", "smoke", "--workdir", str(workdir), "--seed", "1",
                   "--seeds", "0,1"])


def test_across_seeds_spreads_the_gold_win_rates_and_agreement():
  def seed(s, dera, retrained, rho):
    rows = [{"lam": lam, "beta_over_lam": 0.1 / lam,
             **{m: {"gold_vs_sft": {"rate": v}, "mean_gold_reward": 0.0,
                    "pairwise_accuracy": None}
                for m, v in (("dera", d), ("retrained", r), ("dera_resampled", d))}}
            for lam, d, r in zip((0.5, 1.0, 2.0), dera, retrained)]
    return {"seed": s, "per_lam": rows,
            "agreement": {"gold/vs_sft": {"spearman": rho, "mean_abs_difference": 0.1 * s}}}
  spread = summarization.across_seeds([seed(0, (0.5, 0.6, 0.7), (0.5, 0.6, 0.8), 1.0),
                                       seed(1, (0.4, 0.6, 0.9), (0.5, 0.7, 0.7), None)])
  assert spread["seeds"] == [0, 1]
  first = spread["per_lam"][0]["dera"]
  assert first["n"] == 2 and first["min"] == 0.4 and first["max"] == 0.5
  assert first["mean"] == pytest.approx(0.45) and first["std"] == pytest.approx(0.0707107)
  assert spread["spearman"]["per_seed"] == [1.0, None] and spread["spearman"]["n"] == 1
  assert spread["mean_abs_difference"]["mean"] == pytest.approx(0.05)
