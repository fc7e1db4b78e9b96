"""Gin as the only configuration surface of the entry points (T5X conventions).

    python -m deranj.train --gin_file=A.gin --gin_file=B.gin --gin.NAME=value \
        [--gin_search_paths=dir1,dir2]

`--gin.NAME=value` is shorthand for `--gin_bindings='NAME = value'`; values are gin
literals (strings need quotes: --gin.MODEL_DIR="'/tmp/run'"). Files are looked up in the
search paths, then in the repository root (so `configs/...` works from anywhere).
"""
from __future__ import annotations

import os
from typing import Callable, Sequence

from absl import app
from absl import flags
import gin

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class GinConfigError(ValueError):
  """A gin file or binding that cannot be parsed or applied (message on one line)."""


def define_gin_flags() -> None:
  if "gin_file" in flags.FLAGS:
    return
  flags.DEFINE_multi_string("gin_file", [], "Gin config files, applied in order.")
  flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings, after the files.")
  flags.DEFINE_list("gin_search_paths", ["."], "Directories searched for gin files.")


def rewrite_gin_args(argv: Sequence[str]) -> list[str]:
  """--gin.NAME=value -> --gin_bindings=NAME = value."""
  out = []
  for arg in argv:
    if arg.startswith("--gin.") and "=" in arg:
      name, value = arg[len("--gin."):].split("=", 1)
      out.append(f"--gin_bindings={name} = {value}")
    else:
      out.append(arg)
  return out


def _one_line(error: Exception) -> str:
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return " | ".join(lines) or type(error).__name__


def resolve_gin_file(name: str, roots: Sequence[str]) -> str:
  """The absolute path of a gin file: as given, else under the first root that has it."""
  candidates = [name] + [os.path.join(root, name) for root in roots]
  for path in candidates:
    if os.path.isfile(path):
      return os.path.abspath(path)
  raise GinConfigError(f"gin file {name!r} not found (looked in: {', '.join(['.'] + list(roots))}"
                       "; set --gin_search_paths).")


def parse_gin(files: Sequence[str], bindings: Sequence[str],
              search_paths: Sequence[str] = (".",)) -> None:
  """Parses gin files and bindings; any failure becomes a one-line GinConfigError."""
  roots = [os.path.abspath(p) for p in search_paths] + [_REPO_ROOT]
  for root in roots:  # for gin's own `include` statements
    gin.add_config_file_search_path(root)
  resolved = [resolve_gin_file(f, roots) for f in files]
  try:
    gin.parse_config_files_and_bindings(resolved, list(bindings), finalize_config=False)
  except (ValueError, IOError, OSError, SyntaxError, NameError, TypeError) as e:
    raise GinConfigError(f"gin: {_one_line(e)}") from None


def parse_gin_flags() -> None:
  parse_gin(flags.FLAGS.gin_file, flags.FLAGS.gin_bindings, flags.FLAGS.gin_search_paths)


def run(main: Callable[[Sequence[str]], None]) -> None:
  """app.run with the --gin.NAME=value rewriting."""
  define_gin_flags()
  app.run(main, flags_parser=lambda argv: flags.FLAGS(rewrite_gin_args(argv)))


def build(configurable: Callable, *args, **kwargs):
  """Calls a gin configurable, turning missing required bindings into GinConfigError."""
  try:
    return configurable(*args, **kwargs)
  except RuntimeError as e:
    if "Required bindings" in str(e):
      raise GinConfigError(f"gin: {_one_line(e)}") from None
    raise
