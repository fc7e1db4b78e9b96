"""`python -m deranj.sample` and whole-model loading."""
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

import numerics
import tiny_models
from deranj import dera
from deranj import gin_utils
from deranj import rewards
from deranj import sample
from deranj.data import files
from deranj.data import tokenizer
from deranj.models import base
from deranj.models import build
from deranj.models import loading
from deranj.training import reward_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _save_random_model(directory, seed, vocab_size=None, **metadata):
  cfg = build.T5Config(vocab_size=vocab_size or tokenizer.vocab_size(), d_model=16, d_kv=8,
                    d_ff=32, num_heads=2, num_layers=1, dropout_rate=0.0)
  params = tiny_models.random_params(base.EncoderDecoderModel(build.network(cfg)), seed)
  loading.save_model(str(directory), cfg, params, **metadata)
  return cfg, params


def _save_run(run_dir, seed, init_checkpoint, **metadata):
  """A finished training run as the trainer leaves it: model/ with its record, checkpoints/."""
  _save_random_model(run_dir / loading.RUN_MODEL_DIR, seed, objective="ppo", steps=10,
                     init_checkpoint=init_checkpoint, **metadata)
  (run_dir / loading.RUN_CHECKPOINTS_DIR / "10").mkdir(parents=True)
  return str(run_dir)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  root = tmp_path_factory.mktemp("models")
  _save_random_model(root / "ref", 0)
  _save_random_model(root / "aligned", 1)
  return str(root / "ref"), str(root / "aligned")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """An SFT run started from 'tiny' and an aligned run started from the SFT run."""
  root = tmp_path_factory.mktemp("runs")
  sft = _save_run(root / "sft", 0, "tiny")
  return sft, _save_run(root / "ppo", 1, sft)


def _config(checkpoints, **kw):
  return sample.SampleConfig(reference_checkpoint=checkpoints[0],
                             aligned_checkpoint=checkpoints[1], max_decode_len=6,
                             max_input_length=16, batch_size=2, **kw)


def _aligned_config(aligned, reference=None, **kw):
  return sample.SampleConfig(aligned_checkpoint=aligned, reference_checkpoint=reference,
                             max_decode_len=6, max_input_length=16, batch_size=2, **kw)


def _prompts(path, prompts):
  path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
  return str(path)


def test_save_and_load_model_roundtrip(tmp_path):
  cfg, params = _save_random_model(tmp_path / "m", 3)
  model, loaded = loading.load_model(str(tmp_path / "m"))
  assert model.config == cfg
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(loaded)):
    np.testing.assert_array_equal(a, b)
  assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]


def test_load_model_errors(tmp_path):
  with pytest.raises(loading.ModelLoadError, match="not a directory"):
    loading.load_model(str(tmp_path / "missing"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(loading.ModelLoadError, match="neither a deranj model directory"):
    loading.load_model(str(tmp_path / "empty"))
  _save_random_model(tmp_path / "bad", 0)
  (tmp_path / "bad" / loading.MSGPACK_FILE).write_bytes(b"\x00garbage")
  with pytest.raises(loading.ModelLoadError, match="params.msgpack"):
    loading.load_model(str(tmp_path / "bad"))


def test_reference_rule(runs, checkpoints):
  """No reference given: the aligned run's recorded init_checkpoint; given: warned if it
  differs. A run's MODEL_DIR stands for its model/."""
  sft, ppo = runs
  auto = sample.choose_checkpoints(_aligned_config(ppo))
  assert auto == sample.Choice(os.path.join(ppo, "model"), f"the final model of run {ppo}",
                               os.path.join(sft, "model"), "the aligned run's init_checkpoint")
  direct = sample.choose_checkpoints(_aligned_config(os.path.join(ppo, "model")))
  assert (direct.aligned, direct.aligned_why) == (os.path.join(ppo, "model"),
                                                  "SampleConfig.aligned_checkpoint")
  assert direct.reference == auto.reference
  for same in (sft, os.path.join(sft, "model"), os.path.join(sft, "model", "")):
    chosen = sample.choose_checkpoints(_aligned_config(ppo, same))
    assert chosen.reference_why == "SampleConfig.reference_checkpoint"
    assert chosen.warning is None, same
  other = sample.choose_checkpoints(_aligned_config(ppo, checkpoints[0]))
  assert other.reference == checkpoints[0]
  assert other.warning.startswith(f"warning: the reference {checkpoints[0]} is not the aligned "
                                  f"run's init_checkpoint {sft!r}")
  # The SFT run's own reference is the pretrained model it started from.
  assert sample.choose_checkpoints(_aligned_config(sft)).reference == "tiny"
  assert loading.read_metadata(ppo)["init_checkpoint"] == sft
  assert loading.read_metadata(checkpoints[1]) == {} == loading.read_metadata("tiny")


def test_reference_rule_errors(tmp_path, runs, checkpoints):
  sft, _ = runs
  with pytest.raises(sample.SampleError, match=r"^no aligned model: set SampleConfig\.aligned"):
    sample.choose_checkpoints(_aligned_config(None))
  with pytest.raises(sample.SampleError,
                     match=r"reference_checkpoint .*is required: the aligned model .*aligned "
                           r"records no init_checkpoint"):
    sample.choose_checkpoints(_aligned_config(checkpoints[1]))
  moved = _save_run(tmp_path / "moved", 1, str(tmp_path / "gone"))
  with pytest.raises(sample.SampleError, match=r"init_checkpoint '.*gone' \(recorded in .*moved/"
                                               r"model/deranj_model.json\) is not a directory"):
    sample.choose_checkpoints(_aligned_config(moved))
  # Given explicitly, the reference is used; the warning says the record cannot be checked.
  chosen = sample.choose_checkpoints(_aligned_config(moved, sft))
  assert chosen.reference == os.path.join(sft, "model")
  assert "cannot check the reference" in chosen.warning and "gone" in chosen.warning
  (tmp_path / "unfinished" / "checkpoints" / "4").mkdir(parents=True)
  with pytest.raises(sample.SampleError, match="unfinished.*has not finished"):
    sample.choose_checkpoints(_aligned_config(str(tmp_path / "unfinished")))
  with pytest.raises(sample.SampleError, match="reference_checkpoint=.*unfinished.*not finished"):
    sample.choose_checkpoints(_aligned_config(sft, str(tmp_path / "unfinished")))


def test_run_samples_an_aligned_run_against_its_init_checkpoint(tmp_path, runs, capsys):
  sft, ppo = runs
  inp = _prompts(tmp_path / "in.jsonl", ["The council met on Monday.", "Rain fell.", "A third."])
  out = tmp_path / "new" / "deeper" / "out.jsonl"  # missing parents are created
  lams = [0.0, 1.0, 2.5]
  n = sample.run(_aligned_config(ppo, num_decodes=2), lams, inp, str(out), seed=0)
  lines = [json.loads(l) for l in out.read_text().splitlines()]
  assert n == len(lines) == 3 * 3 * 2
  assert {(l["prompt_index"], l["lam"], l["sample_index"]) for l in lines} == {
      (p, lam, s) for p in range(3) for lam in lams for s in range(2)}
  for line in lines:
    assert isinstance(line["text"], str) and 1 <= line["length"] <= 6
    assert np.isfinite([line[k] for k in ("logq", "logp_ref", "logp_aligned", "log_weight",
                                          "kl_ref")]).all()
    assert line["logp_ref"] != line["logp_aligned"]  # two different models
  # lam = 0 samples the reference: its log q equals its own log-probability, computed along
  # two paths (sampling loop, teacher forcing) as sums of `length` log-softmaxes over the
  # vocabulary, each rounded at the scale of its log-normaliser (~ log V).
  vocab_size = tokenizer.vocab_size()
  for line in (l for l in lines if l["lam"] == 0.0):
    scale = abs(line["logp_ref"]) + line["length"] * np.log(vocab_size)
    numerics.assert_close_f32(line["logq"], line["logp_ref"], 2 * line["length"], scale)
    numerics.assert_close_f32(line["kl_ref"], 0.0, 2 * line["length"], scale)

  err = capsys.readouterr().err
  log = err.splitlines()
  assert f"deranj.sample: aligned: {ppo}/model (the final model of run {ppo})" in log
  assert f"deranj.sample: reference: {sft}/model (the aligned run's init_checkpoint)" in log
  assert sum(l.startswith("deranj.sample: loaded ") and "M parameters, vocab_size 4096" in l
             for l in log) == 2
  assert "warning" not in err
  progress = [l for l in log if l.startswith("deranj.sample: sampled ")]
  assert progress[0].startswith("deranj.sample: sampled 2/3 prompts x 3 lam x 2 samples (")
  assert "ETA" in progress[0] and progress[-1].startswith("deranj.sample: sampled 3/3 prompts")

  # The same run with the reference named explicitly gives the same numbers, bit for bit.
  explicit = tmp_path / "explicit.jsonl"
  sample.run(_aligned_config(ppo, os.path.join(sft, "model"), num_decodes=2), lams, inp,
             str(explicit), seed=0)
  assert lines == [json.loads(l) for l in explicit.read_text().splitlines()]


def test_method_flags():
  assert sample.parse_method() == sample.Method("dera", (1.0,))
  assert sample.parse_method("dera", "0,2") == sample.Method("dera", (0.0, 2.0))
  assert sample.parse_method("aad") == sample.Method("aad", (dera.DEFAULT_ALPHA,))
  assert sample.parse_method("aad", alpha="0.2,0.05", best_of=4, scorer="reward_model",
                             reward_model="rm") == sample.Method("aad", (0.2, 0.05), 4,
                                                                 "reward_model", "rm")
  assert sample.Method("aad").name == "alpha" and sample.Method().name == "lam"
  for kwargs, message in [
      (dict(rule="dera", alpha="0.1"), r"--alpha applies to --rule=aad; --rule=dera takes --lam"),
      (dict(rule="aad", lam="1"), r"--lam applies to --rule=dera; --rule=aad takes --alpha"),
      (dict(rule="aad", alpha="0.1,1.5"), r"--alpha='0\.1,1\.5': every value must be in "
                                          r"\(0, 1\], got \[1\.5\]"),
      (dict(rule="aad", alpha="0"), r"--alpha='0': every value must be in \(0, 1\]"),
      (dict(rule="dpo"), r"--rule=dpo: expected one of dera, aad"),
      (dict(scorer="implicit"), r"--scorer=implicit ranks --best_of=N candidates"),
      (dict(best_of=0, scorer="implicit"), r"--best_of=0: need at least 1 candidate"),
      (dict(best_of=4), r"--best_of=4 needs --scorer \(implicit, mixture, reward_model\)"),
      (dict(rule="aad", best_of=4, scorer="mixture"), r"--scorer=mixture ranks DeRa candidates"),
      (dict(best_of=4, scorer="reward_model"), r"--scorer=reward_model needs --reward_model"),
      (dict(best_of=4, scorer="implicit", reward_model="rm"),
       r"--reward_model is read only with --scorer=reward_model")]:
    with pytest.raises(sample.SampleError, match="^" + message) as e:
      sample.parse_method(**kwargs)
    assert "\n" not in str(e.value)


def _save_reward_model(directory, seed):
  cfg = build.T5Config(vocab_size=tokenizer.vocab_size(), d_model=16, d_kv=8, d_ff=32,
                    num_heads=2, num_layers=1, dropout_rate=0.0)
  rm = rewards.RewardModel(build.network(cfg))
  params = tiny_models.random_params(rm, seed)
  reward_model.save_reward_model(str(directory), rm, params)
  return rm, params


def test_run_aad_and_best_of(tmp_path, runs):
  sft, ppo = runs
  inp = _prompts(tmp_path / "in.jsonl", ["The council met on Monday.", "Rain fell.", "A third."])
  # AAD at two alphas: greedy by default, no mixture weight.
  out = tmp_path / "aad.jsonl"
  method = sample.parse_method("aad", alpha="0.1,0.5")
  assert sample.run(_aligned_config(ppo), method, inp, str(out), seed=0) == 6
  lines = [json.loads(l) for l in out.read_text().splitlines()]
  assert [(l["prompt_index"], l["alpha"]) for l in lines] == [
      (p, a) for p in range(3) for a in (0.1, 0.5)]
  assert all(l["logq"] == 0.0 and "log_weight" not in l and "lam" not in l for l in lines)
  # Best of 3 DeRa candidates by the implicit reward: the kept line has the top score.
  best = tmp_path / "best.jsonl"
  method = sample.parse_method("dera", "0.5,2", best_of=3, scorer="implicit")
  assert sample.run(_aligned_config(ppo), method, inp, str(best), seed=0) == 6
  for line in (json.loads(l) for l in best.read_text().splitlines()):
    assert line["best_of"] == 3 and line["scorer"] == "implicit" and len(line["scores"]) == 3
    assert line["candidate_index"] == int(np.argmax(line["scores"]))
    assert line["score"] == max(line["scores"])
    assert np.float32(line["score"]) == (np.float32(line["logp_aligned"])
                                         - np.float32(line["logp_ref"]))
    assert "log_weight" in line and "sample_index" not in line
  # A reward model ranks them too; a bad directory is one clear line before any sampling.
  _save_reward_model(tmp_path / "rm", 0)
  method = sample.parse_method("dera", "0.5,2", best_of=3, scorer="reward_model",
                               reward_model=str(tmp_path / "rm"))
  assert sample.run(_aligned_config(ppo), method, inp, str(tmp_path / "rm.jsonl"), 0) == 6
  ranked = [json.loads(l) for l in (tmp_path / "rm.jsonl").read_text().splitlines()]
  assert all(l["score"] == max(l["scores"]) and l["scorer"] == "reward_model" for l in ranked)
  assert len({s for l in ranked for s in l["scores"]}) > 1  # the scores do differ
  bad = sample.parse_method(best_of=2, scorer="reward_model", reward_model=sft)
  with pytest.raises(sample.SampleError, match=r"^--reward_model=.*sft.*not a reward model"):
    sample.run(_aligned_config(ppo), bad, inp, str(tmp_path / "bad.jsonl"), 0)
  with pytest.raises(sample.SampleError, match=r"^--best_of=3 with SampleConfig.temperature=0: "
                                               r"every candidate would be the same"):
    sample.run(_aligned_config(ppo, temperature=0.0), method, inp, str(tmp_path / "b"), 0)
  with pytest.raises(sample.SampleError, match=r"leave SampleConfig.num_decodes at 1"):
    sample.run(_aligned_config(ppo, num_decodes=2), method, inp, str(tmp_path / "b"), 0)
  assert not (tmp_path / "bad.jsonl").exists() and not (tmp_path / "b").exists()


def test_reward_model_scorer(tmp_path):
  rm, params = _save_reward_model(tmp_path / "rm", 1)
  scorer, vocab = sample.reward_model_scorer(str(tmp_path / "rm"))
  assert vocab == tokenizer.vocab_size()
  prompts = np.array([[5, 6, 1, 0], [7, 1, 0, 0]], np.int32)
  responses = np.array([[9, 10, 11, 1], [12, 1, 0, 0]], np.int32)
  candidates = dera.RealignedSamples(tokens=responses, lengths=None, logq=None, logp_ref=None,
                                     logp_aligned=None, log_weight=None, kl_ref=None)
  expected = jax.jit(rm.rewards)(params, prompts, responses)
  numerics.assert_close_f32(scorer(prompts, candidates), expected, rm.config.d_model,
                            np.abs(expected))
  assert expected[0] != expected[1]


def test_progress_lines(monkeypatch, capsys):
  clock = iter([0.0, 10.0, 12.0, 16.0, 20.0])
  monkeypatch.setattr(sample.progress_lib.time, "time", lambda: next(clock))
  progress = sample._progress(10, 2, 3)  # starts at t=0
  progress.update(2)  # t=10: the first call, compiling included
  progress.update(4)  # t=12: under PROGRESS_EVERY_S since the last line
  progress.update(6)  # t=16: 4 prompts in the 6 s since the first call
  progress.update(10)  # t=20
  assert capsys.readouterr().err.splitlines() == [
      "deranj.sample: sampled 2/10 prompts x 2 lam x 3 samples (0.20 prompts/s, ETA 40 s) "
      "(the first call compiles)",
      "deranj.sample: sampled 6/10 prompts x 2 lam x 3 samples (0.67 prompts/s, ETA 6 s)",
      "deranj.sample: sampled 10/10 prompts x 2 lam x 3 samples (0.80 prompts/s, 20.0 s in all)"]


@pytest.mark.parametrize("where", ["directory", "trailing slash", "parent is a file",
                                   "ancestor is a file"])
def test_output_is_checked_before_any_model_loads(tmp_path, monkeypatch, runs, where):
  monkeypatch.setattr(sample.loading, "load_model", lambda *a, **k: pytest.fail("loaded"))
  (tmp_path / "file.txt").write_text("x")
  output, message = {
      "directory": (str(tmp_path), r"is a directory; give a file, e\.g\. --output=.*samples"),
      "trailing slash": (str(tmp_path / "new") + "/", "is a directory"),
      "parent is a file": (str(tmp_path / "file.txt" / "o.jsonl"),
                           r"file\.txt is a file, not a directory"),
      "ancestor is a file": (str(tmp_path / "file.txt" / "a" / "o.jsonl"),
                             r"file\.txt is a file, not a directory"),
  }[where]
  inp = _prompts(tmp_path / "in.jsonl", ["fine"])
  with pytest.raises(sample.SampleError, match=f"^--output={output}.*{message}"):
    sample.run(_aligned_config(runs[1]), [1.0], inp, output, 0)
  assert not (tmp_path / "new").exists()
  assert (tmp_path / "file.txt").read_text() == "x"


def test_checkpoint_and_vocabulary_errors(tmp_path, runs, checkpoints):
  inp = _prompts(tmp_path / "in.jsonl", ["fine"])
  out = tmp_path / "o.jsonl"
  _save_random_model(tmp_path / "wide", 2, vocab_size=tokenizer.vocab_size() + 128)
  with pytest.raises(sample.SampleError,
                     match=r"^vocabulary mismatch: the reference .*ref has vocab_size 4096, the "
                           r"aligned model .*wide 4224; DeRa mixes"):
    sample.run(_aligned_config(str(tmp_path / "wide"), checkpoints[0]), [1.0], inp, str(out), 0)
  _save_random_model(tmp_path / "small_ref", 3, vocab_size=64)
  _save_random_model(tmp_path / "small", 4, vocab_size=64)
  with pytest.raises(sample.SampleError,
                     match=r"tokenizer .*has 4096 pieces, more than the models' vocab_size 64"):
    sample.run(_aligned_config(str(tmp_path / "small"), str(tmp_path / "small_ref")), [1.0],
               inp, str(out), 0)
  (tmp_path / "rm").mkdir()
  _save_random_model(tmp_path / "rm" / "model", 5, kind="reward_model")
  with pytest.raises(sample.SampleError,
                     match=r"^aligned model .*rm/model' \(the final model of run .*rm\): .*holds "
                           r"a reward model \(kind 'reward_model'"):
    sample.run(_aligned_config(str(tmp_path / "rm"), runs[0]), [1.0], inp, str(out), 0)
  (tmp_path / "hf").mkdir()
  (tmp_path / "hf" / "config.json").write_text("{}")
  (tmp_path / "hf" / "pytorch_model.bin").write_bytes(b"")
  with pytest.raises(sample.SampleError, match=r"reference model .*hf.*pytorch_model\.bin.*never "
                                               "unpickles"):
    sample.run(_aligned_config(runs[1], str(tmp_path / "hf")), [1.0], inp, str(out), 0)
  (tmp_path / "empty").mkdir()
  with pytest.raises(sample.SampleError, match="empty.*neither a deranj model directory"):
    sample.run(_aligned_config(str(tmp_path / "empty"), runs[0]), [1.0], inp, str(out), 0)
  assert not out.exists()


def test_bad_inputs_are_clear(tmp_path, checkpoints):
  with pytest.raises(sample.SampleError, match="finite"):
    sample.parse_lams("0,nan")
  with pytest.raises(sample.SampleError, match="comma-separated"):
    sample.parse_lams("0,x")
  empty = _prompts(tmp_path / "e.jsonl", ["ok", "  "])
  with pytest.raises(sample.SampleError, match=r"e.jsonl:2: the prompt is empty"):
    sample.run(_config(checkpoints), [1.0], empty, str(tmp_path / "o.jsonl"), 0)
  (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{"text": "b"}\n')
  with pytest.raises(files.DataError, match=r"bad.jsonl:2: record has no field 'prompt'"):
    sample.run(_config(checkpoints), [1.0], str(tmp_path / "bad.jsonl"), str(tmp_path / "o"), 0)
  long = _prompts(tmp_path / "long.jsonl", ["word " * 40])
  with pytest.raises(sample.SampleError, match="max_input_length=16"):
    sample.run(_config(checkpoints, long_prompts="error"), [1.0], long, str(tmp_path / "o"), 0)
  assert sample.run(_config(checkpoints), [1.0], long, str(tmp_path / "o.jsonl"), 0) == 1
  broken = sample.SampleConfig(reference_checkpoint=str(tmp_path / "nope"),
                               aligned_checkpoint=checkpoints[1])
  ok = _prompts(tmp_path / "ok.jsonl", ["fine"])
  with pytest.raises(sample.SampleError, match="reference model .*nope.*reference_checkpoint"):
    sample.run(broken, [1.0], ok, str(tmp_path / "o2.jsonl"), 0)
  assert not (tmp_path / "o2.jsonl").exists()


def test_gin_errors_are_one_line():
  with pytest.raises(gin_utils.GinConfigError, match="nonexistent") as e:
    gin_utils.parse_gin([], ["SampleConfig.nonexistent = 3"])
  assert "\n" not in str(e.value)
  with pytest.raises(gin_utils.GinConfigError, match="nope.gin.*not found"):
    gin_utils.parse_gin(["configs/nope.gin"], [])
  assert gin_utils.rewrite_gin_args(["prog", "--gin.A.b=1", "--x=2"]) == [
      "prog", "--gin_bindings=A.b = 1", "--x=2"]


def test_command_line(tmp_path, runs):
  sft, ppo = runs
  inp = _prompts(tmp_path / "in.jsonl", ["Storms hit the coast."])
  out = tmp_path / "out.jsonl"
  cmd = [sys.executable, "-m", "deranj.sample", "--lam=0,1", f"--input={inp}",
         f"--output={out}", f"--gin_file={REPO}/configs/sample/tiny.gin",
         "--gin.SampleConfig.max_decode_len=4"]
  env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
  # The shipped config with only the aligned run given, from another directory.
  result = subprocess.run(cmd + [f"--gin.ALIGNED='{ppo}'"], capture_output=True, text=True,
                          env=env, cwd=str(tmp_path), timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert len(out.read_text().splitlines()) == 2
  assert "summarize" not in json.loads(out.read_text().splitlines()[0])["text"]
  assert (f"deranj.sample: reference: {sft}/model (the aligned run's init_checkpoint)"
          in result.stderr.splitlines())
  assert "deranj.sample: sampled 1/1 prompts x 2 lam (" in result.stderr
  assert result.stdout == f"wrote 2 samples to {out}\n"
  # AAD at two alphas, best of 2 by the implicit reward.
  result = subprocess.run(
      [c for c in cmd if not c.startswith("--lam")] + [
          f"--gin.ALIGNED='{ppo}'", "--rule=aad", "--alpha=0.1,0.3", "--best_of=2",
          "--scorer=implicit"], capture_output=True, text=True, env=env, cwd=str(tmp_path),
      timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert [json.loads(l)["alpha"] for l in out.read_text().splitlines()] == [0.1, 0.3]
  assert "deranj.sample: sampled 1/1 prompts x 2 alpha (best of 2) (" in result.stderr
  for extra, message in [
      (["--gin.SampleConfig.bogus=1"], r"deranj\.sample: gin:.*bogus"),
      (["--alpha=0.1"], r"deranj\.sample: --alpha applies to --rule=aad; --rule=dera takes"),
      ([], r"deranj\.sample: no aligned model: set SampleConfig\.aligned_checkpoint "
           r"\(--gin\.ALIGNED with configs/sample/tiny\.gin\)")]:
    bad = subprocess.run(cmd + extra, capture_output=True, text=True, env=env, cwd=REPO,
                         timeout=300)
    assert bad.returncode != 0
    assert re.search(message, bad.stderr) and "Traceback" not in bad.stderr, bad.stderr[-2000:]
