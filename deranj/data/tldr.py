"""OpenAI's Reddit TL;DR files (Stiennon et al., 2020): the prompt, SFT posts, comparisons.

SFT files (`tldr_3_filtered/{train,valid,test}.jsonl`), one post per line:
  {"id": ..., "subreddit": ..., "title": ..., "post": ..., "summary": ...}
Comparison files, one labelled pair per line, in OpenAI's format
  {"info": {"subreddit": ..., "title": ..., "post": ...},
   "summaries": [{"text": ...}, {"text": ...}], "choice": 0 or 1, ...}
or flat: {"subreddit": ..., "title": ..., "post": ..., "chosen": ..., "rejected": ...},
where a formatted "prompt" may stand in for subreddit/title/post.
Other fields are ignored. Errors name the file and line.
"""
from __future__ import annotations

from typing import Any, Mapping

from deranj.data import files
from deranj.data.corpora import SummaryExample
from deranj.data.preferences import PreferencePair

SFT_FIELDS = ("subreddit", "title", "post", "summary")
POST_FIELDS = ("subreddit", "title", "post")


def format_prompt(subreddit: str, title: str, post: str) -> str:
  """The TL;DR prompt: 'SUBREDDIT: r/...\\nTITLE: ...\\nPOST: ...\\nTL;DR:'."""
  return f"SUBREDDIT: r/{subreddit}\nTITLE: {title}\nPOST: {post}\nTL;DR:"


def _prompt(record: Mapping[str, Any], path: str, line_number: int, within: str = "") -> str:
  """The prompt of the post in `record` (or in `record[within]`)."""
  subreddit, title, text = (
      files.get_field(record, within + f, path=path, line_number=line_number)
      for f in POST_FIELDS)
  return format_prompt(subreddit.strip(), title.strip(), text.strip())


def read_sft(path: str) -> list[SummaryExample]:
  """Posts with their reference summaries; the document is the formatted prompt."""
  out = []
  for line_number, record in files.read_jsonl(path, required=SFT_FIELDS):
    out.append(SummaryExample(document=_prompt(record, path, line_number),
                              summary=record["summary"].strip(),
                              source=f"{path}:{line_number}"))
  return out


def read_comparisons(path: str) -> list[PreferencePair]:
  """Labelled pairs (OpenAI's format or flat), as prompt/chosen/rejected records."""
  pairs = []
  for line_number, record in files.read_jsonl(path):
    where = dict(path=path, line_number=line_number)
    if "summaries" in record or "info" in record:
      files.get_field(record, "info", kind=dict, **where)
      summaries = files.get_field(record, "summaries", kind=list, **where)
      choice = files.get_field(record, "choice", kind=int, **where)
      if len(summaries) != 2 or choice not in (0, 1):
        raise files.DataError(f"{path}:{line_number}: expected 2 summaries and choice 0 or 1, "
                              f"got {len(summaries)} summaries and choice {choice}.")
      if not all(isinstance(s, dict) for s in summaries):
        raise files.DataError(f"{path}:{line_number}: each of 'summaries' should be an object "
                              "with a 'text' field.")
      texts = [files.get_field(s, "text", **where) for s in summaries]
      pairs.append(PreferencePair(prompt=_prompt(record, **where, within="info."),
                                  chosen=texts[choice].strip(),
                                  rejected=texts[1 - choice].strip()))
    else:
      chosen, rejected = (files.get_field(record, f, **where) for f in ("chosen", "rejected"))
      # A ready-made prompt (as in CarperAI's comparisons), else one built from the post.
      prompt = (files.get_field(record, "prompt", **where).strip() if "prompt" in record
                else _prompt(record, **where))
      pairs.append(PreferencePair(prompt=prompt, chosen=chosen.strip(), rejected=rejected.strip()))
  return pairs
