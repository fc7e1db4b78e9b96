"""Preference pairs: the (prompt, chosen, rejected) record and its JSON-lines files.

The experiments make these (a judge labels pairs of model samples) and write them with
`write_pairs`; the `preference_pairs` seqio task and reward-model training read them
back with `read_pairs`. One JSON object per line:
  {"prompt": "...", "chosen": "...", "rejected": "..."}
Extra fields (judge scores, sample ids) are allowed and ignored. `prompt` is the raw
prompt (a document, or a formatted TL;DR post); tasks add the "summarize: " prefix.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable

from deranj.data import files

FIELDS = ("prompt", "chosen", "rejected")


@dataclasses.dataclass(frozen=True)
class PreferencePair:
  """A prompt with the preferred (`chosen`) and dispreferred (`rejected`) completion."""
  prompt: str
  chosen: str
  rejected: str


def write_pairs(path: str, pairs: Iterable[PreferencePair]) -> int:
  """Writes pairs as JSON lines (atomically); returns how many were written."""
  return files.write_jsonl(path, (dataclasses.asdict(p) for p in pairs))


def read_pairs(path: str) -> list[PreferencePair]:
  """Reads a file written by `write_pairs`; DataError names the file and line of a bad
  record."""
  pairs = []
  for line_number, record in files.read_jsonl(path):
    values = [files.get_field(record, f, path=path, line_number=line_number) for f in FIELDS]
    pairs.append(PreferencePair(*values))
  return pairs
