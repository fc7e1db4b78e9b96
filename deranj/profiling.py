"""Measuring for tests and benchmarks: XLA compilations (for code that promises one
compile), interleaved timing rounds, XLA's cost analysis and the machine's probes."""
from __future__ import annotations

import contextlib
import math
import statistics
import threading
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

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


# ----------------------------------------------------------------------------- timing


VECTOR_FEATURES = ("avx2", "avx512f", "amx_tile", "amx_bf16", "neon", "sve")


def cpu_description(cpuinfo: str = "/proc/cpuinfo") -> str:
  """'<model name> (<vector features>)' from `cpuinfo`, so a benchmark's numbers say
  which machine they were measured on; 'unknown CPU' where the file is missing."""
  try:
    with open(cpuinfo) as f:
      text = f.read()
  except OSError:
    return "unknown CPU"
  model, flags = "unknown CPU", set()
  for line in text.splitlines():
    key, _, value = line.partition(":")
    key = key.strip().lower()
    if key in ("model name", "hardware") and model == "unknown CPU":
      model = value.strip()
    elif key in ("flags", "features"):
      flags.update(value.split())
  features = [f for f in VECTOR_FEATURES if f in flags]
  return f"{model} ({', '.join(features) or 'no listed vector features'})"


def interleaved_rounds(arms: dict[str, Callable[[], Any]], rounds: int,
                       log: Optional[Callable[[str], Any]] = None) -> dict[str, list[float]]:
  """Wall seconds of every arm in every round (`log` gets a line after each round).

  Round i runs the arms rotated by i, so each arm takes each position in turn and load
  from other processes falls on all of them alike.
  """
  names = list(arms)
  times = {name: [] for name in names}
  for i in range(rounds):
    k = i % len(names)
    for name in names[k:] + names[:k]:
      start = time.perf_counter()
      arms[name]()
      times[name].append(time.perf_counter() - start)
    if log:
      log(f"round {i + 1}/{rounds}: " + ", ".join(f"{n} {t[-1]:.2f} s" for n, t in times.items()))
  return times


def spread(values) -> dict[str, float]:
  """Median, min and max of a list of numbers."""
  return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def xla_cost(fn: Callable, *args) -> dict[str, float]:
  """XLA's own count for `jax.jit(fn)(*args)`: {'flops', 'bytes'} (NaN where absent).

  A while loop's body is counted once, whatever its trip count.
  """
  return compiled_cost(jax.jit(fn).lower(*args).compile())


def compiled_cost(compiled) -> dict[str, float]:
  """{'flops', 'bytes'} of an already compiled computation (NaN where XLA gives none)."""
  cost = compiled.cost_analysis()
  cost = (cost[0] if cost else None) if isinstance(cost, (list, tuple)) else cost
  cost = cost or {}
  return {"flops": float(cost.get("flops", math.nan)),
          "bytes": float(cost.get("bytes accessed", math.nan))}


MATMUL_LOOP_FLOPS = 2e8  # per timed probe call: ~1 ms at 200 GFLOP/s
MATMUL_LOOP_MAX_REPS = 1000


CONTRACT_MINOR = (((1,), (1,)), ((), ()))  # [m, k] x [n, k] -> [m, n]


def _repeated_matmul(a: jax.Array, b: jax.Array, reps: int, minor: bool = False) -> jax.Array:
  """sum_i (a + i) @ b, or with `minor` (b stored [n, k]) sum_i (a + i) @ b.T: `reps`
  matmuls; the shift keeps XLA from hoisting the product."""
  def body(i, acc):
    x = a + i.astype(a.dtype)
    return acc + (jax.lax.dot_general(x, b, CONTRACT_MINOR) if minor else x @ b)
  n = b.shape[0] if minor else b.shape[1]
  return jax.lax.fori_loop(0, reps, body, jnp.zeros((a.shape[0], n), a.dtype))


class Probes:
  """What this machine can do right now: memory bandwidth and matmul rates.

  `read`: a full reduction over a large array (each byte read once: a decode step
  streams its weights this way); `copy`: x + 1 in place over as many bytes (read +
  write);
  `matmuls`: [m, k] x [k, n] float32 at the given shapes, as FLOP/s: the matmul
  repeated inside one compiled loop (at least MATMUL_LOOP_FLOPS per call), so a small
  shape's rate is not its dispatch overhead, with the [k, n] operand stored [k, n] and
  stored [n, k] (contracting its minor dimension), the faster of the two. Each number
  is the best of `repeats` calls.
  """

  def __init__(self, matmul_shapes: dict[str, tuple[int, int, int]], megabytes: int = 512,
               repeats: int = 3):
    self.repeats = repeats
    self._big = jnp.ones((megabytes * 2**20 // 4,), jnp.float32)
    self._sum = jax.jit(jnp.sum)
    # Donated, so the copy reuses its buffer: a fresh 512 MiB output each call would
    # time the kernel's first-touch page faults, not the memory.
    self._copy = jax.jit(lambda a: a + 1.0, donate_argnums=0)
    self._copied = jnp.zeros_like(self._big)
    rng = np.random.default_rng(0)
    self._matmuls = {}
    for name, (m, k, n) in matmul_shapes.items():
      a = jnp.asarray(rng.standard_normal((m, k), np.float32))
      b = rng.standard_normal((k, n), np.float32)
      reps = min(MATMUL_LOOP_MAX_REPS, math.ceil(MATMUL_LOOP_FLOPS / (2.0 * m * k * n)))
      self._matmuls[name] = (a, (jnp.asarray(b), jnp.asarray(b.T.copy())),
                             reps * 2.0 * m * k * n, reps)
    self._mm = jax.jit(_repeated_matmul, static_argnums=(2, 3))
    self.measure()  # compile everything once

  def _best(self, fn) -> float:
    fn()
    best = math.inf
    for _ in range(self.repeats):
      start = time.perf_counter()
      fn()
      best = min(best, time.perf_counter() - start)
    return best

  def _copy_once(self):
    self._copied = self._copy(self._copied)
    self._copied.block_until_ready()

  def measure(self) -> dict[str, float]:
    """{'read': bytes/s, 'copy': bytes/s, 'matmul <name>': FLOP/s, ...}."""
    nbytes = self._big.nbytes
    out = {"read": nbytes / self._best(lambda: self._sum(self._big).block_until_ready()),
           "copy": 2 * nbytes / self._best(self._copy_once)}
    for name, (a, layouts, flops, reps) in self._matmuls.items():
      out[f"matmul {name}"] = flops / min(
          self._best(lambda: self._mm(a, b, reps, minor).block_until_ready())
          for b, minor in zip(layouts, (False, True)))
    return out
