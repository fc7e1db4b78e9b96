"""gin_utils.parse_gin's checks: misspelled macros, wrong literal types, unquoted strings
and misspelled parameters stop a run in one line; the figure drivers' bindings pass."""
import os
import shlex
import sys

import gin
import pytest

from deranj import gin_utils
from deranj.training import reward_model
from deranj.training import trainer

SFT = ["configs/runs/sft.gin", "configs/presets/smoke.gin"]
PPO = ["configs/runs/ppo_length.gin", "configs/presets/smoke.gin"]
DIR = "MODEL_DIR = '/tmp/run'"


@pytest.fixture(autouse=True)
def clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def error_of(files, bindings):
  with pytest.raises(gin_utils.GinConfigError) as e:
    gin_utils.parse_gin(files, [DIR, *bindings])
  assert "\n" not in str(e.value)
  return str(e.value)


@pytest.mark.parametrize("files,binding,message", [
    (PPO, "INIT_CHECKPIONT = '/tmp/sft'",
     "--gin.INIT_CHECKPIONT='/tmp/sft' sets macro INIT_CHECKPIONT, which nothing in this run "
     "reads (did you mean INIT_CHECKPOINT?)."),
    (PPO, "BETTA = 0.5",
     "--gin.BETTA=0.5 sets macro BETTA, which nothing in this run reads (did you mean BETA?)."),
    (SFT, "SFT_STEPZ = 5",
     "--gin.SFT_STEPZ=5 sets macro SFT_STEPZ, which nothing in this run reads (did you mean "
     "SFT_STEPS?)."),
    # A macro the preset defines, but only other runs read.
    (SFT, "PPO_STEPS = 5",
     "--gin.PPO_STEPS=5 sets macro PPO_STEPS, which nothing in this run reads (did you mean "
     "DPO_STEPS?)."),
])
def test_unread_macro_names_itself_and_the_closest_known_name(files, binding, message):
  assert error_of(files, [binding]) == message


def test_macros_that_are_read_pass_and_take_effect():
  gin_utils.parse_gin(PPO, [DIR, "BETA = 0.5", "INIT_CHECKPOINT = '/tmp/sft'",
                            "PPO_STEPS = %MY_STEPS", "MY_STEPS = 3"])  # read through PPO_STEPS
  assert gin.query_parameter("%BETA") == 0.5
  assert gin.query_parameter("%MY_STEPS") == 3


def test_a_macro_read_only_by_an_unread_macro_is_unread():
  assert "sets macro MY_STEPS" in error_of(SFT, ["MY_STEPS = 3", "PPO_STEPS = %MY_STEPS"])


def test_overriding_the_parameter_that_reads_a_run_file_macro_is_no_error():
  gin_utils.parse_gin(PPO, [DIR, "train.seed = 3", "PPO.beta = 0.2"])  # SEED, BETA unread now
  assert gin.query_parameter("train.seed") == 3


def test_run_file_macros_are_checked_presets_and_includes_are_not(tmp_path):
  with open(SFT[0]) as f:
    sft_text = f.read()
  run_file = tmp_path / "my_sft.gin"
  run_file.write_text(sft_text + "SEEDD = 1\n")
  message = error_of([str(run_file), SFT[1]], [])
  assert message == (f"{run_file} sets macro SEEDD, which nothing in this run reads "
                     "(did you mean SEED?).")
  # The same line in a preset, or in a file a run file includes, is fine.
  (tmp_path / "presets").mkdir()
  preset = tmp_path / "presets" / "extra.gin"
  preset.write_text("SEEDD = 1\n")
  gin_utils.parse_gin([*SFT, str(preset)], [DIR])
  gin.clear_config()
  run_file.write_text(f"include '{preset}'\n" + sft_text)
  gin_utils.parse_gin([str(run_file), SFT[1]], [DIR])


@pytest.mark.parametrize("files,binding,message", [
    (SFT, "SFT_STEPS = 'ten'",
     "gin: train.num_steps expects int, got 'ten' (str) through macro SFT_STEPS."),
    (SFT, "LOG_EVERY = 2.5", "gin: train.log_every expects int, got 2.5 (float) through macro "
     "LOG_EVERY."),
    (PPO, "BETA = 'x'", "gin: PPO.beta expects float, got 'x' (str) through macro BETA."),
    (SFT, "train.derive_seed = 0", "gin: train.derive_seed expects bool, got 0 (int)."),
    (SFT, "T5Config.d_model = '128'", "gin: T5Config.d_model expects int, got '128' (str)."),
])
def test_wrong_literal_type_names_the_binding_and_the_type(files, binding, message):
  assert error_of(files, [binding]) == message


def test_right_literal_types_pass():
  gin_utils.parse_gin(PPO, [DIR, "BETA = 1", "train.eval_split = None", "SEED = 7",
                            "train.derive_seed = False"])


@pytest.mark.parametrize("value", ["runs/x", "/tmp/x", "run"])
def test_unquoted_string_shows_the_quoting(value):
  message = error_of(SFT, [f"MODEL_DIR = {value}"])
  fix = f"""--gin.MODEL_DIR="'{value}'\""""
  assert message == (f"gin: --gin.MODEL_DIR={value}: gin values are Python literals, so a "
                     f"string needs quotes: {fix}")
  # The quoting shown, through a shell and the CLI's flag rewriting, parses.
  binding = gin_utils.rewrite_gin_args(shlex.split(fix))[0][len("--gin_bindings="):]
  gin.clear_config()
  gin_utils.parse_gin(SFT, [binding])
  assert gin.query_parameter("%MODEL_DIR") == value


@pytest.mark.parametrize("binding,suggestion", [
    ("train.num_step = 5", "doesn't have a parameter named 'num_step' (did you mean num_steps?)"),
    ("trian.num_steps = 5", "No configurable matching 'trian' (did you mean train?)"),
])
def test_misspelled_configurable_or_parameter_suggests_the_name(binding, suggestion):
  assert suggestion in error_of(SFT, [binding])


@pytest.mark.parametrize("preset", ["smoke", "demo", "tiny", "tiny_pairs32", "tiny_pairs32_betalr",
                                    "paper"])
@pytest.mark.parametrize("run", ["sft", "ppo_length", "pg_length", "rwl_length", "pg_reward",
                                 "reward_model", "dpo"])
def test_every_run_file_passes_the_checks_with_every_preset(run, preset):
  gin_utils.parse_gin([f"configs/runs/{run}.gin", f"configs/presets/{preset}.gin"], [DIR])


class _Stop(Exception):
  """Ends a driver after its training runs."""


@pytest.fixture
def driver_runs(monkeypatch):
  """(run file, bindings) of every run a driver starts; nothing is trained."""
  from experiments import common  # pylint: disable=g-import-not-at-top
  runs = []
  real_parse = gin_utils.parse_gin

  def parse(files, bindings, *args, **kwargs):
    real_parse(files, bindings, *args, **kwargs)  # the checks under test
    if "configs/runs/" in files[0]:
      runs.append(os.path.basename(files[0]))

  monkeypatch.setattr(gin_utils, "parse_gin", parse)
  monkeypatch.setattr(trainer, "train", lambda: None)
  monkeypatch.setattr(common.checkpoints, "is_finished", lambda model_dir: False)
  monkeypatch.setattr(reward_model, "load_reward_model", _stop)
  return runs


def _stop(*args, **kwargs):
  raise _Stop()


def test_figure_drivers_bind_only_macros_their_runs_read(driver_runs, tmp_path, monkeypatch):
  from experiments import fig2_length_reward  # pylint: disable=g-import-not-at-top
  from experiments import fig3_policy_gradient  # pylint: disable=g-import-not-at-top
  from experiments import fig7_dpo  # pylint: disable=g-import-not-at-top
  from experiments import stages  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(fig2_length_reward.pipeline, "load", _stop)  # after the training runs
  monkeypatch.setattr(sys, "argv", ["fig2", "--preset", "smoke", "--workdir",
                                    str(tmp_path / "fig2"), "--lams", "0.5,2"])
  with pytest.raises(_Stop):
    fig2_length_reward.main()
  monkeypatch.setattr(sys, "argv", ["fig2", "--preset", "smoke", "--workdir",
                                    str(tmp_path / "fig2_ppo"), "--lams", "2", "--trainer", "ppo"])
  with pytest.raises(_Stop):
    fig2_length_reward.main()
  with pytest.raises(_Stop):  # sft and gold_rm, then stops loading the gold model
    fig3_policy_gradient.main(["--preset", "smoke", "--workdir", str(tmp_path / "figs")])
  ctx = stages.Context("smoke", str(tmp_path / "figs"))
  fig3_policy_gradient.train_proxy(ctx)
  fig3_policy_gradient.train_aligned(ctx, 0.1)
  fig7_dpo.train_aligned(ctx, 0.05)
  assert driver_runs == ["sft.gin", "pg_length.gin", "pg_length.gin", "pg_length.gin",
                         "sft.gin", "ppo_length.gin", "ppo_length.gin",
                     "sft.gin", "reward_model.gin", "reward_model.gin", "pg_reward.gin",
                     "dpo.gin"]


def test_sweep_commands_parse_with_the_checks(tmp_path):
  from scripts import sweep  # pylint: disable=g-import-not-at-top
  for run in ("ppo_length", "pg_length", "pg_reward", "dpo"):
    todo = sweep.commands(f"configs/runs/{run}.gin", "smoke", str(tmp_path), "/tmp/sft", 0.1,
                          [0.5, 1.0], ["LOG_EVERY = 1"])
    for _, command in todo:
      args = gin_utils.rewrite_gin_args(shlex.split(command)[3:])
      files = [a[len("--gin_file="):] for a in args if a.startswith("--gin_file=")]
      bindings = [a[len("--gin_bindings="):] for a in args if a.startswith("--gin_bindings=")]
      gin.clear_config()
      gin_utils.parse_gin(files, bindings)
      assert gin.query_parameter("%INIT_CHECKPOINT") == "/tmp/sft"
