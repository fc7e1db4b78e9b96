r"""Train a model: `python -m deranj.train --gin_file=... [--gin.NAME=value ...]`.

    python -m deranj.train --gin_file=configs/runs/sft.gin \
        --gin_file=configs/presets/tiny.gin --gin.MODEL_DIR="'/tmp/sft'"

MODEL_DIR, the objective, model, task and optimizer all come from gin (see
`deranj.training.trainer.train`). Running the same command again resumes from the latest
checkpoint in MODEL_DIR; a finished run returns at once. Ctrl-C stops a run with its
checkpoints intact (a save in progress completes first).
"""
from __future__ import annotations

import os
import re
import sys
from typing import Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import logging  # noqa: E402

from deranj import gin_utils  # noqa: E402
from deranj import partitioning  # noqa: E402  (registers MeshConfig)
from deranj.data import files  # noqa: E402
from deranj.models import build  # noqa: E402
from deranj.models import loading  # noqa: E402
from deranj.training import checkpoints  # noqa: E402
from deranj.training import losses  # noqa: E402
from deranj.training import objectives  # noqa: E402,F401  (registers SFT)
from deranj.training import optimizers  # noqa: E402,F401
from deranj.training import trainer  # noqa: E402

# Errors that are the user's to fix: one line, no traceback.
_USER_ERRORS = (gin_utils.GinConfigError, trainer.TrainingError, build.ModelConfigError,
                checkpoints.CheckpointError, checkpoints.RunDirectoryBusyError,
                objectives.ObjectiveError, optimizers.OptimizerConfigError,
                trainer.TrainingDivergedError,
                partitioning.PartitioningError, files.DataError, loading.ModelLoadError,
                losses.NonFiniteError)


def _is_gin_value_error(error: Exception) -> bool:
  """A bad value in a gin binding: raised while gin built a configurable the binding
  was passed to (gin names it). Errors from inside the training loop itself keep their
  traceback."""
  built = re.search(r"In call to configurable '([\w.]+)'", str(error))
  return bool(built) and built.group(1) != "train"


def _without_gin_call_lines(text: str) -> str:
  """An error on one line. gin appends "In call to configurable 'X' (<function ...>)" per
  configurable it was building: kept as the names (not for `train`, whose errors name their
  binding), without the function reprs."""
  parts, building = [], []
  for line in (line.strip() for line in text.splitlines()):
    call = re.match(r"In call to configurable '([\w.]+)'", line)
    if call:
      if call.group(1) != "train":
        building.append(call.group(1))
    elif line:
      parts.append(line)
  if building:
    parts.append(f"(building gin configurable {' <- '.join(building)})")
  return " | ".join(parts)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise SystemExit(f"error: unexpected arguments {argv[1:]}; settings go through gin "
                     "(--gin_file=..., --gin.NAME=value).")
  logging.set_verbosity(logging.WARNING)
  try:
    gin_utils.parse_gin_flags()
    gin_utils.build(trainer.train)
  except KeyboardInterrupt as e:  # the trainer's message names the last checkpoint
    print(str(e) or "interrupted", file=sys.stderr)
    sys.exit(130)
  except Exception as e:  # pylint: disable=broad-except
    if not isinstance(e, _USER_ERRORS) and not _is_gin_value_error(e):
      raise
    missing_macro = re.search(r"configurable 'macro' .* in scope '([\w.]+)'", str(e))
    if missing_macro:
      name = missing_macro.group(1)
      message = f"gin macro {name} is not set; pass --gin.{name}=... or bind it in a gin file."
    else:
      message = _without_gin_call_lines(str(e))
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  gin_utils.run(main)
