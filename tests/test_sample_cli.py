"""`python -m deranj.sample` and whole-model loading."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from deranj import gin_utils
from deranj import sample
from deranj.data import files
from deranj.data import tokenizer
from deranj.models import base
from deranj.models import loading
from deranj.models import t5

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _save_random_model(directory, seed):
  cfg = t5.T5Config(vocab_size=tokenizer.vocab_size(), d_model=16, d_kv=8, d_ff=32, num_heads=2,
                    num_layers=1, dropout_rate=0.0)
  params = base.EncoderDecoderModel(t5.Transformer(cfg)).init_params(jax.random.PRNGKey(seed))
  loading.save_model(str(directory), cfg, params)
  return cfg, params


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  root = tmp_path_factory.mktemp("models")
  _save_random_model(root / "ref", 0)
  _save_random_model(root / "aligned", 1)
  return str(root / "ref"), str(root / "aligned")


def _config(checkpoints, **kw):
  return sample.SampleConfig(reference_checkpoint=checkpoints[0],
                             aligned_checkpoint=checkpoints[1], max_decode_len=6,
                             max_input_length=16, batch_size=2, **kw)


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


def test_run_writes_one_line_per_prompt_and_lam(tmp_path, checkpoints):
  inp = _prompts(tmp_path / "in.jsonl", ["The council met on Monday.", "Rain fell.", "A third."])
  out = tmp_path / "out.jsonl"
  n = sample.run(_config(checkpoints, num_decodes=2), [0.0, 1.0, 2.5], inp, str(out), seed=0)
  lines = [json.loads(l) for l in out.read_text().splitlines()]
  assert n == len(lines) == 3 * 3 * 2
  assert {(l["prompt_index"], l["lam"], l["sample_index"]) for l in lines} == {
      (p, lam, s) for p in range(3) for lam in (0.0, 1.0, 2.5) for s in range(2)}
  for line in lines:
    assert isinstance(line["text"], str) and 1 <= line["length"] <= 6
    assert np.isfinite([line[k] for k in ("logq", "logp_ref", "logp_aligned", "log_weight",
                                          "kl_ref")]).all()
  # lam = 0 samples the reference: its log q equals its own log-probability.
  for line in lines:
    if line["lam"] == 0.0:
      assert line["logq"] == pytest.approx(line["logp_ref"], abs=1e-4)
      assert line["kl_ref"] == pytest.approx(0.0, abs=1e-5)


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
  with pytest.raises(sample.SampleError, match="reference_checkpoint=.*nope"):
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


def test_command_line(tmp_path, checkpoints):
  inp = _prompts(tmp_path / "in.jsonl", ["Storms hit the coast."])
  out = tmp_path / "out.jsonl"
  cmd = [sys.executable, "-m", "deranj.sample", "--lam=0,1", f"--input={inp}",
         f"--output={out}", "--gin_file=configs/sample/tiny.gin",
         f"--gin.SampleConfig.reference_checkpoint='{checkpoints[0]}'",
         f"--gin.SampleConfig.aligned_checkpoint='{checkpoints[1]}'",
         "--gin.SampleConfig.max_decode_len=4"]
  env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
  result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert len(out.read_text().splitlines()) == 2
  bad = subprocess.run(cmd[:3] + ["--gin.SampleConfig.bogus=1"], capture_output=True, text=True,
                       env=env, cwd=REPO, timeout=300)
  # The shipped config alone runs (tiny as both models), from another directory too.
  tiny = subprocess.run(cmd[:7] + ["--gin.SampleConfig.max_decode_len=4"], capture_output=True,
                        text=True, env=env, cwd=str(tmp_path), timeout=300)
  assert tiny.returncode == 0, tiny.stderr[-2000:]
  assert "summarize" not in json.loads(out.read_text().splitlines()[0])["text"]
  assert bad.returncode != 0
  assert "deranj.sample: gin:" in bad.stderr and "bogus" in bad.stderr
  assert "Traceback" not in bad.stderr
