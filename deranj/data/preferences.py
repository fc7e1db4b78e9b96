"""Preference pairs: the (prompt, chosen, rejected) record and its JSON-lines files.

The experiments make these (a judge labels pairs of model samples) and write them with
`write_pairs`; the `preference_pairs` seqio task and reward-model training read them
back with `read_pairs`. One JSON object per line:
  {"prompt": "...", "chosen": "...", "rejected": "..."}
Extra fields (judge scores, sample ids) are allowed and ignored. `prompt` is the raw
prompt (a document, or a formatted TL;DR post); tasks add the "summarize: " prefix.

Pairs of model samples also carry the token ids that were sampled (ID_FIELDS, lists of
ints: `prompt_ids` the encoder input as the model saw it, `chosen_ids` / `rejected_ids`
the responses through EOS, or without EOS when the sampler cut them), so a task trains
on exactly those ids: decoding to text and tokenising again can change ids and would
append EOS to a cut sample. The texts stay alongside, for humans. A file gives ids on
every record or on none.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Optional, Sequence

from deranj.data import files
from deranj.data.tokenizer import EOS_ID, PAD_ID

FIELDS = ("prompt", "chosen", "rejected")
ID_FIELDS = ("prompt_ids", "chosen_ids", "rejected_ids")

Ids = Optional[tuple[int, ...]]


@dataclasses.dataclass(frozen=True)
class PreferencePair:
  """A prompt with the preferred (`chosen`) and dispreferred (`rejected`) completion,
  and optionally the token ids they were sampled as (all three or none)."""
  prompt: str
  chosen: str
  rejected: str
  prompt_ids: Ids = None
  chosen_ids: Ids = None
  rejected_ids: Ids = None

  @property
  def has_ids(self) -> bool:
    return self.chosen_ids is not None


def sampled_ids(row: Sequence[int], eos_id: int = EOS_ID) -> tuple[int, ...]:
  """A sampler's row (tokens, EOS, PAD...) -> its ids through the first EOS; a row
  without EOS (cut at the maximum length) keeps every id but the trailing PAD."""
  ids = [int(i) for i in row]
  if eos_id in ids:
    return tuple(ids[:ids.index(eos_id) + 1])
  while ids and ids[-1] == PAD_ID:
    ids.pop()
  return tuple(ids)


def _check_ids(pair: PreferencePair) -> Optional[str]:
  """What is wrong with the pair's ids, or None."""
  given = [getattr(pair, f) is not None for f in ID_FIELDS]
  if not any(given):
    return None
  if not all(given):
    return f"give all of {list(ID_FIELDS)} or none"
  for field in ID_FIELDS:
    ids = getattr(pair, field)
    if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and i > PAD_ID
                          for i in ids):
      return f"field {field!r} should be a non-empty list of positive token ids (no PAD)"
  return None


def write_pairs(path: str, pairs: Iterable[PreferencePair]) -> int:
  """Writes pairs as JSON lines (atomically); returns how many were written."""
  records = []
  for pair in pairs:
    problem = _check_ids(pair)
    if problem:
      raise ValueError(f"write_pairs {path}: pair {len(records)}: {problem}.")
    records.append({k: (list(v) if isinstance(v, tuple) else v)
                    for k, v in dataclasses.asdict(pair).items() if v is not None})
  return files.write_jsonl(path, records)


def read_pairs(path: str) -> list[PreferencePair]:
  """Reads a file written by `write_pairs`; DataError names the file and line of a bad
  record."""
  pairs = []
  for line_number, record in files.read_jsonl(path):
    values = [files.get_field(record, f, path=path, line_number=line_number) for f in FIELDS]
    ids = [tuple(files.get_field(record, f, path=path, line_number=line_number, kind=list))
           if f in record else None for f in ID_FIELDS]
    pair = PreferencePair(*values, *ids)
    problem = _check_ids(pair)
    if problem:
      raise files.DataError(f"{path}:{line_number}: {problem}.")
    if pairs and pair.has_ids != pairs[0].has_ids:
      raise files.DataError(f"{path}:{line_number}: token ids on some records but not all; "
                            f"a file gives {list(ID_FIELDS)} on every record or on none.")
    pairs.append(pair)
  return pairs
