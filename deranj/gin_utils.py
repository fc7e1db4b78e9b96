"""Gin as the only configuration surface of the entry points (T5X conventions).

    python -m deranj.train --gin_file=A.gin --gin_file=B.gin --gin.NAME=value \
        [--gin_search_paths=dir1,dir2]

`--gin.NAME=value` is shorthand for `--gin_bindings='NAME = value'`; values are gin
literals (strings need quotes: --gin.MODEL_DIR="'/tmp/run'"). Files are looked up in the
search paths, then in the repository root (so `configs/...` works from anywhere).

Mistakes stop a run in one line: a macro set on the command line or at the top level of a
run file (not a preset) that nothing reads, a literal of the wrong type for an annotated
parameter, an unquoted string, a misspelled configurable or parameter (with the closest
known name).
"""
from __future__ import annotations

import difflib
import inspect
import os
import re
import shlex
import types
import typing
from typing import Any, Callable, Iterator, Optional, Sequence

from absl import app
from absl import flags
import gin
from gin import config_parser

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
  """Parses gin files and bindings; any failure becomes a one-line GinConfigError.

  After parsing, a macro that a binding or a run file (a file not under `presets/`) sets
  but nothing in the config reads is an error (a misspelled name would otherwise be
  ignored), and so is a literal of the wrong type for an annotated parameter.
  """
  roots = [os.path.abspath(p) for p in search_paths] + [_REPO_ROOT]
  for root in roots:  # for gin's own `include` statements
    gin.add_config_file_search_path(root)
  resolved = [resolve_gin_file(f, roots) for f in files]
  try:
    gin.parse_config_files_and_bindings(resolved, list(bindings), finalize_config=False)
  except (ValueError, IOError, OSError, SyntaxError, NameError, TypeError) as e:
    raise GinConfigError(f"gin: {_explain_parse_error(e, bindings)}") from None
  run_files = [(name, path) for name, path in zip(files, resolved)
               if _PRESETS_DIR not in os.path.normpath(path).split(os.sep)]
  check_unread_macros(run_files, bindings)
  check_value_types()


# ----------------------------------------------------------------------------- checks

_PRESETS_DIR = "presets"  # files under it define macros for many runs: not all are read
_MACRO = "gin.macro"
# gin keeps its parsed bindings and registered configurables here (no public accessor).
_CONFIG = gin.config._CONFIG  # pylint: disable=protected-access
_REGISTRY = gin.config._REGISTRY  # pylint: disable=protected-access


class _NoReferences(config_parser.ParserDelegate):
  """Parses statements without resolving `@name` and `%NAME`; records the macro names."""

  def __init__(self):
    self.macros_read: set[str] = set()

  def configurable_reference(self, scoped_configurable_name, evaluate):
    return None

  def macro(self, macro_name):
    self.macros_read.add(macro_name)


def _macro_names(text: str) -> tuple[list[str], set[str]]:
  """(macros that `text`'s own top-level statements set, macros its values reference);
  includes are not followed."""
  delegate = _NoReferences()
  statements = list(config_parser.ConfigParser(text, delegate))
  set_here = [f"{s.scope}/{s.selector}" if s.scope else s.selector for s in statements
              if isinstance(s, config_parser.BindingStatement) and not s.arg_name]
  return set_here, delegate.macros_read


def _references(value: Any) -> Iterator[gin.config.ConfigurableReference]:
  if isinstance(value, gin.config.ConfigurableReference):
    yield value
  elif isinstance(value, (list, tuple, set)):
    for item in value:
      yield from _references(item)
  elif isinstance(value, dict):
    for item in [*value.keys(), *value.values()]:
      yield from _references(item)


def _macro_reads() -> tuple[set[str], set[str]]:
  """(macros that some configurable binding reads, directly or through read macros;
  every macro name the loaded config defines or references)."""
  config = _CONFIG
  macros = {scope: params.get("value") for (scope, selector), params in config.items()
            if selector == _MACRO}
  todo = [ref.config_key[0] for (_, selector), params in config.items() if selector != _MACRO
          for ref in _references(list(params.values())) if ref.config_key[1] == _MACRO]
  known = set(macros) | set(todo)
  read: set[str] = set()
  while todo:
    name = todo.pop()
    if name in read:
      continue
    read.add(name)
    for ref in _references(macros.get(name)):
      if ref.config_key[1] == _MACRO:
        todo.append(ref.config_key[0])
        known.add(ref.config_key[0])
  return read, known


def _did_you_mean(name: str, candidates) -> str:
  close = difflib.get_close_matches(name, sorted(set(candidates) - {name}), n=1, cutoff=0.6)
  return f" (did you mean {close[0]}?)" if close else ""


def binding_flag(binding: str) -> str:
  """'NAME = value' as the command-line flag that sets it."""
  name, _, value = binding.partition("=")
  return f"--gin.{name.strip()}={value.strip()}" if value else binding


def check_unread_macros(run_files: Sequence[tuple[str, str]], bindings: Sequence[str]) -> None:
  """Raises GinConfigError for the first macro set by `bindings` or at the top level of a
  run file ((name as given, path) pairs) that nothing in the parsed config reads.

  A run file's macro also counts as read where the run files themselves reference it, so
  overriding the parameter that reads it (--gin.train.seed=1 over `SEED`) is no error.
  """
  from_bindings = [(binding_flag(b), name) for b in bindings for name in _macro_names(b)[0]]
  from_files, read_by_run_files = [], set()
  for given, path in run_files:
    with open(path) as f:
      set_here, read_here = _macro_names(f.read())
    from_files += [(given, name) for name in set_here]
    read_by_run_files |= read_here
  if not from_bindings and not from_files:
    return
  read, known = _macro_reads()
  unread = [(where, name) for where, name in from_bindings if name not in read]
  unread += [(where, name) for where, name in from_files
             if name not in read and name not in read_by_run_files]
  if unread:
    where, name = unread[0]
    raise GinConfigError(f"{where} sets macro {name}, which nothing in this run reads"
                         f"{_did_you_mean(name, known) or ' (misspelled?)'}.")


def _accepts(annotation: Any, value: Any) -> Optional[bool]:
  """Whether a literal fits a simple annotation; None when the annotation is not simple."""
  if typing.get_origin(annotation) in (typing.Union, types.UnionType):
    verdicts = [_accepts(a, value) for a in typing.get_args(annotation)]
    return True if True in verdicts else (None if None in verdicts else False)
  if annotation is type(None):
    return value is None
  if annotation is bool:
    return isinstance(value, bool)
  if annotation is int:
    return isinstance(value, int) and not isinstance(value, bool)
  if annotation is float:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if annotation is str:
    return isinstance(value, str)
  return None


def _type_name(annotation: Any) -> str:
  if typing.get_origin(annotation) in (typing.Union, types.UnionType):
    return " or ".join(_type_name(a) for a in typing.get_args(annotation))
  return "None" if annotation is type(None) else getattr(annotation, "__name__", str(annotation))


def _type_hints(fn: Callable) -> dict[str, Any]:
  try:
    return typing.get_type_hints(fn.__init__ if inspect.isclass(fn) else fn)
  except Exception:  # pylint: disable=broad-except  (unresolvable annotations: no check)
    return {}


def check_value_types() -> None:
  """Raises GinConfigError for a literal (directly or through macros) that does not fit
  the int / float / str / bool (or Optional) annotation of the parameter it is bound to."""
  config = _CONFIG
  for (scope, selector), params in config.items():
    if selector == _MACRO:
      continue
    configurable = _REGISTRY.get(selector)
    if configurable is None:
      continue
    hints = _type_hints(configurable.wrapped)
    for arg, value in params.items():
      via = []
      while (isinstance(value, gin.config.ConfigurableReference)
             and value.config_key[1] == _MACRO and value.config_key in config
             and value.config_key[0] not in via):
        via.append(value.config_key[0])
        value = config[value.config_key].get("value")
      if arg not in hints or not isinstance(value, (bool, int, float, str, type(None))):
        continue
      if _accepts(hints[arg], value) is False:
        target = f"{scope + '/' if scope else ''}{configurable.name}.{arg}"
        source = f" through macro {' -> '.join(via)}" if via else ""
        raise GinConfigError(f"gin: {target} expects {_type_name(hints[arg])}, got {value!r} "
                             f"({type(value).__name__}){source}.")


def _explain_parse_error(error: Exception, bindings: Sequence[str]) -> str:
  """gin's parse error on one line; for an unquoted string binding, the quoting to use."""
  for binding in bindings:
    name, eq, value = binding.partition("=")
    if not eq or not value.strip():
      continue
    try:
      _macro_names(binding)
      continue
    except (SyntaxError, ValueError):
      pass
    quoted = repr(value.strip())
    try:
      _macro_names(f"{name} = {quoted}")
    except (SyntaxError, ValueError):
      continue
    flag = f"--gin.{name.strip()}="
    shown = f'"{quoted}"' if not any(c in quoted for c in '"$`\\') else shlex.quote(quoted)
    return (f"{binding_flag(binding)}: gin values are Python literals, so a string needs "
            f"quotes: {flag}{shown}")
  message = _one_line(error)
  unknown_param = re.search(r"Configurable '([\w.]+)' doesn't have a parameter named '(\w+)'",
                            message)
  unknown = re.search(r"No configurable matching '([\w.]+)'", message)
  suggestion = ""
  if unknown_param:
    matches = _REGISTRY.get_all_matches(unknown_param.group(1))
    if len(matches) == 1:
      params = inspect.signature(matches[0].wrapped).parameters
      suggestion = _did_you_mean(unknown_param.group(2), params)
  elif unknown:
    suggestion = _did_you_mean(unknown.group(1), {c.name for _, c in _REGISTRY.items()})
  found = unknown_param or unknown
  if found and suggestion:
    message = message.replace(found.group(0), found.group(0) + suggestion, 1)
  return message


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
