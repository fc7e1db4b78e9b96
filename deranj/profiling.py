"""Counting XLA compilations (for tests and benchmarks that promise one compile)."""
from __future__ import annotations

import contextlib
import threading

import jax

_EVENT = "/jax/core/compile/backend_compile_duration"
_active: list["CompileCounter"] = []
_lock = threading.Lock()
_registered = False


class CompileCounter:
  """Backend compilations seen while active, optionally only of jitted functions whose
  name contains `name`."""

  def __init__(self, name: str = ""):
    self.name = name
    self.functions: list[str] = []

  @property
  def count(self) -> int:
    return len(self.functions)


def _listener(event: str, duration: float, **kwargs):
  del duration
  if event != _EVENT:
    return
  fun = str(kwargs.get("fun_name", ""))
  with _lock:
    for counter in _active:
      if counter.name in fun:
        counter.functions.append(fun)


@contextlib.contextmanager
def count_compiles(name: str = ""):
  """with count_compiles("_sample") as c: ...; c.count"""
  global _registered
  with _lock:
    if not _registered:
      jax.monitoring.register_event_duration_secs_listener(_listener)
      _registered = True
    counter = CompileCounter(name)
    _active.append(counter)
  try:
    yield counter
  finally:
    with _lock:
      _active.remove(counter)
