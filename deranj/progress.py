"""Progress lines for loops over batches: done / total, rate and ETA.

    progress = Progress(len(prompts), "prompts", write=print)
    for ...:
      progress.update(done)

A line is written after the first call (which includes compiling), then at most every
`every_s` seconds, and at the end. Once a second update has come, the rate leaves the
first call's compile time out.
"""
from __future__ import annotations

import time
from typing import Callable

EVERY_S = 5.0


class Progress:
  """`{verb} {done}/{total} {unit} ({rate} {rate_unit}/s, ETA ...)` lines through `write`."""

  def __init__(self, total: int, unit: str, *, write: Callable[[str], None],
               verb: str = "done", rate_unit: str = "", every_s: float = EVERY_S):
    self.total, self.unit, self.verb, self.write = total, unit, verb, write
    self.rate_unit = rate_unit or unit.split()[0]
    self.every_s = every_s
    self.start = self.last = time.time()
    self.first = None  # (time, done) after the first call, which includes compiling

  def update(self, done: int) -> None:
    now = time.time()
    if self.first is not None and done < self.total and now - self.last < self.every_s:
      return
    if self.first is None or done == self.first[1]:
      rate = done / max(now - self.start, 1e-9)
    else:
      rate = (done - self.first[1]) / max(now - self.first[0], 1e-9)
    text = f"{self.verb} {done}/{self.total} {self.unit} ({rate:.2f} {self.rate_unit}/s"
    if done < self.total:
      text += f", ETA {(self.total - done) / rate:.0f} s)"
    else:
      text += f", {now - self.start:.1f} s in all)"
    if self.first is None:
      self.first = (now, done)
      text += " (the first call compiles)" if done < self.total else ""
    self.write(text)
    self.last = now
