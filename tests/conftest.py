"""Shared test set-up: JAX on CPU, deterministic, small."""
import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# One XLA compilation cache per session, cold at the start (what a fresh clone pays): the
# trainer, PPO and resume tests build identical programs many times over, in this process
# and in the subprocesses they start (which inherit these variables).
_XLA_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _XLA_CACHE = tempfile.mkdtemp(prefix="deranj-tests-xla-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

HERE = os.path.dirname(os.path.abspath(__file__))
_MESH_CHECK = pytest.StashKey()


class _Background:
  """A command started now and awaited later (output to files: a full pipe would stall it)."""

  def __init__(self, argv, env):
    self.out, self.err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    self.proc = subprocess.Popen(argv, env=env, stdout=self.out, stderr=self.err, text=True)

  def wait(self, timeout):
    """(return code, stdout, stderr)."""
    code = self.proc.wait(timeout)
    self.out.seek(0)
    self.err.seek(0)
    return code, self.out.read(), self.err.read()

  def stop(self):
    if self.proc.poll() is None:
      self.proc.kill()
      self.proc.wait()


def _start_mesh_check():
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.dirname(HERE),
                                                    env.get("PYTHONPATH")]))
  return _Background([sys.executable, os.path.join(HERE, "mesh_check.py")], env)


@pytest.hookimpl(trylast=True)  # after -k / -m deselection
def pytest_collection_modifyitems(config, items):
  # mesh_check.py compiles for half a minute, single-threaded, in its own process: started
  # as soon as a selected test needs it, it runs on the other core while the tests before
  # that one run.
  if any("mesh_results" in getattr(item, "fixturenames", ()) for item in items):
    config.stash[_MESH_CHECK] = _start_mesh_check()


def pytest_unconfigure(config):
  if _MESH_CHECK in config.stash:
    config.stash[_MESH_CHECK].stop()
  if _XLA_CACHE:
    shutil.rmtree(_XLA_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def mesh_results(pytestconfig):
  """The JSON line of tests/mesh_check.py (8 forced CPU devices; see test_partitioning)."""
  run = pytestconfig.stash.get(_MESH_CHECK, None) or _start_mesh_check()
  code, out, err = run.wait(timeout=600)
  assert code == 0, err[-4000:]
  results = json.loads(out.strip().splitlines()[-1])
  assert results["device_count"] == 8
  return results
