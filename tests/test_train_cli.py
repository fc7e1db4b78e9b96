"""`python -m deranj.train` as a user meets it: mistakes stop it in one line, a second run
on a busy MODEL_DIR stops at once, Ctrl-C leaves the checkpoints intact."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import gin_runs

from deranj.models import loading
from deranj.training import checkpoints

REPO = gin_runs.REPO
SMOKE = ["configs/runs/sft.gin", "configs/presets/smoke.gin"]
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


def command(*flags):
  return [sys.executable, "-m", "deranj.train", *[f"--gin_file={f}" for f in SMOKE], *flags]


def own_lines(stderr):
  """stderr without the native libraries' start-up logging (absl's I/W lines)."""
  return [l for l in stderr.splitlines()
          if l.strip() and not l.startswith(("I0000", "W0000", "WARNING: All log messages"))]


def run_cli(*flags, timeout=120):
  return subprocess.run(command(*flags), cwd=REPO, env=ENV, capture_output=True, text=True,
                        timeout=timeout)


@pytest.mark.parametrize("flag,message", [
    ("--gin.SFT_STEPZ=5", "error: --gin.SFT_STEPZ=5 sets macro SFT_STEPZ, which nothing in this "
     "run reads (did you mean SFT_STEPS?)."),
    ("--gin.SFT_STEPS='ten'", "error: gin: train.num_steps expects int, got 'ten' (str) "
     "through macro SFT_STEPS."),
    ("--gin.MODEL_DIR=runs/x", "error: gin: --gin.MODEL_DIR=runs/x: gin values are Python "
     "literals, so a string needs quotes: --gin.MODEL_DIR=\"'runs/x'\""),
])
def test_mistakes_stop_the_cli_in_one_line(tmp_path, flag, message):
  model_dir = tmp_path / "run"
  flags = [flag] if flag.startswith("--gin.MODEL_DIR") else [f"--gin.MODEL_DIR='{model_dir}'",
                                                             flag]
  out = run_cli(*flags)
  assert out.returncode == 1
  assert own_lines(out.stderr) == [message], out.stderr[-2000:]
  assert "[setup]" not in out.stdout and not model_dir.exists()  # stopped before any work


def test_pickle_only_init_checkpoint_in_one_line(tmp_path):
  init = tmp_path / "hf_pickle"
  init.mkdir()
  (init / "config.json").write_text(json.dumps({"vocab_size": 4096, "d_model": 128}))
  (init / "pytorch_model.bin").write_bytes(b"not to be unpickled")
  out = run_cli(f"--gin.MODEL_DIR='{tmp_path}/run'", f"--gin.INIT_CHECKPOINT='{init}'")
  assert out.returncode == 1
  lines = own_lines(out.stderr)
  assert len(lines) == 1 and lines[0].startswith(f"error: INIT_CHECKPOINT '{init}': "), lines
  assert "only pickle weights (pytorch_model.bin)" in lines[0]
  assert "configurable" not in lines[0]  # no gin call trail: the message names the binding
  assert os.listdir(tmp_path / "run") == []  # no empty event files, no lock


def test_second_run_on_a_busy_model_dir_stops_at_once_naming_the_pid(tmp_path):
  with checkpoints.RunLock(str(tmp_path)):  # this process plays the first run
    out = run_cli(f"--gin.MODEL_DIR='{tmp_path}'")
  assert out.returncode == 1
  assert own_lines(out.stderr) == [
      f"error: {tmp_path} is in use by another training run (pid {os.getpid()}); wait for it "
      "to end or choose another MODEL_DIR."]
  assert "[train]" not in out.stdout and not os.path.exists(tmp_path / "checkpoints")


def test_ctrl_c_during_a_save_exits_in_one_line_with_the_checkpoint_intact(tmp_path):
  model_dir = str(tmp_path / "run")
  ckpt_dir = os.path.join(model_dir, "checkpoints")
  proc = subprocess.Popen(
      command(f"--gin.MODEL_DIR='{model_dir}'", "--gin.SFT_STEPS=1000",
              "--gin.CHECKPOINT_EVERY=1", "--gin.train.eval_split=None"),
      cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  # Aim at a save in progress: orbax's temporary directory of step 2 or later. Polled
  # slowly until the first checkpoint (a busy loop would take a core from the start-up).
  deadline = time.time() + 120
  while (proc.poll() is None and time.time() < deadline
         and not os.path.isdir(os.path.join(ckpt_dir, "1"))):
    time.sleep(0.05)
  while proc.poll() is None and time.time() < deadline:
    names = os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else []
    if any("tmp" in n and n.split(".")[0].isdigit() and int(n.split(".")[0]) >= 2
           for n in names):
      break
    time.sleep(0.0005)
  proc.send_signal(signal.SIGINT)
  stdout, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 130, stderr[-2000:]
  lines = own_lines(stderr)
  assert len(lines) == 1, stderr[-2000:]
  assert not [n for n in os.listdir(ckpt_dir) if not n.isdigit()]  # no save left half-done
  ckpt = checkpoints.Checkpointer(model_dir, save_every=1)
  steps = ckpt.all_steps()
  ckpt.close()
  assert steps and max(steps) >= 2 and not ckpt.set_aside, (steps, ckpt.set_aside)
  assert lines[0] == (f"training interrupted; the last checkpoint is {ckpt_dir}/{max(steps)} "
                      "(run the same command again to resume).")
  assert not os.path.exists(os.path.join(model_dir, checkpoints.LOCK_FILE))
  assert f"[train] step {max(steps)}/1000" in stdout
  # Intact: the latest step restores, finite, and differs from the initial model.
  model, tiny = loading.load_model("tiny")
  params = checkpoints.load_init_params(model_dir, model.param_shapes())
  leaves = jax.tree_util.tree_leaves(params)
  assert all(np.isfinite(np.asarray(x)).all() for x in leaves)
  moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
              for a, b in zip(leaves, jax.tree_util.tree_leaves(tiny)))
  assert moved > 0


def test_command_line_is_parsed_before_tensorflow_loads():
  """TensorFlow (seqio, tf.data, clu's writers) costs seconds: loaded only once training
  starts, so a mistake on the command line stops at once."""
  code = ("import sys, gin; from deranj import gin_utils; import deranj.train; "
          "gin_utils.parse_gin(['configs/runs/sft.gin', 'configs/runs/ppo_length.gin', "
          "'configs/presets/smoke.gin'], ['tldr_sft_dir.path = \"/x\"']); "
          "print(sorted(m for m in ('tensorflow', 'seqio', 'clu') if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=ENV, capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == "[]", out.stdout
