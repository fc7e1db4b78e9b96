"""Data files on disk: JSON-lines reading with line-numbered errors, atomic writes.

Every reader error names the file and, where there is one, the line, so a bad record
in a large file can be found and fixed.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import IO, Any, Iterable, Iterator, Mapping, Optional, Sequence


class DataError(ValueError):
  """Missing, empty or malformed input data; the message says where and what to set."""


def require_file(path: str, *, what: str, setting: Optional[str] = None) -> str:
  """Returns `path` if it is a file, else raises a DataError naming it and `setting`."""
  if not os.path.isfile(path):
    hint = f" Set {setting} to the right location." if setting else ""
    raise DataError(f"{what}: file {path!r} does not exist.{hint}")
  return path


def require_dir(path: Optional[str], *, what: str, setting: str) -> str:
  """Returns `path` if it is a directory, else raises a DataError naming `setting`."""
  if not path:
    raise DataError(f"{what}: no directory configured. Set {setting}.")
  if not os.path.isdir(path):
    raise DataError(f"{what}: directory {path!r} does not exist. Set {setting} to the "
                    "right location.")
  return path


def read_jsonl(path: str, required: Sequence[str] = ()) -> Iterator[tuple[int, dict[str, Any]]]:
  """Yields (line number, record) for each non-blank line of a JSON-lines file.

  Raises DataError for a missing or empty file, a line that is not a JSON object, or
  a record without one of the `required` fields (dotted names reach into nested
  objects, e.g. 'info.post'); the message names the file and line.
  """
  require_file(path, what="JSON-lines file")
  seen = 0
  with open(path, encoding="utf-8") as f:
    for line_number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{path}:{line_number}: not valid JSON ({e.msg}).") from None
      if not isinstance(record, dict):
        raise DataError(f"{path}:{line_number}: expected a JSON object, got "
                        f"{type(record).__name__}.")
      for field in required:
        get_field(record, field, path=path, line_number=line_number)
      seen += 1
      yield line_number, record
  if not seen:
    raise DataError(f"{path}: the file is empty (no records).")


def get_field(record: Mapping[str, Any], field: str, *, path: str, line_number: int,
              kind: type = str) -> Any:
  """record['a']['b'] for field 'a.b', checked to be a `kind`; else a DataError."""
  value: Any = record
  for key in field.split("."):
    if not isinstance(value, Mapping) or key not in value:
      raise DataError(f"{path}:{line_number}: record has no field {field!r}.")
    value = value[key]
  if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
    raise DataError(f"{path}:{line_number}: field {field!r} should be a {kind.__name__}, got "
                    f"{type(value).__name__}.")
  return value


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w", *, fsync: bool = False) -> Iterator[IO]:
  """Opens a temp file beside `path` for writing; on success it becomes `path` (0644).

  The file appears complete or not at all: on an exception the temp file is removed
  and `path` is untouched. `fsync` flushes it to disk before the rename.

      with atomic_write("out.json") as f:
        json.dump(data, f)
  """
  if mode not in ("w", "wb"):
    raise ValueError(f"atomic_write: mode must be 'w' or 'wb', got {mode!r}.")
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  try:
    with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
      yield f
      if fsync:
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # mkstemp makes 0600
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def write_jsonl(path: str, records: Iterable[Mapping[str, Any]]) -> int:
  """Writes one JSON object per line, atomically (`atomic_write`); returns the count."""
  count = 0
  with atomic_write(path) as f:
    for record in records:
      f.write(json.dumps(record, ensure_ascii=False) + "\n")
      count += 1
  return count


def write_bytes_atomic(path: str, data: bytes) -> None:
  """Writes `data` to `path` atomically (`atomic_write`)."""
  with atomic_write(path, "wb") as f:
    f.write(data)
