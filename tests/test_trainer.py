"""The training loop: gin entry point, checkpoints that resume bit-identically, NaN stops,
bad checkpoints, schedules and gradient accumulation."""
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gin_runs

from deranj import gin_utils
from deranj.models import loading
from deranj.training import checkpoints
from deranj.training import objectives
from deranj.training import optimizers
from deranj.training import trainer

REPO = gin_runs.REPO
SMOKE = ["configs/runs/sft.gin", "configs/presets/smoke.gin"]
# 16 steps, a checkpoint every 4, no evaluation: the resume tests' run.
RESUME_BINDINGS = ["SFT_STEPS = 16", "CHECKPOINT_EVERY = 4", "LOG_EVERY = 4",
                   "train.eval_split = None"]


def gin_train(model_dir, bindings=()):
  return gin_runs.gin_train(SMOKE, model_dir, bindings)


def train_command(model_dir):
  args = [sys.executable, "-m", "deranj.train"] + [f"--gin_file={f}" for f in SMOKE]
  args += [f"--gin.MODEL_DIR='{model_dir}'"]
  args += ["--gin." + b.replace(" = ", "=") for b in RESUME_BINDINGS]
  return args


exported_params = gin_runs.exported_params


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  """The default test run's end-to-end smoke: SFT on the smoke preset through gin."""
  model_dir = str(tmp_path_factory.mktemp("smoke"))
  result, text = gin_train(model_dir)
  return model_dir, result, text


def test_smoke_run_writes_everything(smoke_run):
  model_dir, result, text = smoke_run
  assert sorted(checkpoints.Checkpointer(model_dir, save_every=4).all_steps()) == [4, 8]
  assert os.listdir(os.path.join(model_dir, "train"))  # TensorBoard event files
  assert os.listdir(os.path.join(model_dir, "eval"))
  assert "SFT_STEPS = 8" in open(os.path.join(model_dir, "config.gin")).read()
  lines = [l for l in text.splitlines() if l.startswith("[train]")]
  # LOG_EVERY = 2, but 8 steps log at least every 10%: every step.
  assert [l.split()[2] for l in lines] == [f"{k}/8" for k in range(1, 9)]
  assert "steps/s" in lines[-1] and "ETA" in lines[-1]
  seed = trainer.run_seed(0, objectives.SFT(None))
  assert f"[setup] seed {seed} = hash(0/sft); train.derive_seed = False uses 0" in text
  assert not os.path.exists(os.path.join(model_dir, checkpoints.LOCK_FILE))  # released
  assert set(result["eval"]) >= {"loss", "accuracy", "rouge1", "rouge2", "rougeL"}
  # The exported model is the trained params, readable by the sampler's loader.
  params = exported_params(model_dir)
  trained = jax.device_get(result["state"].params)
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, trained)
  _, tiny = loading.load_model("tiny")
  moved = jax.tree_util.tree_leaves(jax.tree_util.tree_map(
      lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), params, tiny))
  assert max(moved) > 0


def test_smoke_run_lowers_the_loss(tmp_path):
  """30 steps on 4 fixed examples: the training loss must fall well below its start."""
  result, text = gin_train(tmp_path, ["SFT_STEPS = 30", "LOG_EVERY = 10",
                                      "CHECKPOINT_EVERY = 30", "train.max_train_examples = 4",
                                      "train.eval_split = None"])
  losses = gin_runs.logged(text, "loss")
  assert losses[-1] < 0.6 * losses[0], losses


def test_rerun_of_a_finished_run_trains_nothing(smoke_run):
  model_dir, _, _ = smoke_run
  before = os.path.getmtime(os.path.join(model_dir, "model", loading.MSGPACK_FILE))
  _, text = gin_train(model_dir)
  assert "resumed from" in text and "[train]" not in text
  assert os.path.getmtime(os.path.join(model_dir, "model", loading.MSGPACK_FILE)) == before


@pytest.fixture(scope="module")
def resume_reference(tmp_path_factory):
  """The resume tests' run, uninterrupted."""
  reference = str(tmp_path_factory.mktemp("reference"))
  gin_train(reference, RESUME_BINDINGS)
  return reference


# Killed once the first checkpoint is written (default run) or the second (slow).
@pytest.mark.parametrize("kill_after", [4, pytest.param(8, marks=pytest.mark.slow)])
def test_sigkill_then_rerun_is_bit_identical(resume_reference, tmp_path, kill_after):
  reference = resume_reference
  killed = str(tmp_path / "killed")
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.Popen(train_command(killed), cwd=REPO, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  marker = os.path.join(killed, "checkpoints", str(kill_after), "_CHECKPOINT_METADATA")
  deadline = time.time() + 300
  while not os.path.exists(marker) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
  assert not checkpoints.is_finished(killed)
  # The rerun in this process (a second start of `deranj.train` would only add its
  # imports): it must take over the killed run's directory and lock.
  _, text = gin_train(killed, RESUME_BINDINGS)
  assert f"resumed from {killed}/checkpoints/" in text
  jax.tree_util.tree_map(np.testing.assert_array_equal, exported_params(killed),
                         exported_params(reference))


def test_half_written_checkpoint_is_never_the_latest(smoke_run, tmp_path):
  model_dir = str(tmp_path / "run")
  shutil.copytree(smoke_run[0], model_dir)
  ckpt_dir = os.path.join(model_dir, "checkpoints")
  shutil.rmtree(os.path.join(model_dir, "model"))  # not finished: the rerun must restore
  # A save cut short: orbax's temporary directory, and a step directory never finalised.
  shutil.copytree(f"{ckpt_dir}/8", f"{ckpt_dir}/12.orbax-checkpoint-tmp-1234")
  shutil.copytree(f"{ckpt_dir}/8", f"{ckpt_dir}/16")
  os.remove(f"{ckpt_dir}/16/_CHECKPOINT_METADATA")
  with open(os.path.join(ckpt_dir, "16", "params", "garbage"), "w") as f:
    f.write("x")
  ckpt = checkpoints.Checkpointer(model_dir, save_every=4)
  assert ckpt.latest_step() == 8
  assert any(p.startswith(os.path.join(ckpt_dir, "16.incomplete")) for p in ckpt.set_aside)
  ckpt.close()
  _, text = gin_train(model_dir)
  assert f"resumed from {ckpt_dir}/8" in text


def test_corrupt_checkpoint_names_its_path(smoke_run, tmp_path):
  model_dir = str(tmp_path / "run")
  shutil.copytree(smoke_run[0], model_dir)
  shutil.rmtree(os.path.join(model_dir, "model"))
  params_dir = os.path.join(model_dir, "checkpoints", "8", "params")
  for root, _, names in os.walk(params_dir):
    for name in names:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"\x00not a checkpoint")
  with pytest.raises(checkpoints.CheckpointError, match=r"checkpoints/8"):
    gin_train(model_dir)


@pytest.mark.parametrize("kind", ["missing", "empty", "corrupt"])
def test_bad_init_checkpoint_names_its_path(tmp_path, kind):
  path = str(tmp_path / "init")
  if kind != "missing":
    os.makedirs(path)
  if kind == "corrupt":
    with open(os.path.join(path, loading.CONFIG_FILE), "w") as f:
      json.dump({"config": loading.config_to_dict(loading.load_model("tiny")[0].config)}, f)
    with open(os.path.join(path, loading.MSGPACK_FILE), "wb") as f:
      f.write(b"\x93garbage")
  model, _ = loading.load_model("tiny")
  with pytest.raises(checkpoints.CheckpointError, match=path):
    checkpoints.load_init_params(path, model.param_shapes())


def test_init_checkpoint_of_another_shape_is_refused():
  model, _ = loading.load_model("tiny", d_ff=256)
  with pytest.raises(checkpoints.CheckpointError, match=r"wi_0.*shape"):
    checkpoints.load_init_params("tiny", model.param_shapes())


class NanFromStep(objectives.SFT):
  """SFT whose loss turns NaN at a given step."""

  def __init__(self, model, bad_step):
    super().__init__(model, rouge_examples=0)
    self.bad_step = bad_step

  def train_step(self, state, frozen, batch, rng, **kwargs):
    new_state, metrics = super().train_step(state, frozen, batch, rng, **kwargs)
    poison = jnp.where(state.step + 1 >= self.bad_step, jnp.nan, 1.0)
    metrics["loss"] = metrics["loss"] * poison
    return new_state.replace(params=jax.tree_util.tree_map(lambda p: p * poison,
                                                           new_state.params)), metrics


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path):
  model, _ = loading.load_model("tiny")
  gin.clear_config()
  with pytest.raises(trainer.TrainingDivergedError, match=r"step 7: loss is nan.*checkpoints/4"):
    trainer.train(model_dir=str(tmp_path), objective=NanFromStep(model, 7),
                  task="embedded_news", num_steps=12, batch_size=2, inputs_length=32,
                  targets_length=8, init_checkpoint="tiny", log_every=4, checkpoint_every=4,
                  eval_split=None, stream=io.StringIO())
  ckpt = checkpoints.Checkpointer(str(tmp_path), save_every=4)
  assert ckpt.all_steps() == [4]
  ckpt.close()
  # Loadable: a later run can start from it (INIT_CHECKPOINT = this run's directory).
  restored = checkpoints.load_init_params(str(tmp_path), model.param_shapes())
  assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(restored))
  assert not checkpoints.is_finished(str(tmp_path))


@pytest.mark.parametrize("kind,expected", [
    ("constant", [0.0, 0.5, 1.0, 1.0, 1.0]),
    ("rsqrt", [0.0, 0.5, 1.0, np.sqrt(10 / 40), np.sqrt(10 / 100)]),
    ("cosine", [0.0, 0.5, 1.0, 0.5 * (1 + np.cos(np.pi * 30 / 90)), 0.0]),
])
def test_schedules(kind, expected):
  schedule = optimizers.learning_rate_schedule(100, base_learning_rate=1.0, kind=kind,
                                               warmup_steps=10)
  got = [float(schedule(s)) for s in (0, 5, 10, 40, 100)]
  np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)


def test_schedule_counts_train_steps_when_a_step_makes_several_updates():
  """PPO makes epochs x minibatches optimizer updates per train step; the cosine must end
  at the run's last train step, not a quarter of the way through."""
  from deranj.training import ppo  # pylint: disable=g-import-not-at-top
  from deranj.training import rollouts  # pylint: disable=g-import-not-at-top
  schedule = optimizers.learning_rate_schedule(100, base_learning_rate=1.0, kind="cosine")
  objective = ppo.PPO(model=None, reward=rollouts.LengthReward(1, 2), max_decode_len=4,
                      num_epochs=2, num_minibatches=2)
  assert objective.updates_per_step == 4
  per_update = optimizers.per_train_step(schedule, objective.updates_per_step)
  for step in (0, 25, 50, 99):
    for update in range(4):  # every update of train step `step`
      assert float(per_update(4 * step + update)) == float(schedule(step))
  # Through the optimizer: update 200 (count 199) belongs to train step 49; with a constant
  # gradient Adam's step is exactly the rate.
  optimizer = optimizers.make_optimizer(per_update, name="adamw", clip_norm=None)
  params = {"w": jnp.zeros(())}
  state = optimizer.init(params)
  for _ in range(200):
    updates, state = optimizer.update({"w": jnp.ones(())}, state, params)
  np.testing.assert_allclose(-float(updates["w"]), float(schedule(49)), rtol=1e-5)
  assert float(schedule(199)) == 0.0  # counted per update, the cosine would have ended
  assert optimizers.per_train_step(schedule, 1) is schedule


def test_bad_optimizer_settings_name_the_binding():
  with pytest.raises(optimizers.OptimizerConfigError, match="make_optimizer.name"):
    optimizers.make_optimizer(optax.constant_schedule(1.0), name="sgd")
  with pytest.raises(optimizers.OptimizerConfigError, match="learning_rate_schedule.kind"):
    optimizers.learning_rate_schedule(10, kind="linear")


def test_microbatches_average_the_microbatch_gradients():
  """Two microbatches give the mean of the two halves' gradients (loss: per-row mean)."""
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(3,)), jnp.float32)}
  batch = {"x": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)}

  def loss_fn(p, b, r):
    del r
    value = jnp.mean(jnp.tanh(b["x"] @ p["w"]) ** 2)
    return value, {"loss": value}

  grads, metrics = objectives.accumulate_gradients(loss_fn, params, batch,
                                                   jax.random.PRNGKey(0), 2)
  halves = [{"x": batch["x"][:2]}, {"x": batch["x"][2:]}]
  expected = np.mean([jax.grad(lambda p, b=b: loss_fn(p, b, None)[0])(params)["w"]
                      for b in halves], axis=0)
  np.testing.assert_allclose(grads["w"], expected, rtol=1e-6)
  np.testing.assert_allclose(metrics["loss"], np.mean([loss_fn(params, b, None)[0]
                                                       for b in halves]), rtol=1e-6)


@pytest.mark.parametrize("log_every,num_steps,expected", [
    (50, 40, 4), (2, 8, 1), (10, 1000, 10), (50, 5, 1), (7, 70, 7)])
def test_log_interval_is_at_most_a_tenth_of_the_run(log_every, num_steps, expected):
  assert trainer.log_interval(log_every, num_steps) == expected


def _built_objective(files, bindings):
  gin.clear_config()
  try:
    gin_utils.parse_gin(files, ["MODEL_DIR = '/tmp/unused'", *bindings])
    return gin.query_parameter("train.objective").scoped_configurable_fn()
  finally:
    gin.clear_config()


def test_seed_is_derived_from_the_objective_and_beta():
  ppo = ["configs/runs/ppo_length.gin", "configs/presets/smoke.gin"]
  dpo = ["configs/runs/dpo.gin", "configs/presets/smoke.gin"]
  seeds = {(name, beta): trainer.run_seed(0, _built_objective(files, [f"BETA = {beta}"]))
           for name, files in [("ppo", ppo), ("dpo", dpo)] for beta in (0.1, 0.2)}
  assert len(set(seeds.values())) == 4, seeds  # every (objective, beta): its own seed
  assert trainer.run_seed(0, _built_objective(ppo, ["BETA = 0.1"])) == seeds["ppo", 0.1]
  assert trainer.run_seed(1, _built_objective(ppo, ["BETA = 0.1"])) != seeds["ppo", 0.1]
  # Common random numbers on request: SEED itself.
  assert trainer.run_seed(5, _built_objective(ppo, ["BETA = 0.2"]), derive=False) == 5


def test_model_dir_lock_names_the_holder_and_a_dead_holder_never_blocks(tmp_path):
  with checkpoints.RunLock(str(tmp_path)):
    with open(tmp_path / checkpoints.LOCK_FILE) as f:
      assert f.read().strip() == str(os.getpid())
    with pytest.raises(checkpoints.RunDirectoryBusyError, match=rf"pid {os.getpid()}\)"):
      checkpoints.RunLock(str(tmp_path))
  assert not (tmp_path / checkpoints.LOCK_FILE).exists()
  # A lock file left by a process that died (the kernel dropped its lock).
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True).stdout.strip()
  (tmp_path / checkpoints.LOCK_FILE).write_text(dead + "\n")
  lock = checkpoints.RunLock(str(tmp_path))
  assert (tmp_path / checkpoints.LOCK_FILE).read_text().strip() == str(os.getpid())
  lock.release()


def test_failed_start_leaves_no_event_files(tmp_path):
  """A pickle-only Hugging Face directory as INIT_CHECKPOINT: refused with sampling's
  message, and MODEL_DIR is left without train/ eval/ (or a lock)."""
  init = tmp_path / "hf_pickle"
  init.mkdir()
  (init / "config.json").write_text(json.dumps({
      "vocab_size": 4096, "d_model": 128, "d_kv": 32, "d_ff": 512, "num_heads": 4,
      "num_layers": 3, "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False}))
  (init / "pytorch_model.bin").write_bytes(b"not to be unpickled")
  model_dir = tmp_path / "run"
  with pytest.raises(checkpoints.CheckpointError,
                     match=rf"INIT_CHECKPOINT '{init}': .*only pickle weights.*safetensors"):
    gin_train(str(model_dir), [f"INIT_CHECKPOINT = '{init}'"])
  assert os.listdir(model_dir) == []


def test_cli_reports_bad_gin_in_one_line(tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  base = [sys.executable, "-m", "deranj.train"] + [f"--gin_file={f}" for f in SMOKE]
  for extra, message in [([f"--gin.MODEL_DIR='{tmp_path}'", "--gin.train.bogus=1"],
                          "doesn't have a parameter named 'bogus'"),
                         ([], "gin macro MODEL_DIR is not set")]:
    out = subprocess.run(base + extra, cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, out.stderr[-1000:]
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("preset", ["smoke", "demo", "tiny", "paper"])
@pytest.mark.parametrize("run", ["sft", "ppo_length", "pg_length", "rwl_length", "pg_reward",
                                 "reward_model", "dpo"])
def test_every_run_file_parses_with_every_preset(run, preset):
  gin.clear_config()
  try:
    gin_utils.parse_gin([f"configs/runs/{run}.gin", f"configs/presets/{preset}.gin"], [])
    assert gin.query_parameter("train.objective") is not None
  finally:
    gin.clear_config()


def test_export_records_a_relative_init_checkpoint_as_absolute(tmp_path, monkeypatch):
  (tmp_path / "runs" / "sft").mkdir(parents=True)
  monkeypatch.chdir(tmp_path)
  assert trainer._recorded_path("runs/sft") == str(tmp_path / "runs" / "sft")
  assert trainer._recorded_path("tiny") == "tiny"  # a name, not a path
  assert trainer._recorded_path(None) is None
