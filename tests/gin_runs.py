"""Running `deranj.training.trainer.train` from gin files in-process, for tests."""
import io
import os

import gin

from deranj import gin_utils
from deranj.models import loading
from deranj.training import checkpoints
from deranj.training import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def gin_train(gin_files, model_dir, bindings=()):
  """(result of `train`, its printed output) for the gin files plus bindings."""
  gin.clear_config()
  gin_utils.parse_gin(gin_files, [f"MODEL_DIR = '{model_dir}'", *bindings])
  out = io.StringIO()
  try:
    result = trainer.train(stream=out)
  finally:
    gin.clear_config()
  return result, out.getvalue()


def logged(text, key, kind="[train]"):
  """The values of metric `key` on the progress lines of `kind`, in order."""
  values = []
  for line in text.splitlines():
    if line.startswith(kind) and f"  {key} " in line:
      values.append(float(line.split(f"  {key} ")[1].split()[0]))
  return values


def exported_params(model_dir):
  return loading.load_model(os.path.join(model_dir, checkpoints.MODEL_EXPORT_DIR))[1]
