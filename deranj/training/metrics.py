"""Training metrics: TensorBoard event files (clu writers) and a readable progress line.

    [train] step 200/1000  loss 2.314  accuracy 0.412  lr 1.00e-03  3.21 steps/s  ETA 4m09s
"""
from __future__ import annotations

import math
import sys
import time
from typing import Mapping, Optional

# Shown first on the progress line, in this order; the rest only go to TensorBoard.
_HEADLINE = ("loss", "accuracy", "objective/scores", "objective/kl", "response/length",
             "rewards/margins", "rewards/accuracies")


def format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  if hours:
    return f"{hours}h{minutes:02d}m"
  return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _format_value(value: float) -> str:
  return f"{value:.3g}" if abs(value) < 1e-2 or abs(value) >= 1e4 else f"{value:.4f}"


class MetricsLogger:
  """Writes scalars under MODEL_DIR/{train,eval} and prints progress lines."""

  def __init__(self, model_dir: Optional[str], num_steps: int, *, stream=None):
    self.num_steps = num_steps
    self.stream = stream or sys.stdout
    self._model_dir = model_dir
    self._writers = {}  # created at their first write: a failed start leaves no event files
    # clu's writers load TensorFlow: imported by a logger that will write (not at import,
    # so that a command line's mistakes stop before TensorFlow loads).
    if model_dir:
      from clu import metric_writers  # pylint: disable=g-import-not-at-top
      self._metric_writers = metric_writers
    self._start_time = None
    self._start_step = 0

  def start(self, step: int) -> None:
    """Call after the first (compiling) step, `step` steps done, so rates measure
    steady-state steps."""
    self._start_time = time.time()
    self._start_step = step

  def _write_scalars(self, name: str, step: int, scalars: Mapping[str, float]) -> None:
    if not self._model_dir:
      return
    if name not in self._writers:
      self._writers[name] = self._metric_writers.create_default_writer(
          f"{self._model_dir}/{name}", asynchronous=False, just_logging=False)
    self._writers[name].write_scalars(step, dict(scalars))

  def line(self, text: str) -> None:
    print(text, file=self.stream, flush=True)

  def write_train(self, step: int, metrics: Mapping[str, float], learning_rate: float) -> None:
    now = time.time()
    rate = float("nan")
    if self._start_time is not None and step > self._start_step:
      elapsed = now - self._start_time
      rate = (step - self._start_step) / elapsed if elapsed > 0 else float("nan")
    scalars = {**metrics, "learning_rate": learning_rate}
    if math.isfinite(rate):
      scalars["steps_per_second"] = rate
    self._write_scalars("train", step, scalars)
    shown = [k for k in _HEADLINE if k in metrics][:5]
    parts = [f"[train] step {step}/{self.num_steps}"]
    parts += [f"{k} {_format_value(metrics[k])}" for k in shown]
    parts.append(f"lr {learning_rate:.2e}")
    if math.isfinite(rate):
      parts.append(f"{rate:.2f} steps/s")
      parts.append(f"ETA {format_duration((self.num_steps - step) / rate)}")
    self.line("  ".join(parts))

  def write_eval(self, step: int, metrics: Mapping[str, float]) -> None:
    self._write_scalars("eval", step, metrics)
    body = "  ".join(f"{k} {_format_value(v)}" for k, v in sorted(metrics.items()))
    self.line(f"[eval]  step {step}/{self.num_steps}  {body}")

  def close(self) -> None:
    for writer in self._writers.values():
      writer.flush()
      writer.close()
    self._writers = {}
