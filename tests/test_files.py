"""deranj.data.files.atomic_write: complete or absent, 0644, nothing left on failure."""
import os
import stat

import pytest

from deranj.data import files


def test_atomic_write_replaces_the_file_whole(tmp_path):
  path = tmp_path / "sub" / "out.txt"
  with files.atomic_write(str(path)) as f:
    f.write("first\n")
    assert not path.exists()  # invisible until the block ends
  assert path.read_text() == "first\n"
  assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
  with files.atomic_write(str(path), "wb", fsync=True) as f:
    f.write(b"second\n")
  assert path.read_bytes() == b"second\n"
  assert files.write_jsonl(str(path), [{"a": 1}, {"b": "é"}]) == 2
  assert path.read_text(encoding="utf-8") == '{"a": 1}\n{"b": "é"}\n'


def test_atomic_write_failure_keeps_the_old_file_and_no_temp(tmp_path):
  path = tmp_path / "out.txt"
  path.write_text("old")
  with pytest.raises(RuntimeError, match="boom"):
    with files.atomic_write(str(path)) as f:
      f.write("half")
      raise RuntimeError("boom")
  assert path.read_text() == "old"
  assert os.listdir(tmp_path) == ["out.txt"]
  with pytest.raises(ValueError, match="mode must be"):
    with files.atomic_write(str(path), "a"):
      pass
