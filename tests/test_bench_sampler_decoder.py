"""scripts/bench_sampler_decoder.py at --small, one round: every arm ran, the greedy check
(lam 1 and lam 0, every arm token for token with deranj) passed, the JSON has its keys.
Nothing is timed. Without trl 1.13 (TRL's GeometricMixtureWrapper was removed after it)
the trl arm is left out of the run, and the test checks that the run says why."""
import json
import os
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from scripts import bench_sampler_decoder as bench  # noqa: E402

TRL, TRL_MISSING = bench.load_trl_wrapper()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  path = tmp_path_factory.mktemp("bench") / "bench.json"
  report = bench.main(["--small", "--batch", "3", "--prompt_len", "12", "--new_tokens", "6",
                       "--rounds", "1", "--json", str(path)])
  return report, json.loads(path.read_text())


def test_dera_and_hf_ran_and_agree(run):
  report, saved = run
  assert set(saved) >= {"config", "skipped", "greedy_check", "arms", "ratios", "probes",
                        "loaded", "roofline"}
  assert saved["greedy_check"]["hf lam 1"] is True and saved["greedy_check"]["hf lam 0"] is True
  for arm in ("dera", "hf"):
    got = saved["arms"][arm]
    assert len(got["times"]) == 1 and got["min"] <= got["median"] <= got["max"]
    assert got["time_over_floor"] > 0 and got["time_over_memory_floor"] > 0
  assert {"deranj / hf (time)", "hf / deranj (speed-up)", "deranj / floor",
          "deranj / memory floor"} <= set(saved["ratios"])
  roof = saved["roofline"]
  assert roof["dera"]["steps"] == 6
  assert 0 < roof["memory_floor_s"] <= roof["floor_s"]
  assert len(saved["probes"]["rounds"]) == 1
  assert saved["config"]["shape"]["num_key_value_heads"] < \
      saved["config"]["shape"]["num_attention_heads"]  # GQA
  assert report["arms"].keys() == saved["arms"].keys()


def test_trl_arm_runs_and_agrees_or_says_why(run):
  """With trl 1.13 (the `bench` extra) the arm runs and agrees with the others; without it
  the run goes on without the arm and records why."""
  _, saved = run
  if TRL is None:
    assert "trl" not in saved["arms"] and saved["skipped"] == {"trl": TRL_MISSING}
    assert "pip install 'trl==1.13.0'" in TRL_MISSING
    return
  assert saved["skipped"] == {}
  assert saved["greedy_check"]["trl lam 1"] is True and saved["greedy_check"]["trl lam 0"] is True
  assert len(saved["arms"]["trl"]["times"]) == 1
  assert {"deranj / trl (time)", "trl / deranj (speed-up)"} <= set(saved["ratios"])


def test_roofline_counts_by_hand():
  from deranj.models import decoder
  cfg = decoder.DecoderConfig(vocab_size=10, hidden_size=8, intermediate_size=12, num_layers=1,
                              num_heads=2, num_kv_heads=1, head_dim=4)
  parts = bench.decode_step_cost(cfg, models=2, rows=3, prompt_len=5, position=1)
  # q, o 2*8*8; k, v 2*8*4; MLP 3*8*12 = 480 MACs; norms 3*8 + embedding rows 3*8 = 48.
  assert parts["layer weights"] == (2 * 4 * (480 + 48), 2 * 2 * 3 * 480)
  # 6 positions seen: K and V (4 wide) read over 6 and 1 written; scores + contexts.
  assert parts["KV cache"] == (2 * 4 * 2 * 3 * 4 * 7, 2 * 2 * 2 * 3 * 8 * 6)
  assert parts["output heads"] == (2 * 4 * 80, 2 * 2 * 3 * 80)
  roof = bench.roofline(cfg, models=2, rows=3, prompt_len=5, steps=2, read_bw=2.0,
                        matmul_rate=float("inf"))
  step = [sum(b for b, _ in bench.decode_step_cost(cfg, models=2, rows=3, prompt_len=5,
                                                   position=t).values()) for t in (0, 1)]
  assert roof["floor_s"] == roof["memory_floor_s"] == pytest.approx(sum(step) / 2.0)
