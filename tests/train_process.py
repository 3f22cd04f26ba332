"""`python main.py` in a subprocess whose log the test follows: the real entry point, real signals;
and `checkpoint_workdir`, a workdir holding one checkpoint, for the tests that read one.

Used by test_multihost.py, test_preemption.py, test_evaluate.py and test_export.py (not a test
module itself).
"""

from __future__ import annotations

import glob
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import tensorflow as tf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = os.path.join(REPO, "main.py")
# A train metrics line of clu's logging writer: "... logging_writer.py:48] [12] train/..., ...".
_STEP_LINE = re.compile(r"\] \[(\d+)\] .*\btrain/loss=")


def _steps(lines: list[str]) -> list[int]:
  return [int(m.group(1)) for line in lines if (m := _STEP_LINE.search(line))]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def subprocess_env(num_devices: int, compile_cache: str | None) -> dict[str, str]:
  """The environment of a child: CPU only, `num_devices` fake devices, a shared compile cache.

  The persistent compilation cache only saves the children the compile of a program another
  child compiled already; the executable, and so every number, is the same.
  """
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices}")
  if compile_cache:
    env.update(JAX_COMPILATION_CACHE_DIR=compile_cache,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  return env


class TrainProcess:
  """One `python main.py ARGS` child, its combined stdout/stderr collected line by line.

  Use as a context manager: a child still running when the block ends (a failed assertion) is
  killed, so no test leaves processes behind.
  """

  def __init__(self, args: list[str], env: dict[str, str], name: str = "main.py"):
    self.name = name
    self.lines: list[str] = []
    self._changed = threading.Condition()
    self._eof = False
    self.proc = subprocess.Popen([sys.executable, MAIN, *args], cwd=REPO, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    self._reader = threading.Thread(target=self._read, daemon=True)
    self._reader.start()

  def _read(self):
    for line in self.proc.stdout:
      with self._changed:
        self.lines.append(line)
        self._changed.notify_all()
    with self._changed:
      self._eof = True
      self._changed.notify_all()

  def __enter__(self) -> "TrainProcess":
    return self

  def __exit__(self, *exc):
    if self.proc.poll() is None:
      self.proc.kill()
      self.proc.wait()

  def tail(self, n: int = 40) -> str:
    return f"--- last lines of {self.name} ---\n" + "".join(self.lines[-n:])

  def _wait(self, found, what: str, timeout: float):
    """Blocks until `found(lines)` is truthy; fails if the child ends or time runs out."""
    deadline = time.monotonic() + timeout
    with self._changed:
      while True:
        if result := found(self.lines):
          return result
        if self._eof:
          raise AssertionError(f"{self.name} ended before logging {what}\n{self.tail()}")
        left = deadline - time.monotonic()
        if left <= 0:
          raise AssertionError(f"{self.name}: no {what} in {timeout} s\n{self.tail()}")
        self._changed.wait(left)

  def wait_for(self, pattern: str, timeout: float) -> re.Match:
    """Blocks until a log line matches `pattern`; returns the match."""
    regex = re.compile(pattern)
    return self._wait(lambda lines: next(filter(None, map(regex.search, lines)), None),
                      repr(pattern), timeout)

  def wait_for_step(self, step: int, timeout: float) -> int:
    """Blocks until the child logs train metrics at `step` or later; returns that step."""
    def reached(lines):
      steps = _steps(lines)
      return steps[-1] if steps and steps[-1] >= step else None
    return self._wait(reached, f"train metrics at step {step}", timeout)

  def logged_steps(self) -> list[int]:
    """The steps of the train metrics lines so far, in order."""
    with self._changed:
      return _steps(self.lines)

  def send(self, sig: signal.Signals) -> None:
    self.proc.send_signal(sig)

  def wait(self, timeout: float) -> int:
    """Waits for the child to exit; returns its exit code (killing it after `timeout`)."""
    try:
      rc = self.proc.wait(timeout)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      self.proc.wait()
      raise AssertionError(f"{self.name} still running after {timeout} s\n{self.tail()}")
    self._reader.join(10)
    return rc

  def log(self) -> str:
    with self._changed:
      return "".join(self.lines)


def logged_losses(workdir: str, pid: int) -> dict[int, float]:
  """{step: train/loss} from the TensorBoard event file that process `pid` wrote in `workdir`.

  Every run appends its own event file (named with its pid), with the exact float32 values
  (the console shows 6 digits).
  """
  files = [f for f in glob.glob(os.path.join(workdir, "events.out.tfevents.*"))
           if f".{pid}." in os.path.basename(f)]
  assert len(files) == 1, (pid, os.listdir(workdir))
  losses = {}
  for event in tf.compat.v1.train.summary_iterator(files[0]):
    for value in event.summary.value:
      if value.tag == "train/loss":
        losses[event.step] = float(tf.make_ndarray(value.tensor))
  return losses


def assert_same_losses(got: dict[int, float], want: dict[int, float], steps, rtol: float):
  steps = list(steps)
  assert steps and set(steps) <= set(got) and set(steps) <= set(want), (steps, got, want)
  np.testing.assert_allclose([got[s] for s in steps], [want[s] for s in steps], rtol=rtol,
                             err_msg=f"steps {steps}")


def checkpoint_workdir(config, workdir: str, step: int):
  """Saves a fresh (untrained) train state of `config` at `step` into `workdir`, with its
  config.json, as a training run leaves them; returns the one-device Trainer that made it."""
  import jax  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from tvts_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from tvts_jax import sharding, train  # pylint: disable=g-import-not-at-top
  one_device = sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1)),
                                  devices=jax.devices()[:1])
  trainer = train.Trainer(config, one_device)
  checkpointer = ckpt_lib.Checkpointer(workdir, 2, async_save=False)
  checkpointer.save(step, trainer.state)
  checkpointer.close()
  train._write_config(config, workdir)  # pylint: disable=protected-access
  return trainer
