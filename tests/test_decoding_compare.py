"""experiments/decoding_compare.py's helpers (fast); its smoke run is in
test_experiments.py (it shares that module's work directory with Figures 3 and 7)."""
import json
import os

import numpy as np
import pytest

from deranj.data import pipeline
from experiments import decoding_compare as dc
from experiments import stages


def test_calls_of_fills_calls_with_candidate_rows():
  assert dc.calls_of(32, 1, 4) == 4  # never more prompts than there are
  assert dc.calls_of(32, 8, 100) == 4
  assert dc.calls_of(32, 32, 100) == 1
  assert dc.calls_of(4, 32, 100) == 1  # at least one prompt, even over the row budget
  assert dc.calls_of(42, 2, 42) == 21


def test_pick_lam_takes_the_best_then_the_closest_to_one():
  assert dc.pick_lam([0.5, 1.0, 2.0, 5.0], [0.1, 0.2, 0.4, 0.3]) == 2.0
  assert dc.pick_lam([0.5, 1.0, 2.0], [0.3, 0.3, 0.3]) == 1.0  # all tied: the DPO model
  assert dc.pick_lam([0.25, 0.5, 4.0], [0.3, 0.1, 0.3]) == 0.25  # |log| tie: the smaller
  assert dc.pick_lam([0.5, 2.0, 10.0], [0.3, 0.3, 0.1]) == 0.5
  assert dc.pick_lam([0.5, 2.0, 10.0], [0.1, 0.3, 0.3]) == 2.0


def _tokens(rows):
  out = np.zeros((len(rows), 6), np.int32)
  for i, row in enumerate(rows):
    out[i, :len(row)] = row
  return out


def test_loop_pairs_keep_the_ids_and_drop_identical_pairs_on_request():
  prompts = _tokens([[50, 51, 1], [52, 1], [53, 54, 55, 1]])
  chosen = _tokens([[60, 61, 1], [62, 1], [63, 64, 65, 66, 67, 68]])  # row 2 hit the length
  rejected = _tokens([[70, 1], [62, 1], [63, 1]])
  docs = ["d0", "d1", "d2"]
  pairs, same = dc.loop_pairs(docs, prompts, chosen, rejected, drop_identical=True)
  assert same == 1
  assert [p.prompt for p in pairs] == ["d0", "d2"]
  assert pairs[0].prompt_ids == (50, 51, 1)
  assert pairs[0].chosen_ids == (60, 61, 1) and pairs[0].rejected_ids == (70, 1)
  assert pairs[1].chosen_ids == (63, 64, 65, 66, 67, 68)  # no EOS: every id kept
  assert pairs[1].chosen == stages.decode_all(chosen)[2]
  kept, same = dc.loop_pairs(docs, prompts, chosen, rejected, drop_identical=False)
  assert same == 1 and [p.prompt for p in kept] == docs
  assert kept[1].chosen_ids == kept[1].rejected_ids == (62, 1)


def test_make_loop_pairs_writes_once_then_reuses(tmp_path):
  split = lambda n: pipeline.Split(
      features={"prompts": _tokens([[50 + i, 1] for i in range(n)])},
      texts={"inputs": [f"summarize: doc {i}" for i in range(n)]})
  calls = []

  def chosen(enc):
    calls.append(len(enc))
    return _tokens([[80, 1]] + [[81 + i, 1] for i in range(len(enc) - 1)])

  rejected = lambda enc: _tokens([[80, 1]] * len(enc))  # row 0 equals the chosen one
  pairs_dir = str(tmp_path / "aad_pairs")
  stats = dc.make_loop_pairs(pairs_dir, {"train": split(3), "validation": split(2)}, chosen,
                             rejected)
  assert stats["rule"] == dc.LOOP_RULE
  assert stats["train"] == {"prompts": 3, "pairs": 2, "identical": 1}  # dropped in train
  assert stats["validation"] == {"prompts": 2, "pairs": 2, "identical": 1}  # kept
  train = stages.preferences.read_pairs(os.path.join(pairs_dir, "train.jsonl"))
  assert [p.prompt for p in train] == ["doc 1", "doc 2"]  # the task adds the prefix back
  assert all(p.chosen_ids != p.rejected_ids for p in train)
  assert calls == [3, 2]
  again = dc.make_loop_pairs(pairs_dir, {"train": split(3), "validation": split(2)}, chosen,
                             rejected)
  assert calls == [3, 2] and again == {**stats, "reused": True}
  # Pairs made by another rule (or half-written: no labels.json) are made again.
  with open(os.path.join(pairs_dir, "labels.json"), "w") as f:
    json.dump({"rule": "something else"}, f)
  dc.make_loop_pairs(pairs_dir, {"train": split(3), "validation": split(2)}, chosen, rejected)
  assert calls == [3, 2, 3, 2]


def test_timed_decode_times_the_pass_after_a_compiling_call():
  seen = []

  def fn(i, x, y):
    seen.append((i, len(x)))
    return x * 10 + y

  x, y = np.arange(5), np.arange(5) * 2
  out, seconds = dc.timed_decode(fn, (x, y), 2, "test")
  np.testing.assert_array_equal(out, x * 10 + y)
  assert seen == [(0, 2), (0, 2), (1, 2), (2, 2)]  # warm-up on batch 0, then the pass
  assert seconds >= 0


def test_parse_settings_sorts_and_names_the_bad_macro():
  good = {"COMPARE_ALPHAS": [0.2, 0.05], "COMPARE_BEST_OF": [8, 2], "COMPARE_VAL_PROMPTS": 8}
  assert dc.parse_settings("smoke", good) == {"alphas": [0.05, 0.2], "best_of": [2, 8],
                                              "val_prompts": 8}
  for key, value, message in (
      ("COMPARE_ALPHAS", [0.1, 1.5], r"COMPARE_ALPHAS=.*every value must be in \(0, 1\]"),
      ("COMPARE_ALPHAS", [0.1, 0.1], r"COMPARE_ALPHAS=.*given more than once"),
      ("COMPARE_BEST_OF", [0, 2], "COMPARE_BEST_OF = \\[0, 2\\]: give distinct"),
      ("COMPARE_BEST_OF", [], "COMPARE_BEST_OF = \\[\\]")):
    with pytest.raises(SystemExit, match=f"^error: configs/presets/smoke.gin: .*{message}") as e:
      dc.parse_settings("smoke", {**good, key: value})
    assert "\n" not in str(e.value)


def _result(loop: bool) -> dict:
  w = lambda rate: {"rate": rate, "low": rate - 0.1, "high": rate + 0.1, "n": 4}
  arm = lambda name, rate, t: {"name": name, "gold": w(rate), "mean_gold_reward": 0.25,
                               "rouge_l": 12.5, "mean_length": 7.0, "relative_time": t}
  return {
      "beta": 0.1, "preset": "smoke", "num_prompts": 4,
      "arms": [arm("greedy_dpo", 0.5, 1.0), arm("aad_alpha0.1", 0.75, 2.5)],
      "data_loop": ({"greedy_vs_first_dpo": arm("x", 0.625, 1.0)} if loop
                    else {"skipped": "no pair"}),
      "eft": {"applicable": False, "reason": "no larger model"},
      "validation": {"lam_picked": 2.0, "picked_by": "mean gold reward", "num_prompts": 8},
      "checks": {"aad_alpha1_matches_greedy_dpo": 1.0},
      "trained_runs": 1, "wall_seconds": {"a": 1.0, "b": 2.0}}


def test_report_prints_every_arm_the_loop_and_eft(capsys):
  dc.report(_result(loop=True))
  out = capsys.readouterr().out
  assert "| aad_alpha0.1 | 0.75 [0.65, 0.85] | 0.250 | 12.5 | 7.0 | 2.50x |" in out
  assert "| DPO round 2 on AAD pairs, greedy | 0.62 [0.53, 0.72] |" in out
  assert "| EFT | not applicable (below) |" in out and "\nEFT: no larger model\n" in out
  assert "DeRa's λ = 2 (mean gold reward on 8 validation prompts)" in out
  dc.report(_result(loop=False))
  assert "| DPO round 2 on AAD pairs | skipped: no pair |" in capsys.readouterr().out


def test_figure_writes_a_png(tmp_path):
  path = str(tmp_path / "f.png")
  dc.figure(_result(loop=True), path)
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
